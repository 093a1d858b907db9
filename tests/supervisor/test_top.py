"""``ipferry top`` without a daemon: sampling through a canned admin API, rates, sorting, the
rendering (plain and styled), the command's checks, and the live loop's keys in a pseudo-terminal."""

from __future__ import annotations

import io
import os
import re
import termios
import threading
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from rich.console import Console

from ipferry.supervisor import cli, top

ESC = "\x1b"


def status(ready: bool = True, workers: int = 2, started: float = 1000.0) -> dict:
    return {
        "ready": ready, "status": f"nsd ready, {workers}/{workers} workers ready", "pid": 4348,
        "started_at": started, "config": None,
        "nsd": {"pid": 4350, "state": "ready", "restarts": 0, "started_at": started},
        "workers": [{"index": i, "pid": 4352 + i, "state": "ready", "restarts": i,
                     "started_at": started + 1, "tun": f"ipf{i}", "audit_error": None}
                    for i in range(workers)],
        "audit": {"sink": None, "on_error": "continue", "degraded": False, "failing": {}},
        "onramps": [],
    }


def flow(sport: int, *, up: int, down: int, packets: tuple[int, int], age: float,
         tenant: str = "acme", protocol: str = "tcp", worker: int = 0, dst: str = "198.18.0.1",
         dport: int = 9000, src: str = "10.98.0.2") -> dict:
    return {"tenant": tenant, "protocol": protocol, "src": src, "sport": sport, "dst": dst,
            "dport": dport, "tunnel": 1, "tunnel_worker": worker, "state": "established",
            "decision": "upgrade", "slot": None, "packets": list(packets),
            "payload_bytes": [up, down], "age": age, "worker": worker, "seq": sport}


def tunnel(id_: int, packets_in: int, packets_out: int, *, worker: int = 0,
           tenant: str = "acme", kind: str = "tunnel", **extra) -> dict:
    return {"id": id_, "onramp": kind, "kind": kind, "offload": True, "tenant": tenant,
            "context": {"device": f"d{id_}"}, "packets_in": packets_in,
            "packets_out": packets_out, "worker": worker, **extra}


def metrics_text(*, drops: dict[tuple[str, str], float], bytes_in: dict[str, float],
                 cpu: dict[str, float], flows: dict[tuple[str, str], float] | None = None,
                 tunnels: dict[str, float] | None = None) -> str:
    """A /metrics body as the daemon writes it (only the families top reads, and one other)."""
    lines = ["# HELP ipferry_workers_ready Workers ready.", "# TYPE ipferry_workers_ready gauge",
             "ipferry_workers_ready 2.0",
             "# HELP ipferry_drops_total Drops.", "# TYPE ipferry_drops_total counter"]
    for (reason, w), v in drops.items():
        lines.append(f'ipferry_drops_total{{reason="{reason}",worker="{w}"}} {v}')
        lines.append(f'ipferry_drops_created{{reason="{reason}",worker="{w}"}} 1.7e9')
    lines += ["# HELP ipferry_bytes_total Bytes.", "# TYPE ipferry_bytes_total counter"]
    for w, v in bytes_in.items():
        lines.append(f'ipferry_bytes_total{{direction="from_tunnel",worker="{w}"}} {v}')
        lines.append(f'ipferry_bytes_total{{direction="to_tunnel",worker="{w}"}} {2 * v}')
    lines += ["# HELP ipferry_process_cpu_seconds CPU.",
              "# TYPE ipferry_process_cpu_seconds counter"]
    for w, v in cpu.items():
        lines.append(f'ipferry_process_cpu_seconds_total{{role="worker",worker="{w}"}} {v}')
    lines.append('ipferry_process_cpu_seconds_total{role="supervisor",worker=""} 99.0')
    lines += ["# HELP ipferry_flows_active Flows.", "# TYPE ipferry_flows_active gauge"]
    for (protocol, w), v in (flows or {}).items():
        lines.append(f'ipferry_flows_active{{protocol="{protocol}",worker="{w}"}} {v}')
    lines += ["# HELP ipferry_tunnels_active Tunnels.", "# TYPE ipferry_tunnels_active gauge"]
    for w, v in (tunnels or {}).items():
        lines.append(f'ipferry_tunnels_active{{worker="{w}"}} {v}')
    return "\n".join(lines) + "\n"


