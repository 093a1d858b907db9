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

from tests.e2e.dataplane import SERVER_ADDR, STREAMS, config, connect, stream_client
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
    assert res.stderr.decode().strip() == (
        "ipferry connect: the daemon closed the tunnel (a refused context, or it stopped; "
        "see its log)")
    assert time.monotonic() - started < 10
