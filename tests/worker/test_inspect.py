"""The inspector relay and the application's stream handler, between real TCP sockets on loopback.

Each test plays the driver: it hands the relay the two middle sockets of two loopback
connections (client <-> client_side, server_side <-> server), and closes them when the handler
returns. No root: loopback of the test's own network namespace only.
"""

from __future__ import annotations

import asyncio
import doctest
import hashlib
import os
import socket
import struct

import pytest

from ipferry.engine.decisions import Decision, StreamStart, TunnelContext
from ipferry.engine.flows import Flow, FlowKey
from ipferry.engine.legs import AcceptedLeg, DowngradedLeg, StreamLeg
from ipferry.wire.packet import IPPROTO_TCP
from ipferry.worker import inspect as inspect_mod
from ipferry.worker import streams
from ipferry.worker.app import RulesApplication
from ipferry.worker.inspect import (
    CHUNK,
    CloseStream,
    InspectedRelay,
    Inspector,
    StreamEnd,
    StreamStats,
    inspect_stream,
)

pytestmark = pytest.mark.timeout(60)


class Log:
    """A structlog-like logger that keeps what it was told."""

    def __init__(self, events: list | None = None, bound: dict | None = None) -> None:
        self.events: list[tuple[str, str, dict]] = [] if events is None else events
        self.bound = bound or {}

    def bind(self, **kw):
        return Log(self.events, {**self.bound, **kw})

    def __getattr__(self, level: str):
        return lambda event, **kw: self.events.append((level, event, {**self.bound, **kw}))

    def named(self, event: str) -> list[dict]:
        return [kw for _, e, kw in self.events if e == event]


def tcp_pair(bufsize: int | None = None) -> tuple[socket.socket, socket.socket]:
    """A connected pair of non-blocking TCP sockets on loopback (small buffers if asked)."""
    with socket.socket() as listener:
        if bufsize:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        a = socket.socket()
        if bufsize:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        a.connect(listener.getsockname())
        b, _ = listener.accept()
    for s in (a, b):
        s.setblocking(False)
    return a, b


class Streams:
    """client <-> client_side [relay] server_side <-> server."""

    def __init__(self, bufsize: int | None = None) -> None:
        self.client, self.client_side = tcp_pair(bufsize)
        self.server_side, self.server = tcp_pair(bufsize)

    def close_middle(self) -> None:
        """The driver's part once the handler returned."""
        self.client_side.close()
        self.server_side.close()

    def close(self) -> None:
        for s in (self.client, self.client_side, self.server_side, self.server):
            s.close()


@pytest.fixture
def pair():
    s = Streams()
    yield s
    s.close()


async def read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    parts = []
    while data := await loop.sock_recv(sock, 1 << 16):
        parts.append(data)
    return b"".join(parts)


async def send_and_eof(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)
    sock.shutdown(socket.SHUT_WR)


async def expect_reset(sock: socket.socket) -> None:
    """The peer's close was a reset: what was in flight may still be read, then ECONNRESET."""
    loop = asyncio.get_running_loop()
    with pytest.raises(ConnectionResetError):
        while await loop.sock_recv(sock, 1 << 16):
            pass


def rst_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Passing(Inspector):
    """The protocol's defaults: everything passes unchanged (a Protocol has no instances)."""


class Recorder(Inspector):
    """Passes everything, keeps a digest of each direction and the stats it ended with."""

    def __init__(self) -> None:
        self.up, self.down = hashlib.sha256(), hashlib.sha256()
        self.stats: list[StreamStats] = []

    def to_server(self, data: bytes) -> bytes | None:
        self.up.update(data)
        return None

    def to_client(self, data: bytes) -> bytes | None:
        self.down.update(data)
        return None

    def on_end(self, stats: StreamStats) -> None:
        self.stats.append(stats)


# -- bytes, EOF and resets -----------------------------------------------------------------------

