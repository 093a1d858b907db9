"""UDP GSO on the off-ramp: a flow's datagrams that arrive together leave in one sendmsg and
reach a real UDP server on loopback as the same datagrams, in order; sizes that do not fit a
batch, an empty datagram, a close and a path that refuses GSO lose nothing."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from ipferry.worker.datagram_flows import GSO_MAX_SEGMENTS, DatagramUpstream, open_upstream

pytestmark = pytest.mark.timeout(30)
SO_NO_CHECK = 11  # no UDP checksum on send: the kernel refuses GSO for such a socket (EINVAL)


def server() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind(("127.0.0.1", 0))
    s.settimeout(5)
    return s


def received(s: socket.socket, count: int) -> list[bytes]:
    return [s.recv(65535) for _ in range(count)]


def run(datagrams: list[bytes], *, no_check: bool = False, close_at_once: bool = False
        ) -> tuple[list[bytes], DatagramUpstream]:
    srv = server()

    async def main() -> DatagramUpstream:
        sock = open_upstream("udp", srv.getsockname())
        if no_check:
            sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
        up = DatagramUpstream(sock, on_reply=lambda _d: None, on_error=lambda _k: None)
        for d in datagrams:  # all in one turn of the loop, as one wake-up's packets are
            up.send(memoryview(b"\0" + d)[1:])  # (the engine hands memoryviews of packets)
        if close_at_once:
            up.close()
        else:
            await asyncio.sleep(0.05)
            up.close()
        return up

    try:
        up = asyncio.run(main())
        return received(srv, len(datagrams)), up
    finally:
        srv.close()


def test_same_size_datagrams_leave_in_batches_and_arrive_one_by_one() -> None:
    datagrams = [os.urandom(64) for _ in range(200)]
    got, up = run(datagrams)
    assert len(got) == 200
    assert got == datagrams
    assert 200 // GSO_MAX_SEGMENTS <= up.gso_sends <= 200 // GSO_MAX_SEGMENTS + 1


def test_mixed_sizes_keep_their_order_and_their_bounds() -> None:
    sizes = [100] * 10 + [50] + [100] * 5 + [1200, 1300] + [0] + [100, 100] + [9000, 64] + [1]
    datagrams = [os.urandom(n) for n in sizes]
    got, up = run(datagrams)
    assert [len(d) for d in got] == sizes
    assert got == datagrams
    assert up.gso_sends >= 2


def test_a_close_sends_what_waits() -> None:
    datagrams = [os.urandom(32) for _ in range(10)]
    got, up = run(datagrams, close_at_once=True)
    assert got == datagrams
    assert up.gso_sends == 1


def test_a_path_that_refuses_gso_gets_them_one_by_one() -> None:
    datagrams = [os.urandom(64) for _ in range(100)]
    got, up = run(datagrams, no_check=True)
    assert got == datagrams
    assert up.gso is False and up.gso_sends == 0