class FakeAPI:
    """The admin API's GET answers from canned data; flows paged by cursor as the daemon does."""

    def __init__(self, *, status: dict, tunnels: list, flows: list, metrics: str,
                 missing: list[int] | None = None) -> None:
        self.status, self.tunnels, self.flows, self.metrics = status, tunnels, flows, metrics
        self.missing = missing or []
        self.paths: list[str] = []
        self.fail: tuple[int, object] | None = None

    def __call__(self, method: str, path: str) -> tuple[int, object]:
        assert method == "GET"
        self.paths.append(path)
        if self.fail is not None:
            return self.fail
        url = urlsplit(path)
        q = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        if url.path == "/api/status":
            return 200, self.status
        if url.path == "/api/tunnels":
            return 200, self.tunnels
        if url.path == "/metrics":
            return 200, self.metrics
        assert url.path == "/api/flows", path
        limit = min(int(q.get("limit", 100)), 200)
        assert limit >= 1
        rows = [f for f in self.flows if "tenant" not in q or f["tenant"] == q["tenant"]]
        start = int(q["after"]) if "after" in q else 0
        page = rows[start:start + limit]
        end = start + len(page)
        return 200, {"total": len(rows), "offset": None, "after": q.get("after"), "limit": limit,
                     "flows": page, "next": str(end) if end < len(rows) else None,
                     "workers_missing": self.missing}


def sample(api: FakeAPI, at: float, **kw) -> top.Sample:
    return top.fetch(api, clock=lambda: at, wall=lambda: 2000.0 + at, **kw)


def two_samples(**kw) -> tuple[top.Sample, top.Sample]:
    """Two samples 2 s apart of a daemon with flows old, reused, new and unlisted before."""
    first = FakeAPI(
        status=status(),
        tunnels=[tunnel(1, 100, 90), tunnel(2, 10, 10, worker=1),
                 tunnel(1, 50, 50, kind="gue", worker=1, peer="127.0.0.1:4000")],
        flows=[flow(1000, up=1000, down=50_000, packets=(10, 40), age=10.0),
               flow(1001, up=0, down=0, packets=(1, 1), age=30.0, worker=1),
               flow(1002, up=500, down=500, packets=(5, 5), age=20.0),  # ends; its key comes back
               flow(1003, up=7, down=0, packets=(1, 0), age=1.0, protocol="icmp", dport=0,
                    tenant="beta")],
        metrics=metrics_text(drops={("bad_version", "0"): 3, ("no_flow", "1"): 10},
                             bytes_in={"0": 1000, "1": 0}, cpu={"0": 10.0, "1": 5.0}),
    )
    s1 = sample(first, 100.0, **kw)
    second = FakeAPI(
        status=status(),
        tunnels=[tunnel(1, 300, 190), tunnel(2, 10, 10, worker=1),
                 tunnel(1, 60, 50, kind="gue", worker=1, peer="127.0.0.1:4000"),
                 tunnel(3, 40, 0)],
        flows=[flow(1000, up=3000, down=250_000, packets=(30, 240), age=12.0),
               flow(1001, up=0, down=0, packets=(1, 1), age=32.0, worker=1),
               flow(1002, up=100, down=0, packets=(2, 0), age=0.5),  # a new flow, same key
               flow(1003, up=7, down=0, packets=(1, 0), age=3.0, protocol="icmp", dport=0,
                    tenant="beta"),
               flow(1004, up=4000, down=0, packets=(4, 0), age=1.5, src="fd98::2",
                    dst="fd18::1"),  # new since the first sample
               flow(1005, up=9_000_000, down=0, packets=(900, 0), age=60.0)],  # unlisted before
        metrics=metrics_text(drops={("bad_version", "0"): 5, ("no_flow", "1"): 2,  # 1 restarted
                                    ("denied", "0"): 4},
                             bytes_in={"0": 5000, "1": 0}, cpu={"0": 11.0, "1": 5.0},
                             flows={("tcp", "0"): 4, ("icmp", "0"): 1, ("tcp", "1"): 1},
                             tunnels={"0": 2, "1": 1}),
    )
    return s1, sample(second, 102.0, **kw)