def test_megabytes_cross_intact_both_ways_at_once(pair, run):
    up, down = os.urandom(5 << 20), os.urandom(3 << 20)
    rec = Recorder()

    async def main():
        relay = asyncio.ensure_future(inspect_stream(pair.client_side, pair.server_side, rec))
        got = await asyncio.gather(read_all(pair.server), read_all(pair.client),
                                   send_and_eof(pair.client, up), send_and_eof(pair.server, down))
        return got[0], got[1], await relay

    at_server, at_client, stats = run(main())
    assert hashlib.sha256(at_server).digest() == hashlib.sha256(up).digest() == rec.up.digest()
    assert hashlib.sha256(at_client).digest() == hashlib.sha256(down).digest() == rec.down.digest()
    assert (stats.to_server, stats.to_client, stats.end) == (len(up), len(down), StreamEnd.CLOSED)
    assert rec.stats == [stats] and stats.duration >= 0


@pytest.mark.parametrize("first", ["client", "server"])
def test_a_half_close_passes_and_the_other_way_goes_on(pair, run, first):
    async def main():
        relay = asyncio.ensure_future(inspect_stream(pair.client_side, pair.server_side,
                                                     Passing()))
        closer, other = (pair.client, pair.server) if first == "client" else \
            (pair.server, pair.client)
        await send_and_eof(closer, b"last words")
        assert await read_all(other) == b"last words"  # the EOF came through
        # The other way is still open, long after: it carries a reply, then its own EOF.
        await asyncio.sleep(0.05)
        assert not relay.done()
        reply = os.urandom(300_000)
        sender = asyncio.ensure_future(send_and_eof(other, reply))
        assert await read_all(closer) == reply
        await sender
        return await relay

    stats = run(main())
    assert stats.end is StreamEnd.CLOSED
    assert (stats.to_server, stats.to_client) == ((10, 300_000) if first == "client"
                                                  else (300_000, 10))


@pytest.mark.parametrize("side", ["client", "server"])
def test_a_reset_on_one_side_resets_the_other(pair, run, side):
    rec = Recorder()

    async def main():
        relay = asyncio.ensure_future(inspect_stream(pair.client_side, pair.server_side, rec))
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(pair.client, b"ping")
        assert await loop.sock_recv(pair.server, 10) == b"ping"
        resetting, other = (pair.client, pair.server) if side == "client" else \
            (pair.server, pair.client)
        rst_close(resetting)
        stats = await relay
        pair.close_middle()
        await expect_reset(other)
        return stats

    stats = run(main())
    assert stats.end is (StreamEnd.CLIENT_RESET if side == "client" else StreamEnd.SERVER_RESET)
    assert rec.stats == [stats]


def test_a_reset_after_a_half_close_still_resets_the_other(pair, run):
    async def main():
        relay = asyncio.ensure_future(inspect_stream(pair.client_side, pair.server_side,
                                                     Passing()))
        await send_and_eof(pair.client, b"request")
        assert await read_all(pair.server) == b"request"
        rst_close(pair.server)  # instead of answering
        stats = await relay
        pair.close_middle()
        await expect_reset(pair.client)
        return stats

    assert run(main()).end is StreamEnd.SERVER_RESET


# -- what inspectors do ---------------------------------------------------------------------------

class Rewriter(Inspector):
    def to_server(self, data: bytes) -> bytes | None:
        return data.replace(b"a", b"AAA")  # grows: more out than in

    def to_client(self, data: bytes) -> bytes | None:
        return data.replace(b"secret", b"")  # shrinks (the test sends it whole in one write)


def test_an_inspector_rewrites_bytes(pair, run):
    up = b"banana " * 50_000

    async def main():
        relay = asyncio.ensure_future(inspect_stream(pair.client_side, pair.server_side,
                                                     Rewriter()))
        got = await asyncio.gather(read_all(pair.server), read_all(pair.client),
                                   send_and_eof(pair.client, up),
                                   send_and_eof(pair.server, b"the secret is out"))
        return got[0], got[1], await relay

    at_server, at_client, stats = run(main())
    assert at_server == up.replace(b"a", b"AAA")
    assert at_client == b"the  is out"
    assert (stats.to_server, stats.to_client) == (len(up), 17)  # counted as read


