"""Bad input on tunnels: a broken context closes that tunnel only; garbage is dropped and counted
while real traffic on another tunnel goes on; hooks that fail drop their flow, not the worker."""

from __future__ import annotations

import json
import os
import random
import socket
import textwrap
import threading
import time

import dpkt

from tests.e2e.dataplane import SERVER_ADDR, STREAMS, audit_records, config, connect, stream_client
from tests.helpers import wait_for


def open_tunnel(d, context: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(d.runtime_dir / "tunnel.sock"))
    s.send(context)
    return s


def drops(d) -> dict[str, float]:
    out: dict[str, float] = {}
    for (name, labels), v in d.metrics().items():
        if name == "ipferry_drops_total":
            reason = dict(labels)["reason"]
            out[reason] = out.get(reason, 0) + v
    return out


def garbage(rng: random.Random) -> bytes:
    """Random bytes, truncated or corrupted real packets, fragments, bad versions."""
    syn = bytes(dpkt.ip.IP(src=b"\x0a\0\0\x09", dst=b"\xc6\x12\0\x01", p=6, ttl=64,
                           data=dpkt.tcp.TCP(sport=rng.randrange(1024, 65535), dport=9,
                                             flags=dpkt.tcp.TH_ACK)))
    kind = rng.randrange(5)
    if kind == 0:
        return os.urandom(rng.randrange(1, 100))
    if kind == 1:
        return syn[:rng.randrange(1, len(syn))]
    if kind == 2:
        b = bytearray(syn)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 3:
        return syn[:6] + b"\x20\x00" + syn[8:]  # a fragment
    return bytes([0x50 | rng.randrange(16)]) + syn[1:]  # version 5


def test_bad_context_closes_that_tunnel_only(daemon_factory, streams, tmp_path):
    d = daemon_factory("--workers", "2", config=config(tmp_path))
    bad = [open_tunnel(d, b"not json"), open_tunnel(d, b'{"no": "tenant"}'),
           open_tunnel(d, b"[1, 2]")]
    for s in bad:
        s.settimeout(5)
        assert s.recv(100) == b"", "the daemon closed the tunnel"
        s.close()
    good = open_tunnel(d, b'{"tenant": "acme"}')
    wait_for(lambda: len(d.get_json("/api/tunnels")) == 1, 5, "the good tunnel to be listed")
    t = d.get_json("/api/tunnels")[0]
    assert t["tenant"] == "acme" and t["onramp"] == "tunnel"
    m = d.metrics()
    closed = sum(v for (n, labels), v in m.items() if n == "ipferry_tunnels_closed_total"
                 and ("reason", "bad_context") in labels)
    assert closed == 3
    good.close()
    assert stream_client(d, "get", 100000)["bytes"] == 100000  # the daemon serves on


def test_garbage_is_dropped_and_counted_while_a_transfer_runs(daemon_factory, streams, tmp_path):
    d = daemon_factory("--workers", "2", config=config(tmp_path))
    rng = random.Random(1234)
    packets = [garbage(rng) for _ in range(10_000)]
    result: dict = {}

    def transfer():
        result.update(stream_client(d, "get", 50 << 20))

    t = threading.Thread(target=transfer)
    t.start()
    noisy = open_tunnel(d, b'{"tenant": "noise"}')
    for p in packets:
        noisy.send(p)
    t.join(240)
    assert result.get("bytes") == 50 << 20, result
    total = wait_for(lambda: (n := sum(drops(d).values())) >= 10_000 and n, 15,
                     "10,000 drops counted")
    reasons = drops(d)
    assert {"truncated", "fragment", "bad_version"} <= reasons.keys(), reasons
    assert total >= 10_000
    # Valid-looking non-SYN packets of unknown flows were answered with resets, not forwarded.
    noisy.settimeout(2)
    answers = []
    try:
        while True:
            answers.append(noisy.recv(65536))
    except (TimeoutError, OSError):
        pass
    assert all(dpkt.ip.IP(a).data.flags & dpkt.tcp.TH_RST for a in answers)
    noisy.close()
    statuses = [w["restarts"] for w in d.workers()]
    assert statuses == [0, 0], "no worker died"


FAILING_APP = textwrap.dedent("""\
    import asyncio
    from ipferry.worker.app import Decision, RulesApplication

    class App(RulesApplication):
        async def on_flow_start(self, flow):
            await asyncio.sleep(0)  # hooks may be async
            if flow.dport == 9000 and flow.context.extra.get("explode"):
                raise RuntimeError("boom")
            if flow.dport == 9001:
                return Decision.upgrade(("198.18.0.1", 9000), "rerouted")
            return await asyncio.sleep(0, Decision.upgrade())
    """)


