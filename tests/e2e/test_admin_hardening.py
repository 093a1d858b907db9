"""The admin API under hostile or careless use: authorization before routing, strict JSON whatever
the contexts hold, and paging through tens of thousands of flows without hurting a worker."""

from __future__ import annotations

import json
import socket
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import dpkt

from ipferry.wire.sharding import owner
from tests.e2e.dataplane import SERVER_ADDR, config
from tests.e2e.test_tunnels import open_tunnel
from tests.helpers import wait_for


def test_the_token_is_checked_before_routing(daemon_factory):
    token = "s3cret-token-0123456789"
    d = daemon_factory("--workers", "1", config=f'[admin]\ntoken = "{token}"\n')
    http = d.netns.http
    for method, path in [("POST", "/nope"), ("DELETE", "/api/workers/0/restart"),
                         ("PUT", "/api/flows"), ("PATCH", "/api/reload"), ("DELETE", "/"),
                         ("POST", "/api/workers/zz/restart")]:
        status, body = http(method, "127.0.0.1", 9180, path)
        assert status == 401 and b"bearer token" in body, (method, path, status, body)
        status, _ = http(method, "127.0.0.1", 9180, path, {"Authorization": "Bearer nope"})
        assert status == 401, (method, path)
    auth = {"Authorization": f"Bearer {token}"}
    # With the token, routing answers as usual.
    assert http("POST", "127.0.0.1", 9180, "/nope", auth)[0] == 404
    assert http("DELETE", "127.0.0.1", 9180, "/api/workers/0/restart", auth)[0] == 405
    assert http("POST", "127.0.0.1", 9180, "/api/workers/zz/restart", auth)[0] == 404
    # Reads stay open; OPTIONS is a read.
    assert http("GET", "127.0.0.1", 9180, "/nope")[0] == 404
    assert http("OPTIONS", "127.0.0.1", 9180, "/api/flows")[0] in (200, 405)
    # Over the unix socket (mode 0600) no token is needed, for routing errors either.
    assert d.request("POST", "/nope")[0] == 404
    assert d.request("DELETE", "/api/workers/0/restart")[0] == 405
    assert d.workers()[0]["restarts"] == 0


def test_without_a_configured_token_any_tcp_mutation_is_forbidden(daemon_factory):
    d = daemon_factory("--workers", "1")
    for method, path in [("POST", "/nope"), ("DELETE", "/api/workers/0/restart")]:
        status, body = d.netns.http(method, "127.0.0.1", 9180, path)
        assert status == 403 and b"admin.token" in body, (method, path, status)
    assert json.loads(d.netns.http("GET", "127.0.0.1", 9180, "/api/workers")[1])[0]["index"] == 0


HOLD_APP = textwrap.dedent("""\
    import asyncio
    from ipferry.worker.app import RulesApplication

    class App(RulesApplication):
        async def on_flow_start(self, flow):
            # Undecided for good: the flow stays in the table (as SYN_SENT, awaiting a decision)
            # whatever the TCP path does with a decided one, and holds no socket.
            await asyncio.Event().wait()
    """)
PER_WORKER = 20_000


def syns(per_bucket: int) -> dict[tuple[str, int], list[bytes]]:
    """SYNs from distinct sources, ``per_bucket`` for each (tenant, owning worker) of 2."""
    buckets: dict[tuple[str, int], list[bytes]] = {(t, w): [] for t in ("acme", "beta")
                                                   for w in (0, 1)}
    dst = socket.inet_aton(SERVER_ADDR)
    i = 0
    while any(len(b) < per_bucket for b in buckets.values()):
        i += 1
        src, sport = socket.inet_aton(f"10.98.{i // 50_000}.{1 + i % 200}"), 1024 + i % 50_000
        tenant = "acme" if i % 2 else "beta"
        bucket = buckets[(tenant, owner(6, src, sport, dst, 9, 2))]
        if len(bucket) < per_bucket:
            ip = dpkt.ip.IP(src=src, dst=dst, p=6, ttl=64, data=dpkt.tcp.TCP(
                sport=sport, dport=9, seq=i, flags=dpkt.tcp.TH_SYN))
            ip.len = 40
            bucket.append(bytes(ip))
    return buckets


def flow_id(row: dict) -> tuple:
    return row["tenant"], row["src"], row["sport"]


