"""The splice relay between real TCP sockets on loopback: bytes intact both ways (through Python
for a stream's first bytes, through a pipe past them), half-closes passed on, a reset passed on
as a reset, a cancel that leaves no fd watched.

Each test plays the driver: it hands the relay the two middle sockets of two loopback
connections (client <-> client_side, server_side <-> server) and closes them afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct

import pytest

from ipferry.worker import relay as relay_mod
from ipferry.worker.relay import SPLICE_AFTER, relay

pytestmark = pytest.mark.timeout(60)


def tcp_pair(bufsize: int | None = None) -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        if bufsize:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    for s in (a, b):
        s.setblocking(False)
        if bufsize:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
    return a, b


async def recv_all(loop: asyncio.AbstractEventLoop, s: socket.socket) -> bytes:
    chunks = []
    while data := await loop.sock_recv(s, 1 << 16):
        chunks.append(data)
    return b"".join(chunks)


class Pairs:
    """client <-> client_side (relayed) server_side <-> server."""

    def __init__(self, bufsize: int | None = None) -> None:
        self.client, self.client_side = tcp_pair(bufsize)
        self.server_side, self.server = tcp_pair(bufsize)

    def close(self) -> None:
        for s in (self.client, self.client_side, self.server_side, self.server):
            s.close()


def pipes_open() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
        except FileNotFoundError:  # the listing's own fd, closed since
            pass
    return count


@pytest.mark.parametrize("size", [0, 100, SPLICE_AFTER - 1, SPLICE_AFTER + 1, 8 << 20])
def test_both_directions_intact_and_counted(run, size: int) -> None:
    """Small streams go through Python, big ones splice past SPLICE_AFTER: every byte arrives,
    each way, the EOF follows it, and the counts are the bytes moved."""
    up = os.urandom(size)
    down = os.urandom(size // 2 + 3)
    p = Pairs(bufsize=1 << 16)

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(relay(p.client_side, p.server_side))

        async def side(s: socket.socket, data: bytes) -> bytes:
            got = asyncio.ensure_future(recv_all(loop, s))
            await loop.sock_sendall(s, data)
            s.shutdown(socket.SHUT_WR)
            return await got

        at_client, at_server = await asyncio.gather(side(p.client, up), side(p.server, down))
        return at_server, at_client, await task

    try:
        at_server, at_client, moved = run(main())
    finally:
        p.close()
    assert len(at_server) == size and hashlib.sha256(at_server).digest() == \
        hashlib.sha256(up).digest()
    assert at_client == down
    assert moved == (size, len(down))


def test_half_close_keeps_the_other_direction(run) -> None:
    """The client's FIN reaches the server as a FIN; the server still answers after it."""
    p = Pairs()

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(relay(p.client_side, p.server_side))
        await loop.sock_sendall(p.client, b"question")
        p.client.shutdown(socket.SHUT_WR)
        asked = await recv_all(loop, p.server)  # ends: the FIN was passed on
        await loop.sock_sendall(p.server, b"answer to " + asked)
        p.server.shutdown(socket.SHUT_WR)
        answered = await recv_all(loop, p.client)
        return asked, answered, await task

    try:
        asked, answered, moved = run(main())
    finally:
        p.close()
    assert asked == b"question"
    assert answered == b"answer to question"
    assert moved == (8, 18)


def test_reset_is_passed_on_as_reset(run) -> None:
    """The server resets: the relay ends and its caller's close resets the client (no FIN: a cut
    stream must not look whole)."""
    p = Pairs()

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(relay(p.client_side, p.server_side))
        await loop.sock_sendall(p.client, b"x" * 1000)
        await asyncio.sleep(0.05)
        p.server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        p.server.close()
        await asyncio.wait_for(task, 10)
        p.client_side.close()  # the driver's close: SO_LINGER 0 was set, so RST
        p.server_side.close()
        try:
            data = await recv_all(loop, p.client)
        except ConnectionResetError:
            return "reset"
        return f"eof after {len(data)} bytes"

    try:
        assert run(main()) == "reset"
    finally:
        p.close()


def test_cancel_unwatches_and_closes_its_pipes(run) -> None:
    """A relay cancelled mid-stream (the flow cut short) leaves no fd watched and no pipe open:
    the driver may close (and the kernel reuse) both sockets at once."""
    p = Pairs(bufsize=1 << 16)

    async def main():
        loop = asyncio.get_running_loop()
        before = pipes_open()  # (the loop's own pipes, if it has any, counted)
        task = asyncio.ensure_future(relay(p.client_side, p.server_side))
        # past SPLICE_AFTER with the server not reading: the direction holds a pipe and waits
        await loop.sock_sendall(p.client, os.urandom(4 * SPLICE_AFTER))
        await asyncio.sleep(0.1)
        during = pipes_open()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        # nothing watches the sockets any more: registering them again works on both loops
        for s in (p.client_side, p.server_side):
            loop.add_reader(s.fileno(), lambda: None)
            loop.remove_reader(s.fileno())
            loop.add_writer(s.fileno(), lambda: None)
            loop.remove_writer(s.fileno())
        return before, during, pipes_open()

    try:
        before, during, after = run(main())
    finally:
        p.close()
    assert during == before + 2, "the direction past SPLICE_AFTER made one pipe"
    assert after == before


def test_an_unexpected_error_cuts_both_ends(run, monkeypatch) -> None:
    """Not the network's doing (here: splice failing with EINVAL): the relay raises it and both
    ends are set to reset."""
    p = Pairs()

    def broken(*_a, **_k):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(relay_mod, "SPLICE_AFTER", 0)
    monkeypatch.setattr(relay_mod.os, "splice", broken)

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(relay(p.client_side, p.server_side))
        await loop.sock_sendall(p.client, b"hello")
        try:
            await task
        except OSError as exc:
            return exc.errno
        return None

    try:
        assert run(main()) == 22
        linger = struct.unpack("ii", p.client_side.getsockopt(socket.SOL_SOCKET,
                                                               socket.SO_LINGER, 8))
        assert linger == (1, 0)
    finally:
        p.close()
