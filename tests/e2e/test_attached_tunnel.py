"""A connected tunnel whose client passes its TUN (ipferry.worker.attached): the handshake, the
fds checked before use, a bad attach closing that tunnel only, and the end (linger after "done",
at once when the client is killed). Real TUN devices, made in a user+net namespace of their own
(``unshare``, needs root here or unprivileged user namespaces)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from ipferry.wire.vnet import ATTACH_MAGIC, TUNNEL_MAGIC
from ipferry.worker import metrics
from ipferry.worker.attached import AttachedTunnel
from ipferry.worker.onramps.seqpacket import SeqpacketOnramp
from tests.worker.test_onramps import Log, listen, until, wiring

MAKE_TUN = textwrap.dedent("""
    import socket, sys
    from ipferry.nsd.tun import open_tun
    queues, vnet, fd = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
    fds = [open_tun("t0", vnet, multi_queue=queues > 1)[0] for _ in range(queues)]
    socket.send_fds(socket.socket(fileno=fd), [b"tun"], fds)
""")


def make_tun(queues: int = 1, vnet: bool = True) -> list[int]:
    """``queues`` fds of a fresh TUN device in a namespace of its own (it lives while they do)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        res = subprocess.run(["unshare", "--user", "--net", "--map-root-user", sys.executable, "-c",
                              MAKE_TUN, str(queues), "1" if vnet else "0", str(theirs.fileno())],
                             pass_fds=[theirs.fileno()], capture_output=True, timeout=30)
        assert res.returncode == 0, f"cannot make a TUN in a user namespace: {res.stderr!r}"
        _, fds, _, _ = socket.recv_fds(ours, 16, 64)
    assert len(fds) == queues
    return fds


def attach_client(path, vnet: bool = True) -> tuple[socket.socket, int]:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client.connect(str(path))
    client.send(ATTACH_MAGIC + (TUNNEL_MAGIC if vnet else b"") + b"ctx")
    client.settimeout(5)
    return client, json.loads(client.recv(100))["queues"]


def run_onramp(tmp_path, body) -> tuple[Log, list]:
    log, closed = Log(), []

    async def main() -> None:
        listener = listen(tmp_path / "t.sock")
        onramp = SeqpacketOnramp("t", listener, wiring(log, closed=closed))
        onramp.start()
        try:
            await body(onramp, closed)
        finally:
            await onramp.stop()
            listener.close()

    asyncio.run(main())
    return log, closed


def test_a_client_passes_its_queues_and_the_tunnel_lingers_after_done(tmp_path):
    async def body(onramp, closed) -> None:
        client, queues = await asyncio.to_thread(attach_client, tmp_path / "t.sock")
        assert queues == 4  # one per worker (the wiring's settings say 4)
        fds = make_tun(queues)
        before = metrics.TUN_QUEUES._value.get()
        socket.send_fds(client, [b"tun"], fds)
        for fd in fds:
            os.close(fd)
        (tunnel,) = onramp.tunnels()
        assert isinstance(tunnel, AttachedTunnel)
        await until(lambda: tunnel.attached)
        # No other worker here (share_queues None): this one reads every queue.
        assert metrics.TUN_QUEUES._value.get() == before + 4
        assert tunnel.as_dict()["attached"] == 4 and tunnel.vnet and tunnel.tenant == "acme"
        client.send(b"done")
        await until(lambda: closed)
        assert closed == [(tunnel, "closed_by_peer")] and tunnel.closed
        assert metrics.TUN_QUEUES._value.get() == before
        client.close()

    log, _ = run_onramp(tmp_path, body)
    assert [(e["queues"], e["shared"]) for e in log.named("tunnel_attached")] == [(4, 0)]


@pytest.mark.parametrize("what, reason", [
    ("pipe", "a passed fd is not an attached TUN queue"),
    ("plain-tun", "a passed fd is virtio-net headers missing (the tunnel asked for offload)"),
    ("no-fds", "expected the message 'tun' with the TUN's queues"),
    ("too-many", "more than 64 queues"),
])
def test_a_bad_attach_closes_that_tunnel_only(tmp_path, what, reason):
    async def body(onramp, closed) -> None:
        other, _ = await asyncio.to_thread(attach_client, tmp_path / "t.sock")
        client, _ = await asyncio.to_thread(attach_client, tmp_path / "t.sock")
        await until(lambda: len(onramp.tunnels()) == 2)
        if what == "pipe":
            r, w = os.pipe()
            socket.send_fds(client, [b"tun"], [r])
            os.close(r)
            os.close(w)
        elif what == "plain-tun":
            (fd,) = make_tun(1, vnet=False)
            socket.send_fds(client, [b"tun"], [fd])
            os.close(fd)
        elif what == "no-fds":
            client.send(b"tun")
        else:
            r, w = os.pipe()
            socket.send_fds(client, [b"tun"], [r] * 65)
            os.close(r)
            os.close(w)
        await until(lambda: closed)
        assert [r for _, r in closed] == ["bad_attach"]
        assert await asyncio.to_thread(client.recv, 100) == b""  # closed: the client sees EOF
        assert len(onramp.tunnels()) == 1 and closed[0][0] not in onramp.tunnels()
        other.close()
        client.close()

    log, _ = run_onramp(tmp_path, body)
    refused = [e["reason"] for e in log.named("tunnel_refused")]
    assert len(refused) == 1 and refused[0].startswith(reason), refused


def test_a_killed_client_closes_its_tunnel_at_once(tmp_path):
    async def body(onramp, closed) -> None:
        client, _ = await asyncio.to_thread(attach_client, tmp_path / "t.sock", False)
        fds = make_tun(1, vnet=False)
        socket.send_fds(client, [b"tun"], fds)
        os.close(fds[0])
        (tunnel,) = onramp.tunnels()
        await until(lambda: tunnel.attached)
        client.close()  # no "done": nothing to linger for
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await until(lambda: closed)
        assert closed == [(tunnel, "closed_by_peer")]
        assert loop.time() - t0 < 0.09  # (the linger would wait 0.1 s of quiet at least)

    run_onramp(tmp_path, body)
