"""The admin API's views of a worker: the flow index, parts that fit a message, strict rows."""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

from ipferry.worker import views


def entry(tenant: str):
    return SimpleNamespace(key=SimpleNamespace(tenant=tenant), seq=0)


def test_flow_index_orders_pages_and_cursors():
    index = views.FlowIndex()
    flows = [entry("acme" if i % 3 else "beta") for i in range(1000)]
    for f in flows:
        index.add(f)
    assert [f.seq for f in flows] == list(range(1, 1001))
    for f in flows[::2]:  # half of them end
        index.discard(f)
    index.discard(entry("never-added"))
    live = flows[1::2]
    assert len(index) == 500 and len(index.flows("acme")) == sum(f.key.tenant == "acme" for f in live)
    assert list(index.at(None, 490)) == live[490:]
    assert list(index.at(None, 600)) == []
    assert views.take(index.after(None, flows[10].seq), 3) == live[5:8]  # seq 11 ended: after it
    assert index.count_after(None, 100) == 450
    beta = [f for f in live if f.key.tenant == "beta"]
    assert list(index.after("beta", 0)) == beta and index.count_after("nobody", 0) == 0
    for f in beta:
        index.discard(f)
    assert "beta" not in index.tenants and list(index.at("beta", 0)) == []


def test_a_page_costs_the_same_at_any_depth():
    index = views.FlowIndex()
    for _ in range(200_000):
        index.add(entry("acme"))

    def page(start: int) -> float:
        t0 = time.perf_counter()
        for _ in range(50):
            views.take(index.at(None, start), 200)
        return (time.perf_counter() - t0) / 50

    shallow, deep = page(0), page(199_800)
    assert deep < 5 * shallow + 0.001, (shallow, deep)


def test_fit_keeps_a_reply_within_its_budget():
    rows = [{"n": i, "pad": "x" * 1000} for i in range(500)]
    out, consumed, cut = views.fit(iter(rows), budget=50_000)
    assert cut and consumed == len(out) and 40 <= len(out) < 50
    assert len(json.dumps(out, separators=(",", ":"))) <= 50_000
    out, consumed, cut = views.fit(iter(rows[:3]), budget=50_000)
    assert not cut and consumed == 3
    out, consumed, cut = views.fit(iter(rows), limit=10)
    assert len(out) == 10 and cut
    assert views.fit(iter([None, rows[0]]))[:2] == ([rows[0]], 2)
    huge = {"pad": "x" * 200_000}  # one row alone larger than the budget still makes progress
    assert views.fit(iter([huge, huge]), budget=1000)[:2] == ([huge], 1)


def test_snapshots_hand_a_long_list_out_in_parts():
    snaps = views.Snapshots()
    items = [{"i": i, "pad": "y" * 500} for i in range(2000)]
    got, body, parts = [], {}, 0
    while True:
        part = snaps.part(body, lambda: list(items), lambda x: x)
        parts += 1
        assert len(json.dumps(part)) < views.REPLY_BUDGET + 1000
        got += part["rows"]
        if part["next"] is None:
            break
        body = {"snapshot": part["snapshot"], "start": part["next"]}
    assert got == items and parts > 5
    assert not snaps._lists  # the last part let the snapshot go


def test_large_metric_families_are_cut_into_pieces():
    family = {"name": "m", "type": "counter", "help": "h",
              "samples": [["m_total", {"reason": f"r{i}" * 10}, float(i)] for i in range(5000)]}
    pieces = views.metric_pieces([family, {"name": "s", "type": "gauge", "help": "", "samples": []}])
    assert len(pieces) > 2 and {p["name"] for p in pieces} == {"m", "s"}
    assert [s for p in pieces if p["name"] == "m" for s in p["samples"]] == family["samples"]
    assert all(len(json.dumps(p)) <= views.REPLY_BUDGET // 2 + 100 for p in pieces)


def test_tunnel_rows_are_strict_and_bounded():
    def tunnel(extra, tenant="acme"):
        return SimpleNamespace(closed=False, as_dict=lambda: {"id": 1, "tenant": tenant,
                                                              "context": extra})

    row = views.tunnel_row(tunnel({"n": math.nan, "ok": 1}))
    assert row["context"] == {"n": "nan", "ok": 1}
    row = views.tunnel_row(tunnel({"big": "z" * 5000}))
    assert row["context"] is None and row["context_omitted"] > 5000
    row = views.tunnel_row(tunnel({"many": list(range(100_000))}))
    assert row["context"] is None and row["context_omitted"] > 0
    row = views.tunnel_row(tunnel({}, tenant="t" * 10_000))
    assert len(row["tenant"]) == views.MAX_TEXT
    assert views.tunnel_row(SimpleNamespace(closed=True)) is None