def page_through(d, query: str = "", cursor: bool = True, between=None) -> list[dict]:
    rows, offset, after, pages = [], 0, None, 0
    while True:
        if cursor:
            page = d.get_json(f"/api/flows?limit=200{query}" + (f"&after={after}" if after else ""))
        else:
            page = d.get_json(f"/api/flows?limit=200&offset={offset}{query}")
        assert page["workers_missing"] == [] and page["limit"] == 200
        rows += page["flows"]
        offset += len(page["flows"])
        pages += 1
        if between:
            between(pages)
        if cursor:
            if page["next"] is None:
                return rows
            after = page["next"]
        elif not page["flows"]:
            return rows


def test_paging_through_40000_flows_hurts_no_worker(daemon_factory, tmp_path):
    (tmp_path / "holdapp.py").write_text(HOLD_APP)
    d = daemon_factory("--workers", "2", config=config(tmp_path, textwrap.dedent("""\
        [app]
        class = "holdapp:App"
        [flows]
        # Set: the default would be what the fd limit holds for relayed flows (these hold none).
        max_per_worker = 50000
        max_per_tenant = 50000
        tcp_syn_sent = 600
        """)), env={"PYTHONPATH": str(tmp_path)})
    pids = [w["pid"] for w in d.workers()]
    buckets = syns(PER_WORKER // 2)
    tunnels = {t: open_tunnel(d, json.dumps({"tenant": t, "n": 1}).encode())
               for t in ("acme", "beta")}
    wait_for(lambda: len(d.get_json("/api/tunnels")) == 2, 10, "the tunnels to open")
    for (tenant, _), packets in buckets.items():
        for packet in packets:
            tunnels[tenant].send(packet)
    wait_for(lambda: d.get_json("/api/flows?limit=1")["total"] == 2 * PER_WORKER, 60,
             "40,000 flows in the tables", interval=0.5)
    for tenant in ("acme", "beta"):
        assert d.get_json(f"/api/flows?limit=1&tenant={tenant}")["total"] == PER_WORKER
    owners = {(t, socket.inet_ntoa(p[12:16]), int.from_bytes(p[20:22], "big")): w
              for (t, w), packets in buckets.items() for p in packets}
    expected = set(owners)

    # The request that used to kill both workers (one ~250 KB control message).
    page = d.get_json("/api/flows?offset=850&limit=100")
    assert len(page["flows"]) == 100 and page["total"] == 2 * PER_WORKER

    # By offset: worker 0's flows in start order, then worker 1's.
    t0 = time.monotonic()
    rows = page_through(d, cursor=False)
    by_offset = time.monotonic() - t0
    assert len(rows) == len(expected) and {flow_id(r) for r in rows} == expected
    assert [r["worker"] for r in rows] == sorted(r["worker"] for r in rows)
    assert all(owners[flow_id(r)] == r["worker"] for r in rows)
    for w in (0, 1):
        seqs = [r["seq"] for r in rows if r["worker"] == w]
        assert seqs == sorted(seqs) and len(seqs) == PER_WORKER

    # By cursor, every flow exactly once.
    t0 = time.monotonic()
    rows = page_through(d)
    by_cursor = time.monotonic() - t0
    assert len(rows) == len(expected) and {flow_id(r) for r in rows} == expected

    # A page costs the same at any depth.
    def timed(path: str) -> float:
        t0 = time.perf_counter()
        for _ in range(10):
            assert len(d.get_json(path)["flows"]) == 200
        return (time.perf_counter() - t0) / 10

    first = timed("/api/flows?limit=200&offset=0")
    deepest = timed(f"/api/flows?limit=200&offset={2 * PER_WORKER - 200}")
    print(f"\n40,000 flows: 200 pages by offset {by_offset:.2f}s, by cursor {by_cursor:.2f}s; "
          f"a page at offset 0 {first * 1000:.1f} ms, at {2 * PER_WORKER - 200} "
          f"{deepest * 1000:.1f} ms")
    assert deepest < 3 * first + 0.05, (first, deepest)

    # Paging by cursor is stable while flows end: close beta's tunnel half-way through acme's.
    def close_beta(pages: int) -> None:
        if pages == 25:
            tunnels.pop("beta").close()
            wait_for(lambda: d.get_json("/api/flows?limit=1")["total"] == PER_WORKER, 30,
                     "beta's flows to end")

    rows = page_through(d, between=close_beta)
    acme = [flow_id(r) for r in rows if r["tenant"] == "acme"]
    assert len(acme) == len(set(acme)) == PER_WORKER
    assert len({flow_id(r) for r in rows}) == len(rows)
    rows = page_through(d, "&tenant=acme")
    assert {flow_id(r) for r in rows} == {f for f in expected if f[0] == "acme"}

    # Many admin requests at once, large answers included: every one served, no worker hurt.
    paths = ([f"/api/flows?limit=200&offset={o}" for o in range(0, PER_WORKER, 1000)]
             + ["/api/tunnels", "/metrics", "/api/flows?limit=200&tenant=acme"] * 5)
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda path: d.request("GET", path)[0], paths))
    assert statuses == [200] * len(paths)
    assert d.get_json("/api/flows?offset=100000")["flows"] == []
    for bad in ("after=xyz", "after=" + "A" * 200, "after=MC4wLjA&offset=3", "limit=0"):
        assert d.request("GET", f"/api/flows?{bad}")[0] == 400, bad
    assert [(w["pid"], w["restarts"], w["state"]) for w in d.workers()] == [
        (pid, 0, "ready") for pid in pids]
    tunnels["acme"].close()