# -- sampling -----------------------------------------------------------------------------------

def test_fetch_reads_every_page_by_cursor_up_to_max_flows():
    flows = [flow(2000 + i, up=i, down=0, packets=(1, 0), age=1.0) for i in range(450)]
    api = FakeAPI(status=status(), tunnels=[], flows=flows, metrics="", missing=[1])
    s = sample(api, 5.0)
    assert [f["sport"] for f in s.flows] == list(range(2000, 2450))
    assert s.flows_total == 450 and s.workers_missing == [1] and s.taken == 5.0
    pages = [p for p in api.paths if p.startswith("/api/flows")]
    assert pages == ["/api/flows?limit=200", "/api/flows?limit=200&after=200",
                     "/api/flows?limit=200&after=400"]

    api.paths.clear()
    s = sample(api, 5.0, max_flows=250)
    assert len(s.flows) == 250 and s.flows_total == 450
    assert [p for p in api.paths if p.startswith("/api/flows")] == [
        "/api/flows?limit=200", "/api/flows?limit=50&after=200"]


def test_fetch_by_tenant_asks_for_its_flows_and_keeps_its_tunnels():
    api = FakeAPI(status=status(), tunnels=[tunnel(1, 1, 1), tunnel(2, 1, 1, tenant="a b")],
                  flows=[flow(1, up=0, down=0, packets=(1, 0), age=1, tenant="a b"),
                         flow(2, up=0, down=0, packets=(1, 0), age=1)], metrics="")
    s = sample(api, 1.0, tenant="a b")
    assert api.paths[-1] == "/api/flows?tenant=a%20b&limit=200"
    assert [f["sport"] for f in s.flows] == [1] and [t["id"] for t in s.tunnels] == [2]


def test_fetch_keeps_only_the_metrics_it_shows():
    s = two_samples()[1]
    assert s.metrics[("ipferry_drops_total", (("reason", "denied"), ("worker", "0")))] == 4
    assert {name for name, _ in s.metrics} <= top.WANTED_METRICS
    assert not any(name.endswith("_created") for name, _ in s.metrics)


@pytest.mark.parametrize("answer", [(503, "not ready"), (404, "not found")])
def test_fetch_fails_clearly_on_an_unexpected_answer(answer):
    api = FakeAPI(status=status(), tunnels=[], flows=[], metrics="")
    api.fail = answer
    with pytest.raises(top.TopError, match=f"admin API answered {answer[0]} to GET /api/status"):
        sample(api, 1.0)


def test_unparsable_metrics_is_an_error():
    api = FakeAPI(status=status(), tunnels=[], flows=[], metrics="ipferry_drops_total{ 1\n")
    with pytest.raises(top.TopError, match="cannot parse /metrics"):
        sample(api, 1.0)


# -- rates and order ----------------------------------------------------------------------------

def rows_by_port(view: top.View) -> dict[str, top.FlowRow]:
    return {r.source.rpartition(":")[2] if "id" not in r.source else r.source.split()[-1]: r
            for r in view.flows}


def test_flow_rates_come_from_two_samples():
    s1, s2 = two_samples()
    view = top.compute(s1, s2, sort="rate", limit=50)
    assert view.interval == 2.0
    rows = rows_by_port(view)
    r = rows["1000"]  # 2000 up and 200,000 down over its 2.0 s of age
    assert (r.up, r.down, r.packet_rate, r.bytes) == (1000.0, 100_000.0, 110.0, 253_000)
    assert r.rate == 101_000.0 and r.destination == "198.18.0.1:9000" and r.worker == 0
    assert rows["1001"].rate == 0.0  # idle
    assert rows["1002"].rate == 50.0  # a new flow under an old key: its 100 bytes / 2 s
    assert rows["1004"].up == 2000.0  # new since: all its bytes within the interval
    assert rows["1004"].source == "[fd98::2]:1004" and rows["1004"].destination == "[fd18::1]:9000"
    assert rows["1005"].rate is None  # not listed before, older than the interval: unknown
    icmp = rows["1003"]
    assert icmp.source == "10.98.0.2 id 1003" and icmp.destination == "198.18.0.1"
    assert icmp.rate == 0.0