class Closer(Recorder):
    def to_server(self, data: bytes) -> bytes | None:
        if b"DROP TABLE" in data:
            raise CloseStream("no dropping")
        return super().to_server(data)

    def to_client(self, data: bytes) -> bytes | None:
        if b"DROP TABLE" in data:
            raise CloseStream("no dropping")
        return super().to_client(data)


@pytest.mark.parametrize("side", ["client", "server"])
def test_an_inspector_that_closes_resets_both_ends(pair, run, side):
    """Whichever direction it closes on, and with the other direction still open."""
    log, rec = Log(), Closer()
    sender, receiver = (pair.client, pair.server) if side == "client" else \
        (pair.server, pair.client)

    async def main():
        relay = asyncio.ensure_future(inspect_stream(pair.client_side, pair.server_side, rec,
                                                     log=log))
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sender, b"SELECT 1;")
        assert await loop.sock_recv(receiver, 100) == b"SELECT 1;"
        await loop.sock_sendall(sender, b"DROP TABLE users;")
        stats = await relay
        pair.close_middle()
        await expect_reset(pair.server)
        await expect_reset(pair.client)
        return stats

    stats = run(main())
    assert stats.end is StreamEnd.INSPECTOR_CLOSED and rec.stats == [stats]
    assert [kw["reason"] for kw in log.named("stream_closed_by_inspector")] == ["no dropping"]
    received = stats.to_server if side == "client" else stats.to_client
    assert received == len(b"SELECT 1;DROP TABLE users;")


class Broken(Recorder):
    def to_client(self, data: bytes) -> bytes | None:
        raise ValueError("a bug in the inspector")


def test_an_inspector_that_raises_resets_the_stream_and_is_logged_once(pair, run):
    log, rec = Log(), Broken()

    async def main():
        relay = asyncio.ensure_future(inspect_stream(pair.client_side, pair.server_side, rec,
                                                     log=log))
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(pair.server, b"hello")
        await loop.sock_sendall(pair.server, b"hello again")  # raises no second time
        stats = await relay
        pair.close_middle()
        await expect_reset(pair.client)
        await expect_reset(pair.server)
        # The loop goes on: the next stream is relayed as if nothing happened.
        more = Streams()
        try:
            nxt = asyncio.ensure_future(inspect_stream(more.client_side, more.server_side,
                                                       Passing(), log=log))
            got = await asyncio.gather(read_all(more.server), send_and_eof(more.client, b"ok"),
                                       send_and_eof(more.server, b""))
            assert got[0] == b"ok" and (await nxt).end is StreamEnd.CLOSED
        finally:
            more.close()
        return stats

    stats = run(main())
    assert stats.end is StreamEnd.INSPECTOR_ERROR and rec.stats == [stats]
    failed = log.named("stream_inspector_failed")
    assert len(failed) == 1 and "a bug in the inspector" in failed[0]["error"]
    assert failed[0]["inspector"] == "Broken"


class WrongType(Inspector):
    def to_server(self, data: bytes) -> bytes | None:
        return data.decode()  # type: ignore[return-value]


def test_an_inspector_answering_no_bytes_is_an_inspector_error(pair, run):
    log = Log()

    async def main():
        relay = asyncio.ensure_future(inspect_stream(pair.client_side, pair.server_side,
                                                     WrongType(), log=log))
        await asyncio.get_running_loop().sock_sendall(pair.client, b"text")
        return await relay

    assert run(main()).end is StreamEnd.INSPECTOR_ERROR
    assert "returned str" in log.named("stream_inspector_failed")[0]["error"]


class BadEnd(Inspector):
    def on_end(self, stats: StreamStats) -> None:
        raise RuntimeError("cannot write the record")


def test_on_end_raising_is_logged_and_the_stream_still_ended_cleanly(pair, run):
    log = Log()

    async def main():
        relay = asyncio.ensure_future(inspect_stream(pair.client_side, pair.server_side,
                                                     BadEnd(), log=log))
        got = await asyncio.gather(read_all(pair.server), read_all(pair.client),
                                   send_and_eof(pair.client, b"a"), send_and_eof(pair.server, b"b"))
        return got, await relay

    got, stats = run(main())
    assert got[:2] == [b"a", b"b"] and stats.end is StreamEnd.CLOSED
    assert [kw["hook"] for kw in log.named("stream_inspector_failed")] == ["on_end"]