def strict_json(body: bytes):
    def refuse(name):
        raise ValueError(f"{name} is not strict JSON")

    return json.loads(body, parse_constant=refuse)


def every_api_answer_is_strict_json(d) -> dict:
    out = {}
    for path in ("/api/status", "/api/workers", "/api/mesh", "/api/flows", "/api/flows?limit=200",
                 "/api/tunnels"):
        status, body = d.request("GET", path)
        assert status == 200, (path, status, body)
        out[path] = strict_json(body)
    return out


HOSTILE = [
    b'{"tenant": "ac\\u0000me"}', b'{"tenant": "ac\\u001b[2Jme"}', b'{"tenant": "acme\\n"}',
    b'{"tenant": "acme", "tenant": "root"}', b'{"tenant": "acme", "x": NaN}',
    b'{"tenant": "acme", "x": Infinity}', b'{"tenant": "acme", "x": 1e999}',
    b'{"tenant": "acme", "pad": "' + b"x" * 5000 + b'"}', b'{"tenant": "' + b"t" * 65 + b'"}',
    b'{"tenant": "acme", "deep": ' + b"[" * 3000 + b"]" * 3000 + b"}",
    '{"tenant": "caf\u00e9"}'.encode(), b'{"tenant": "acme"} trailing',
]


def closed_tunnels(d, reason: str) -> float:
    return sum(v for (n, labels), v in d.metrics().items()
               if n == "ipferry_tunnels_closed_total" and ("reason", reason) in labels)


def test_hostile_contexts_are_refused_with_a_reason(daemon_factory, tmp_path):
    d = daemon_factory("--workers", "2", config=config(tmp_path))
    for raw in HOSTILE:
        s = open_tunnel(d, raw)
        s.settimeout(5)
        assert s.recv(100) == b"", raw[:40]
        s.close()
    assert closed_tunnels(d, "bad_context") == len(HOSTILE)
    reasons = [e["reason"] for e in d.log_events() if e.get("event") == "tunnel_refused"]
    assert len(reasons) == len(HOSTILE)
    assert sum("tenant" in r for r in reasons) >= 4 and any("duplicate key" in r for r in reasons)
    assert any("NaN" in r for r in reasons) and any("over 4096" in r for r in reasons)
    good = open_tunnel(d, '{"tenant": "acme", "name": "caf\u00e9", "n": 1.5}'.encode())
    wait_for(lambda: len(d.get_json("/api/tunnels")) == 1, 10, "the good tunnel")
    answers = every_api_answer_is_strict_json(d)
    assert answers["/api/tunnels"][0]["context"] == {"name": "caf\u00e9", "n": 1.5}
    good.close()
    assert [w["restarts"] for w in d.workers()] == [0, 0]


ODD_APP = textwrap.dedent("""\
    import json
    from ipferry.worker.app import TunnelContext, RulesApplication

    class Odd:
        def __str__(self):
            return "odd"

    class App(RulesApplication):
        def parse_context(self, raw):
            size = json.loads(raw)["size"]
            loop = {}
            loop["loop"] = loop
            return TunnelContext("acme", {"nan": float("nan"), "inf": [float("-inf")],
                                          "odd": Odd(), "set": {1}, "bytes": b"x", 7: None,
                                          "loop": loop, "pad": "p" * size})
    """)


