"""Reading SEQPACKET sockets: a zero-length datagram is dropped and counted, never taken for EOF.

On real socketpairs: first the kernel's behaviour that :func:`ipferry.worker.datagrams.at_eof`
relies on, then :func:`drain` over every order of empty datagrams, data, shutdown and close.
"""

from __future__ import annotations

import asyncio
import select
import socket

import pytest

from ipferry.worker import datagrams, metrics
from ipferry.worker.datagrams import at_eof, drain, queued_bytes
from ipferry.worker.mesh import FRAME, PACKET, MeshLink


def pair() -> tuple[socket.socket, socket.socket]:
    """(client, worker's end), the worker's end non-blocking as the loop has it."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.setblocking(False)
    return a, b


def dropped(reason: str) -> float:
    return metrics.DROPS.labels(reason)._value.get()


class Reader:
    def __init__(self, sock: socket.socket, reason: str = "empty_datagram") -> None:
        self.sock, self.reason = sock, reason
        self.data: list[bytes] = []
        self.eof = 0

    def drain(self) -> None:
        drain(self.sock, self.data.append, self._eof, self.reason)

    def _eof(self) -> None:
        self.eof += 1


# -- what the kernel does -----------------------------------------------------------------------

def test_kernel_reports_empty_records_and_eof_alike_and_rdhup_and_siocinq_tell_them_apart():
    a, b = pair()
    a.send(b"")
    a.send(b"abc")
    a.send(b"")
    assert queued_bytes(b) == 3  # SIOCINQ sums every queued record's bytes on SEQPACKET
    data, anc, flags, _ = b.recvmsg(100)
    assert (data, anc, flags) == (b"", [], 0)  # nothing marks it: no MSG_EOR, no MSG_TRUNC
    poller = select.poll()
    poller.register(b.fileno(), select.POLLRDHUP)
    assert poller.poll(0) == []  # no RDHUP (nor HUP) while the peer is there
    assert b.recv(100) == b"abc"
    assert queued_bytes(b) == 0  # an empty record adds no bytes
    assert b.recv(100) == b""
    with pytest.raises(BlockingIOError):
        b.recv(100)
    a.send(b"")
    a.close()
    assert poller.poll(0)[0][1] & select.POLLRDHUP  # the peer is gone: RDHUP, with or without
    assert b.recvmsg(100)[:3] == (b"", [], 0)  # the record
    assert b.recvmsg(100)[:3] == (b"", [], 0)  # and EOF, which looks the same
    assert b.recv(100) == b""  # for ever
    b.close()


# -- at_eof -------------------------------------------------------------------------------------

def test_at_eof_while_the_peer_is_connected_is_never_true():
    a, b = pair()
    a.send(b"")
    assert b.recv(100) == b"" and not at_eof(b)
    a.send(b"")
    a.send(b"x")
    assert b.recv(100) == b"" and not at_eof(b)
    a.close()
    assert b.recv(100) == b"x"
    assert b.recv(100) == b"" and at_eof(b)
    b.close()


def test_at_eof_after_shutdown_with_records_left():
    a, b = pair()
    a.send(b"")
    a.send(b"tail")
    a.shutdown(socket.SHUT_WR)
    assert b.recv(100) == b"" and not at_eof(b)  # bytes are still queued: that was a record
    assert b.recv(100) == b"tail"
    assert b.recv(100) == b"" and at_eof(b)
    a.close()
    b.close()


# -- drain --------------------------------------------------------------------------------------

def test_empty_datagram_then_data_then_close():
    a, b = pair()
    r = Reader(b)
    before = dropped("empty_datagram")
    a.send(b"")
    r.drain()
    assert (r.data, r.eof) == ([], 0)  # dropped, the socket stays open
    assert dropped("empty_datagram") == before + 1
    a.send(b"packet 1")
    a.send(b"")
    a.send(b"packet 2")
    r.drain()
    assert (r.data, r.eof) == ([b"packet 1", b"packet 2"], 0)
    assert dropped("empty_datagram") == before + 2
    a.close()
    r.drain()
    assert r.eof == 1 and dropped("empty_datagram") == before + 2
    b.close()


def test_everything_queued_before_the_read():
    """Empty datagrams, data and the close all wait in the queue: the data is read, then EOF."""
    a, b = pair()
    r = Reader(b)
    before = dropped("empty_datagram")
    for d in (b"", b"one", b"", b"", b"two", b""):
        a.send(d)
    a.close()
    r.drain()
    assert (r.data, r.eof) == ([b"one", b"two"], 1)
    # The three empty datagrams before "two" are counted; the last one, with nothing but the
    # end behind it, cannot be told from the end (and is not counted): it changes nothing.
    assert dropped("empty_datagram") == before + 3
    b.close()


def test_only_empty_datagrams_then_close():
    a, b = pair()
    r = Reader(b)
    a.send(b"")
    a.send(b"")
    a.close()
    r.drain()
    assert (r.data, r.eof) == ([], 1)
    b.close()


def test_half_close_keeps_what_was_sent():
    a, b = pair()
    r = Reader(b)
    a.send(b"")
    a.send(b"last")
    a.shutdown(socket.SHUT_WR)
    r.drain()
    assert (r.data, r.eof) == ([b"last"], 1)
    a.close()
    b.close()


def test_a_flood_of_empty_datagrams_yields_to_the_loop():
    a, b = pair()
    r = Reader(b)
    before = dropped("empty_datagram")
    for _ in range(datagrams.BATCH + 10):
        a.send(b"")
    r.drain()
    assert (r.data, r.eof) == ([], 0)
    assert dropped("empty_datagram") == before + datagrams.BATCH  # one batch per wake-up
    r.drain()
    assert dropped("empty_datagram") == before + datagrams.BATCH + 10
    a.close()
    b.close()


def test_a_reset_loses_nothing_the_peer_sent():
    """The peer closed with our data unread: the kernel reports ECONNRESET once, *before* the
    records the peer had sent; those are read all the same, then the end."""
    a, b = pair()
    r = Reader(b)
    b.send(b"never read")
    for i in range(10):
        a.send(b"packet %d" % i)
    a.close()
    r.drain()
    assert r.data == [b"packet %d" % i for i in range(10)] and r.eof == 1
    b.close()


def test_the_reason_is_the_callers():
    a, b = pair()
    r = Reader(b, "mesh_bad_frame")
    before = dropped("mesh_bad_frame")
    a.send(b"")
    r.drain()
    assert r.eof == 0 and dropped("mesh_bad_frame") == before + 1
    a.close()
    b.close()


def test_mesh_link_survives_an_empty_datagram():
    async def main():
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        frames, closed = [], []
        link = MeshLink(1, b, on_message=lambda *_: None,
                        on_frame=lambda _link, kind, tunnel, packet: frames.append(
                            (kind, tunnel, packet)),
                        on_close=closed.append)
        before = dropped("mesh_bad_frame")
        a.send(b"")
        a.send(FRAME.pack(PACKET, 7) + b"ip packet")
        for _ in range(50):
            if frames:
                break
            await asyncio.sleep(0.01)
        assert frames == [(PACKET, 7, b"ip packet")] and not closed
        assert dropped("mesh_bad_frame") == before + 1
        a.close()
        for _ in range(50):
            if closed:
                break
            await asyncio.sleep(0.01)
        assert closed == [link]

    asyncio.run(main())