def test_hook_errors_drop_the_flow_and_async_hooks_decide(daemon_factory, streams, tmp_path):
    (tmp_path / "myapp.py").write_text(FAILING_APP)
    d = daemon_factory("--workers", "1", config=config(tmp_path, '[app]\nclass = "myapp:App"\n'),
                       env={"PYTHONPATH": str(tmp_path)})
    res = connect(d, "python3", STREAMS, "get", SERVER_ADDR, "9000", "10")
    assert res.returncode == 0  # no explode in this context: served
    res = connect(d, "python3", STREAMS, "get", SERVER_ADDR, "9000", "10",
                  context='{"explode": true}')
    assert res.returncode != 0 and b"ConnectionRefused" in res.stderr + res.stdout, res
    assert drops(d).get("hook_error") == 1
    # Re-routed by the async hook: port 9001 (nothing listens) reaches the server on 9000.
    res = connect(d, "python3", STREAMS, "get", SERVER_ADDR, "9001", "10")
    assert res.returncode == 0 and json.loads(res.stdout)["bytes"] == 10
    assert d.workers()[0]["restarts"] == 0


def test_connect_ends_its_command_when_the_daemon_closes_the_tunnel(daemon_factory, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path))
    started = time.monotonic()
    res = connect(d, "sleep", "60", tenant="")  # the default application refuses it
    assert res.returncode == 1
    # (It passes its TUN only once the context is accepted: the refusal comes before CMD runs.)
    assert res.stderr.decode().strip() == (
        "ipferry connect: the daemon closed the tunnel: it refused the context (see its log: "
        "tunnel_refused says why)")
    assert time.monotonic() - started < 10


def test_idle_flow_expires_releases_its_slot_and_is_reset(daemon_factory, streams, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path, "[flows]\ntcp_established = 1\n"))
    assert stream_client(d, "idle", 3) == {"outcome": "reset"}
    ends = [r for r in audit_records(tmp_path / "audit.jsonl") if r["audit"] == "flow_end"]
    assert ends[0]["close_reason"] == "idle_timeout"
    m = d.metrics()
    assert m[("ipferry_nat_slots_in_use", (("worker", "0"),))] == 0
    # (The reset is the kernel's own, of the aborted upgraded socket, passed on to the client
    # after the flow ended: see FlowEngine.cut; a late segment would meet no flow and be reset.)


END_APP = textwrap.dedent("""\
    import json, os
    from ipferry.worker.app import RulesApplication

    class App(RulesApplication):
        def on_flow_end(self, flow):
            with open(os.environ["FLOW_END_FILE"], "a") as f:
                f.write(json.dumps({"dport": flow.start.dport, "bytes": flow.payload_bytes,
                                    "reason": flow.close_reason}) + "\\n")
    """)


def test_on_flow_end_hears_every_flow(daemon_factory, streams, tmp_path):
    (tmp_path / "endapp.py").write_text(END_APP)
    out = tmp_path / "ends.jsonl"
    d = daemon_factory("--workers", "2", config=config(tmp_path, '[app]\nclass = "endapp:App"\n'),
                       env={"PYTHONPATH": str(tmp_path), "FLOW_END_FILE": str(out)})
    assert stream_client(d, "get", 5000)["bytes"] == 5000
    ends = wait_for(lambda: out.exists() and [json.loads(x) for x in out.read_text().splitlines()], 10,
                    "on_flow_end")
    assert ends == [{"dport": 9000, "bytes": [len("GET 5000\n"), 5000], "reason": "fin"}]


def test_another_tunnel_cannot_reset_a_flow(daemon_factory, streams, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path))
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(
        stream_client(d, "get", 60 << 20, address="10.98.5.5")))
    t.start()
    flow = wait_for(lambda: d.get_json("/api/flows")["flows"], 30, "the flow")[0]
    attacker = open_tunnel(d, b'{"tenant": "acme"}')
    for seq in range(0, 1 << 32, 1 << 28):  # blind resets across the sequence space
        rst = dpkt.ip.IP(src=socket.inet_aton("10.98.5.5"), dst=socket.inet_aton(SERVER_ADDR),
                         p=6, ttl=64, data=dpkt.tcp.TCP(sport=flow["sport"], dport=9000, seq=seq,
                                                        flags=dpkt.tcp.TH_RST))
        rst.len = 40
        attacker.send(bytes(rst))
    t.join(120)
    attacker.close()
    assert result.get("bytes") == 60 << 20, result
    assert drops(d).get("tunnel_mismatch") == 16