def test_odd_contexts_of_an_application_still_give_strict_json(daemon_factory, tmp_path,
                                                                 streams):
    (tmp_path / "oddapp.py").write_text(ODD_APP)
    d = daemon_factory("--workers", "2", config=config(tmp_path, '[app]\nclass = "oddapp:App"\n'),
                       env={"PYTHONPATH": str(tmp_path)})
    small, big = open_tunnel(d, b'{"size": 10}'), open_tunnel(d, b'{"size": 100000}')
    wait_for(lambda: len(d.get_json("/api/tunnels")) == 2, 10, "both tunnels")
    dst = socket.inet_aton(SERVER_ADDR)
    for sport in range(20000, 20016):  # flows on both workers: the context crosses the mesh
        ip = dpkt.ip.IP(src=socket.inet_aton("10.98.0.7"), dst=dst, p=6, ttl=64,
                        data=dpkt.tcp.TCP(sport=sport, dport=9000, flags=dpkt.tcp.TH_SYN))
        ip.len = 40
        small.send(bytes(ip))
    wait_for(lambda: d.get_json("/api/flows")["total"] == 16, 10, "16 flows")
    answers = every_api_answer_is_strict_json(d)
    rows = sorted(answers["/api/tunnels"], key=lambda t: t["context"] is None)
    assert rows[0]["context"]["nan"] == "nan" and rows[0]["context"]["inf"] == ["-inf"]
    assert rows[0]["context"]["odd"] == "odd" and rows[0]["context"]["7"] is None
    assert rows[1]["context"] is None and rows[1]["context_omitted"] > 100000
    status, body = d.request("GET", "/metrics")
    assert status == 200
    owners = {f["worker"] for f in d.get_json("/api/flows")["flows"]}
    assert owners == {0, 1}  # so the odd context crossed the mesh, made strict on the way
    assert not [e for e in d.log_events() if e.get("event") == "loop_exception"]
    small.close()
    big.close()
    assert [w["restarts"] for w in d.workers()] == [0, 0]


def test_thousands_of_tunnels_with_contexts_are_listed_in_parts(daemon_factory, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path))
    pid = d.workers()[0]["pid"]
    n, pad = 9000, "c" * 2000  # ~18 MB of rows from one worker: ~190 parts
    socks = []
    try:
        for i in range(n):
            socks.append(open_tunnel(d, json.dumps({"tenant": f"t{i % 50}", "i": i,
                                                    "pad": pad}).encode()))
        rows = wait_for(lambda: (t := d.get_json("/api/tunnels")) and len(t) == n and t, 60,
                        f"{n} tunnels listed", interval=1)
        assert sorted(r["context"]["i"] for r in rows) == list(range(n))
        assert all(r["context"]["pad"] == pad and r["worker"] == 0 for r in rows)
        assert len({r["id"] for r in rows}) == n
        assert d.request("GET", "/metrics")[0] == 200
    finally:
        for s in socks:
            s.close()
    assert [(w["pid"], w["restarts"]) for w in d.workers()] == [(pid, 0)]


def test_over_tcp_only_loopback_names_are_served(daemon_factory):
    """DNS rebinding: a page whose own name resolves to 127.0.0.1 must not read the API as
    same-origin. Over TCP the Host header must name loopback; the unix socket is not a web
    origin and answers whatever Host says."""
    d = daemon_factory("--workers", "1")
    for host in ("evil.example", "evil.example:9180", "10.0.0.1:9180", "127.0.0.1.evil.example",
                 "localhost.evil.example:9180"):
        status, body = d.netns.http("GET", "127.0.0.1", 9180, "/api/status", {"Host": host})
        assert status == 421 and b"localhost" in body, (host, status, body)
    for host in ("127.0.0.1:9180", "localhost:9180", "LOCALHOST", "127.1.2.3", "[::1]:9180"):
        status, _ = d.netns.http("GET", "127.0.0.1", 9180, "/api/status", {"Host": host})
        assert status == 200, (host, status)
    assert d.request("GET", "/api/status", {"Host": "evil.example"})[0] == 200  # unix socket