def test_a_relay_cut_short_resets_both_ends_and_tells_the_inspector(pair, run):
    rec = Recorder()

    async def main():
        relay = asyncio.ensure_future(inspect_stream(pair.client_side, pair.server_side, rec))
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(pair.client, b"x")
        assert await loop.sock_recv(pair.server, 10) == b"x"
        relay.cancel()  # what the driver does to a flow cut short (after its own abort)
        with pytest.raises(asyncio.CancelledError):
            await relay
        pair.close_middle()
        await expect_reset(pair.client)
        await expect_reset(pair.server)

    run(main())
    assert [s.end for s in rec.stats] == [StreamEnd.CANCELLED]
    assert rec.stats[0].to_server == 1


# -- backpressure ---------------------------------------------------------------------------------

def test_a_slow_reader_holds_the_writer_back_not_the_relays_memory(run):
    """The client reads nothing while the server writes far more than every buffer on the way
    holds: the server's writes stop, and the relay holds at most one chunk meanwhile."""
    s = Streams(bufsize=64 * 1024)  # no autotuning: the kernel's buffers stay small
    total = 16 << 20
    data = os.urandom(total)

    async def main():
        relay = InspectedRelay(s.client_side, s.server_side, Passing())
        task = asyncio.ensure_future(relay.run())
        writer = asyncio.ensure_future(send_and_eof(s.server, data))
        # Until the relay has stopped reading the server (it waits on the client).
        last, still = -1, 0
        while still < 20:
            await asyncio.sleep(0.02)
            still = still + 1 if relay.received[1] == last else 0
            last = relay.received[1]
        assert not writer.done()  # held back: the sender cannot get its 16 MB out
        assert relay.received[1] < total // 2
        assert 0 < relay.buffered <= CHUNK and relay.max_buffered <= CHUNK
        # The reader wakes up: everything arrives, still held at one chunk at most.
        got = await read_all(s.client)
        await writer
        s.client.shutdown(socket.SHUT_WR)
        stats = await task
        return got, stats, relay

    try:
        got, stats, relay = run(main())
    finally:
        s.close()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert stats.to_client == total and relay.max_buffered <= CHUNK and relay.buffered == 0