@pytest.mark.parametrize("sort, order", [
    ("rate", ["1000", "1004", "1002", "1003", "1001", "1005"]),  # unknown rates last
    ("packets", ["1000", "1004", "1002", "1003", "1001", "1005"]),  # ties: by bytes
    ("bytes", ["1005", "1000", "1004", "1002", "1003", "1001"]),
    ("duration", ["1005", "1001", "1000", "1003", "1004", "1002"]),
])
def test_sort_orders(sort, order):
    view = top.compute(*two_samples(), sort=sort, limit=50)
    assert [r.source.split(":")[-1].split()[-1] for r in view.flows] == order
    assert view.sort == sort


def test_limit_cuts_flows_tunnels_and_drops():
    view = top.compute(*two_samples(), sort="bytes", limit=2)
    assert len(view.flows) == 2 and view.flows_total == 6
    assert len(view.tunnels) == 2 and view.tunnels_total == 4
    assert len(view.drops) == 2


def test_unknown_sort_is_refused():
    with pytest.raises(ValueError, match="unknown sort 'speed'"):
        top.compute(None, two_samples()[1], sort="speed")


def test_one_sample_has_no_rates():
    view = top.compute(None, two_samples()[1])
    assert view.interval is None and view.drops_rate is None
    assert all(r.rate is None for r in view.flows)
    assert all(w.cpu is None and w.rate_in is None for w in view.workers)
    assert [r.source for r in view.flows][0] == "10.98.0.2:1005"  # by bytes among equals
    text = top.render_text(view)
    assert "one sample: no rates" in text


def test_drops_by_reason_with_rates_and_a_restarted_worker():
    view = top.compute(*two_samples(), limit=50)
    drops = {d.reason: (d.total, d.rate) for d in view.drops}
    # bad_version 3 -> 5; no_flow 10 -> 2: worker 1 restarted, its 2 are new; denied: new, 4.
    assert drops == {"bad_version": (5, 1.0), "no_flow": (2, 1.0), "denied": (4, 2.0)}
    assert [d.reason for d in view.drops] == ["denied", "bad_version", "no_flow"]
    assert view.drops_total == 11 and view.drops_rate == 4.0


def test_a_new_series_of_a_worker_missing_from_the_previous_scrape_is_no_increase():
    s1, s2 = two_samples()
    s2.metrics[("ipferry_drops_total", (("reason", "too_big"), ("worker", "7")))] = 1000
    drops = {d.reason: d.rate for d in top.compute(s1, s2, limit=50).drops}
    assert drops["too_big"] == 0.0


def test_workers():
    view = top.compute(*two_samples())
    w0, w1 = view.workers
    assert (w0.index, w0.pid, w0.state, w0.restarts, w1.restarts) == (0, 4352, "ready", 0, 1)
    assert w0.uptime == 2102.0 - 1001.0
    assert (w0.flows, w1.flows, w0.tunnels, w1.tunnels) == (5, 1, 2, 1)
    assert (w0.rate_in, w0.rate_out, w1.rate_in) == (2000.0, 4000.0, 0.0)
    assert w0.cpu == pytest.approx(50.0) and w1.cpu == 0.0
    assert (w0.drop_rate, w1.drop_rate) == (3.0, 1.0)
    assert view.flows_by_protocol == {"icmp": 1, "tcp": 5}
    # No flows_active series yet (a labelled series appears on first use): no flows, not unknown.
    assert [w.flows for w in top.compute(None, two_samples()[0]).workers] == [0, 0]


def test_a_worker_without_metrics_shows_none():
    s1, s2 = two_samples()
    st = status(workers=3)
    st["workers"][2].update(pid=None, state="backoff")
    s2 = top.Sample(**{**s2.__dict__, "status": st})
    w2 = top.compute(s1, s2).workers[2]
    assert (w2.pid, w2.state, w2.uptime, w2.flows, w2.tunnels, w2.rate_in, w2.cpu,
            w2.drop_rate) == (None, "backoff", None, None, None, None, None, None)


def test_tunnels_busiest_first():
    view = top.compute(*two_samples(), limit=50)
    got = [(t.worker, t.id, t.kind, t.rate_in, t.rate_out) for t in view.tunnels]
    assert got == [(0, 1, "tunnel", 100.0, 50.0), (0, 3, "tunnel", 20.0, 0.0),
                   (1, 1, "gue", 5.0, 0.0), (1, 2, "tunnel", 0.0, 0.0)]
    assert view.tunnels[0].where == "device=d1" and view.tunnels[2].where == "127.0.0.1:4000"


def test_notes():
    s1, s2 = two_samples(tenant="acme")
    s2 = top.Sample(**{**s2.__dict__, "flows_total": 9000, "workers_missing": [1]})
    notes = top.compute(s1, s2).notes
    assert notes == ["worker 1 did not answer in time: its flows are left out",
                     f"rates and order over the first {len(s2.flows)} of 9000 flows "
                     f"(--max-flows)",
                     "flows and tunnels of tenant acme only; workers and drops of all"]


# -- rendering ----------------------------------------------------------------------------------

def test_plain_text_snapshot():
    view = top.compute(*two_samples(), sort="rate", limit=3)
    text = top.render_text(view)
    assert ESC not in text and "─" not in text
    assert all(line == line.rstrip() for line in text.splitlines())
    lines = text.splitlines()
    assert lines[0] == ("ready: nsd ready, 2/2 workers ready (supervisor pid 4348, up 18m22s, "
                        "config built-in default)")
    assert lines[1] == ("nsd: pid 4350, ready, restarts 0; flows 6 (icmp 1, tcp 5); tunnels 4; "
                        "drops 11 (4/s); rates over 2.0s")
    assert "workers (2)" in lines
    assert re.search(r"^WORKER +PID +STATE +RESTARTS +UP +FLOWS +TUNNELS +IN/S +OUT/S +CPU "
                     r"+DROPS/S$", text, re.M)
    assert re.search(r"^ *0 +4352 +ready +0 +18m21s +5 +2 +2.0 KiB/s +3.9 KiB/s +50% +3$", text,
                     re.M)
    assert "drops by reason (3 shown)" in lines
    assert re.search(r"^denied +4 +2$", text, re.M)
    assert re.search(r"^bad_version +5 +1$", text, re.M)
    assert "tunnels: busiest 3 of 4 by packet rate" in lines
    assert re.search(r"^ *0 +1 +tunnel +tunnel +acme +device=d1 +100 +50 +300 +190$", text, re.M)
    assert "flows: busiest 3 of 6 by byte rate" in lines
    assert re.search(r"^TENANT +PROTO +SOURCE +DESTINATION +STATE +WORKER +RATE +UP/S +DOWN/S "
                     r"+PKT/S +BYTES +AGE$", text, re.M)
    assert re.search(r"^acme +tcp +10\.98\.0\.2:1000 +198\.18\.0\.1:9000 +established +0 "
                     r"+98\.6 KiB/s +1000 B/s +97\.7 KiB/s +110 +247\.1 KiB +12\.0s$", text, re.M)
    assert re.search(r"^acme +tcp +\[fd98::2\]:1004 +\[fd18::1\]:9000 ", text, re.M)
    assert "keys:" not in text


def test_long_names_are_not_cut_in_plain_text():
    s1, s2 = two_samples()
    tenant = "t" * 64
    s2.flows.append(flow(4242, up=1 << 40, down=0, packets=(1, 0), age=1.0, tenant=tenant,
                         src="fd98:1234:5678:9abc:def0:1234:5678:9abc", dst="fd18::1"))
    text = top.render_text(top.compute(s1, s2, sort="bytes", limit=1))
    assert f"{tenant} tcp [fd98:1234:5678:9abc:def0:1234:5678:9abc]:4242 [fd18::1]:9000" in \
        " ".join(text.split())
    assert "1.0 TiB" in text


def test_empty_daemon():
    api = FakeAPI(status=status(ready=False, workers=1), tunnels=[], flows=[], metrics="")
    text = top.render_text(top.compute(sample(api, 1.0), sample(api, 2.0)))
    assert text.startswith("NOT READY: nsd ready, 1/1 workers ready")
    for line in ("drops by reason: none", "tunnels: none", "flows: none"):
        assert line in text.splitlines()