def test_the_module_docstring_example_runs():
    result = doctest.testmod(inspect_mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# -- the application's handler --------------------------------------------------------------------

def tcp_flow(dport: int = 22, upstream=("127.0.0.1", 2222), server=None) -> Flow:
    key = FlowKey("acme", IPPROTO_TCP, socket.inet_aton("10.0.0.2"), 40000,
                  socket.inet_aton("198.18.0.1"), dport)
    flow = Flow(key, Decision.upgrade(layer="stream"), 0.0,
                AcceptedLeg("acme", TunnelContext("acme", {"site": "lab"}), None, "edge", 0))
    flow.server = server if server is not None else StreamLeg(upstream)
    return flow


class App(RulesApplication):
    def __init__(self, answer=None, raises: BaseException | None = None) -> None:
        super().__init__()
        self.answer, self.raises = answer, raises
        self.seen: list[StreamStart] = []

    def on_stream_start(self, stream: StreamStart):
        self.seen.append(stream)
        if self.raises is not None:
            raise self.raises
        return self.answer


class AsyncApp(App):
    async def on_stream_start(self, stream: StreamStart):  # type: ignore[override]
        await asyncio.sleep(0)
        return super().on_stream_start(stream)


def drive(pair: Streams, app: object, log: Log, flow: Flow | None = None,
          up: bytes = b"to server", down: bytes = b"to client"):
    """Run the handler as the driver does; the bytes each end got (None: reset)."""
    handler = streams.application_handler(lambda: app, log)

    async def end_of(sock: socket.socket, data: bytes) -> bytes | None:
        try:
            sender = asyncio.ensure_future(send_and_eof(sock, data))
            got = await read_all(sock)
            await sender
            return got
        except (ConnectionResetError, BrokenPipeError):
            return None

    async def main():
        task = asyncio.ensure_future(handler(flow or tcp_flow(), pair.client_side,
                                             pair.server_side))
        ends = asyncio.gather(end_of(pair.client, up), end_of(pair.server, down))
        await task
        pair.close_middle()
        return await ends

    return asyncio.run(asyncio.wait_for(main(), 20))


@pytest.fixture
def spliced(monkeypatch):
    calls = []
    real = streams.splice

    async def splice(flow, client, server):
        calls.append(flow)
        await real(flow, client, server)

    monkeypatch.setattr(streams, "splice", splice)
    return calls


@pytest.mark.parametrize("app", [RulesApplication(), App(None), App("splice"), AsyncApp(None)],
                         ids=["no-hook", "none", "splice", "async-none"])
def test_the_default_and_a_hook_saying_splice_splice(pair, spliced, app):
    assert drive(pair, app, Log()) == [b"to client", b"to server"]
    assert len(spliced) == 1


@pytest.mark.parametrize("cls", [App, AsyncApp])
def test_a_hook_answering_an_inspector_gets_the_bytes(pair, spliced, cls):
    rec = Recorder()
    app = cls(rec)
    assert drive(pair, app, Log()) == [b"to client", b"to server"]
    assert not spliced
    assert rec.up.digest() == hashlib.sha256(b"to server").digest()
    assert [s.end for s in rec.stats] == [StreamEnd.CLOSED]
    (seen,) = app.seen
    assert seen.flow.tenant == "acme" and seen.flow.context.extra == {"site": "lab"}
    assert (seen.flow.src, seen.flow.sport, seen.flow.dst, seen.flow.dport) == \
        ("10.0.0.2", 40000, "198.18.0.1", 22)
    assert seen.upstream == ("127.0.0.1", 2222)
    assert (seen.downgraded, seen.destination_tunnel) == (False, None)


def test_a_downgraded_stream_names_the_devices_tunnel(pair):
    class Tunnel:
        id = 7

    app = App(None)
    leg = DowngradedLeg(("10.9.0.5", 22), Tunnel(), None, (b"", 0), (b"", 0))  # type: ignore[arg-type]
    drive(pair, app, Log(), flow=tcp_flow(server=leg))
    (seen,) = app.seen
    assert (seen.upstream, seen.downgraded, seen.destination_tunnel) == (("10.9.0.5", 22), True, 7)


@pytest.mark.parametrize("app", [App(raises=RuntimeError("hook bug")), AsyncApp(raises=KeyError(1)),
                                 App(answer=42), App(answer="inspect")],
                         ids=["raises", "async-raises", "int", "other-string"])
def test_a_failing_hook_resets_the_stream(pair, spliced, app):
    """Fail closed: a stream the application could not decide about is not relayed unseen."""
    log = Log()
    assert drive(pair, app, log) == [None, None]
    assert not spliced
    (failed,) = log.named("stream_hook_failed")
    assert failed["tenant"] == "acme" and failed["dport"] == 22


def test_the_handler_asks_the_application_of_the_moment(pair, spliced):
    """A reload swaps the application: the next stream asks the new one."""
    apps = [RulesApplication()]
    handler = streams.application_handler(lambda: apps[0], Log())
    rec = Recorder()
    apps[0] = App(rec)

    async def main():
        task = asyncio.ensure_future(handler(tcp_flow(), pair.client_side, pair.server_side))
        got = await asyncio.gather(read_all(pair.server), send_and_eof(pair.client, b"x"),
                                   send_and_eof(pair.server, b""))
        await task
        return got[0]

    assert asyncio.run(asyncio.wait_for(main(), 20)) == b"x"
    assert not spliced and rec.stats[0].to_server == 1


def test_inspector_logs_carry_the_flow(pair):
    log = Log()
    drive(pair, App(Broken()), log)
    (failed,) = log.named("stream_inspector_failed")
    assert failed["tenant"] == "acme" and failed["src"] == "10.0.0.2" and failed["sport"] == 40000