def test_styled_view_for_a_terminal_has_the_keys_and_marks_the_sort():
    view = top.compute(*two_samples(), sort="duration", limit=5)
    buf = io.StringIO()
    Console(file=buf, force_terminal=True, width=200, color_system="standard").print(
        top.render(view, keys=True, error="cannot reach the admin API"))
    out = buf.getvalue()
    assert ESC in out and "─" in out
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert "keys: b byte rate  p packet rate  t bytes  d duration  q quit" in plain
    assert "error: cannot reach the admin API" in plain
    assert "flows: busiest 5 of 6 by duration" in plain
    assert re.search(r"\x1b\[1;7m *AGE", out)  # the sort column's header, highlighted


def test_narrow_terminal_cuts_long_cells_rather_than_wrapping():
    s1, s2 = two_samples()
    s2.flows.append(flow(4242, up=1 << 30, down=0, packets=(1, 0), age=1.0, tenant="t" * 64))
    buf = io.StringIO()
    Console(file=buf, force_terminal=True, width=100, color_system=None).print(
        top.render(top.compute(s1, s2, sort="bytes", limit=1)))
    row = next(line for line in buf.getvalue().splitlines() if "tttt" in line)
    assert "…" in row and len(row) <= 100


@pytest.mark.parametrize("value, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (5 * 1024 ** 2, "5.0 MiB"),
    (3 * 1024 ** 3, "3.0 GiB"), (2 * 1024 ** 5, "2048.0 TiB")])
def test_human_bytes(value, text):
    assert top.human_bytes(value) == text


@pytest.mark.parametrize("value, text", [
    (None, "-"), (0, "0"), (7, "7"), (2.54, "2.5"), (980.4, "980"), (12_345, "12.3k"),
    (4_100_000, "4.1M")])
def test_human_count(value, text):
    assert top.human_count(value) == text


@pytest.mark.parametrize("value, text", [
    (None, "-"), (0.04, "0.0s"), (59.9, "59.9s"), (61, "1m01s"), (3725, "1h02m"),
    (2 * 86400 + 3 * 3600 + 5, "2d03h")])
def test_human_duration(value, text):
    assert top.human_duration(value) == text


# -- the command --------------------------------------------------------------------------------

def test_help_explains_every_option():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    p = sub.choices["top"]  # type: ignore[attr-defined]
    dests = {a.dest for a in p._actions}
    assert {"once", "interval", "sort", "limit", "tenant", "max_flows", "admin", "token"} <= dests
    assert all(a.help for a in p._actions)
    text = " ".join(p.format_help().split())
    for words in ("b byte rate, p packet rate, t bytes so far, d duration; q quits",
                  "{rate,packets,bytes,duration}", "(default: 2.0;", "(default: 20)",
                  "(default: 10000)", "plain text when not a terminal"):
        assert words in text, words


def run_cli(monkeypatch, capsys, api: FakeAPI | None, *argv: str) -> tuple[int, str, str]:
    from ipferry.supervisor import adminclient

    def fake_call(target, method, path, token=None, timeout=10.0):
        if api is None:
            raise adminclient.AdminClientError(f"cannot reach the admin API at {target}: "
                                               f"[Errno 2] No such file or directory")
        return api(method, path)

    monkeypatch.setattr(adminclient, "call", fake_call)
    monkeypatch.setattr(top.time, "sleep", lambda s: None)
    code = cli.main(["top", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_once_prints_plain_text_into_a_pipe(monkeypatch, capsys):
    s1, s2 = two_samples()
    api = FakeAPI(status=status(), tunnels=[], flows=s2.flows, metrics="")
    code, out, err = run_cli(monkeypatch, capsys, api, "--once", "--sort",
                             "duration", "--limit", "2", "--admin", "/x/admin.sock")
    assert (code, err) == (0, "")
    assert ESC not in out and "flows: busiest 2 of 6 by duration" in out
    assert len([p for p in api.paths if p == "/api/status"]) == 2  # two samples for the rates


def test_once_with_interval_0_takes_one_sample(monkeypatch, capsys):
    api = FakeAPI(status=status(), tunnels=[], flows=[], metrics="")
    code, out, _ = run_cli(monkeypatch, capsys, api, "--once", "--interval", "0")
    assert code == 0 and "one sample: no rates" in out
    assert api.paths.count("/api/status") == 1


def test_once_without_a_daemon_says_so(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, None, "--once", "--admin", "/nope/admin.sock")
    assert (code, out) == (1, "")
    assert err.startswith("ipferry: cannot reach the admin API at /nope/admin.sock")


@pytest.mark.parametrize("argv, message", [
    (["--interval", "0"], "--interval 0.0: must be above 0"),
    (["--once", "--interval", "-1"], "--interval -1.0: must be above 0 (with --once, 0 or more)"),
    (["--once", "--limit", "0"], "--limit 0: must be at least 1"),
    (["--once", "--max-flows", "0"], "--max-flows 0: must be at least 1"),
    ([], "standard output is not a terminal: use --once"),  # capsys: not a terminal
])
def test_bad_arguments(monkeypatch, capsys, argv, message):
    code, out, err = run_cli(monkeypatch, capsys, None, *argv)
    assert code == 2 and out == "" and f"ipferry top: {message}" in err


def test_bad_sort_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["top", "--sort", "speed"])
    assert exc.value.code == 2
    assert "invalid choice: 'speed'" in capsys.readouterr().err


# -- the live view ------------------------------------------------------------------------------

def test_live_view_keys_in_a_pseudo_terminal():
    """The loop in cbreak mode on a pty: it draws, re-sorts on a key at once, quits on q, and
    leaves the terminal as it found it."""
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    out = open(slave, "w", closefd=False)
    console = Console(file=out, force_terminal=True, width=160, height=60,
                      color_system="standard")
    s1, s2 = two_samples()
    samples = iter([top.TopError("cannot reach the admin API at x"), s1, s2])
    calls = []

    def source() -> top.Sample:
        calls.append(time.monotonic())
        item = next(samples, s2)
        if isinstance(item, Exception):
            raise item
        return item

    screen = bytearray()
    stop = threading.Event()

    def reader() -> None:
        import select
        while not stop.is_set():
            if select.select([master], [], [], 0.05)[0]:
                try:
                    screen.extend(os.read(master, 65536))
                except OSError:
                    return

    def seen(text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in re.sub(rb"\x1b\[[0-9;?]*[a-zA-Z]", b"", bytes(screen)):
            assert time.monotonic() < deadline, f"{text!r} not on the screen: {bytes(screen)!r}"
            time.sleep(0.02)

    def typist() -> None:
        seen("rates over 2.0s")  # the third sample: rates from the first two
        seen("by byte rate")
        os.write(master, b"d")
        seen("by duration")
        os.write(master, b"x")  # not a key: ignored
        os.write(master, b"q")

    threads = [threading.Thread(target=reader, daemon=True),
               threading.Thread(target=typist, daemon=True)]
    for t in threads:
        t.start()
    try:
        started = time.monotonic()
        code = top.live(source, console, keys_fd=slave, interval=0.2, sort="rate", limit=5)
        assert code == 0 and time.monotonic() - started < 15
        threads[1].join(5)
        assert not threads[1].is_alive()
        deadline = time.monotonic() + 5  # the reader: up to the alternate screen's end
        while b"\x1b[?1049l" not in screen and time.monotonic() < deadline:
            time.sleep(0.02)
        text = re.sub(rb"\x1b\[[0-9;?]*[a-zA-Z]", b"", bytes(screen)).decode(errors="replace")
        assert "error: cannot reach the admin API at x" in text  # before the first sample
        assert "keys: b byte rate" in text and "rates over 2.0s" in text
        assert termios.tcgetattr(slave) == before  # cbreak undone
        assert b"\x1b[?1049h" in screen and b"\x1b[?1049l" in screen  # alternate screen, left
    finally:
        stop.set()
        threads[0].join(5)
        out.close()
        os.close(slave)
        os.close(master)


def test_read_keys_without_a_terminal_waits_out_the_interval():
    started = time.monotonic()
    assert top.read_keys(None, 0.05) == ""
    assert time.monotonic() - started >= 0.05
