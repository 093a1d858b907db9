"""Stream inspection: an upgraded stream's bytes through Python, shown to an inspector.

The application's ``on_stream_start`` hook (see :mod:`ipferry.worker.streams`) may answer an
:class:`Inspector` instead of letting the stream be spliced. Then each direction's bytes are read
into Python in chunks (at most :data:`CHUNK` bytes, in whatever pieces TCP delivers them: a
message may straddle two chunks), handed to the inspector, and its answer written on:

- ``to_server(data)`` / ``to_client(data)`` return ``None`` to forward ``data`` unchanged, other
  bytes to forward those instead (``b""``: nothing; bytes held back can only go out with a later
  chunk of that direction, there is no call at EOF), or raise :class:`CloseStream` to reset both
  ends;
- ``on_end(stats)`` is called once, when the stream is over however it ended
  (:class:`StreamStats`: bytes each way, duration, :class:`StreamEnd`).

The inspector runs on the worker's event loop: it must not block (no network, no waiting on
locks; a short ``write`` to a local file is fine) and should be quick, since every byte of the
stream waits for it. ``Inspector`` is a :class:`~typing.Protocol` with pass-through defaults:
subclass it and override what you need, or write any class with the three methods.

The relay keeps TCP's meaning: EOF one way is passed on as a half-close (``shutdown(SHUT_WR)``
of the other socket) while the other way goes on; a reset of either side, an inspector that
closes or raises, resets both (``SO_LINGER`` 0, so that the close sends RST: the peer must not
take a cut stream for a whole one). It reads no more from a side while the write of its last
chunk waits (backpressure: at most one chunk, or what the inspector returned for it, is held per
direction). It closes neither socket: its caller does, when it returns.

A runnable example (any two connected stream sockets will do; the worker's are TCP)::

    >>> import asyncio, socket
    >>> from ipferry.worker.inspect import CloseStream, Inspector, StreamStats, inspect_stream
    >>> class Shout(Inspector):
    ...     def to_server(self, data: bytes) -> bytes | None:
    ...         if b"quit" in data:
    ...             raise CloseStream("the client said quit")
    ...         return data.upper()          # what the server gets
    ...     def on_end(self, stats: StreamStats) -> None:
    ...         print(stats.end, stats.to_server, stats.to_client)
    >>> async def demo() -> bytes:
    ...     client, client_side = socket.socketpair()   # the client and its stream
    ...     server_side, server = socket.socketpair()   # the server's stream and the server
    ...     for s in (client_side, server_side, client, server):
    ...         s.setblocking(False)
    ...     relay = asyncio.ensure_future(inspect_stream(client_side, server_side, Shout()))
    ...     loop = asyncio.get_running_loop()
    ...     await loop.sock_sendall(client, b"hello")
    ...     client.shutdown(socket.SHUT_WR)              # EOF to the server, not a close
    ...     got = await loop.sock_recv(server, 100)
    ...     server.close()
    ...     await relay
    ...     for s in (client, client_side, server_side):
    ...         s.close()
    ...     return got
    >>> asyncio.run(demo())
    closed 5 0
    b'HELLO'
"""

from __future__ import annotations

import asyncio
import enum
import errno
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import structlog

from .relay import abort, wait_fd

__all__ = ["CHUNK", "CloseStream", "InspectedRelay", "Inspector", "StreamEnd", "StreamStats",
           "inspect_stream"]

CHUNK = 64 * 1024  # bytes read at once: the most an inspector is given, and held, per direction

_RESET = (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE, errno.ETIMEDOUT, errno.ECONNABORTED,
          errno.EHOSTUNREACH, errno.ENETUNREACH)


class CloseStream(Exception):
    """Raised by an inspector's ``to_server``/``to_client``: reset both ends of the stream (its
    message, if any, is logged as the ``reason``)."""


class StreamEnd(enum.StrEnum):
    CLOSED = "closed"  # both directions ended with an EOF (each side closed or half-closed)
    CLIENT_RESET = "client_reset"  # the client's side reset (or failed): the server is reset
    SERVER_RESET = "server_reset"  # the server's side reset (or failed): the client is reset
    INSPECTOR_CLOSED = "inspector_closed"  # the inspector raised CloseStream: both reset
    INSPECTOR_ERROR = "inspector_error"  # the inspector raised another exception: both reset
    CANCELLED = "cancelled"  # the flow was cut short (worker stopping, flow ended): both reset
    ERROR = "error"  # an unexpected error of the relay itself: both reset


@dataclass(frozen=True, slots=True)
class StreamStats:
    """How an inspected stream went."""

    to_server: int  # bytes the client sent (read from its side, before the inspector)
    to_client: int  # bytes the server sent
    duration: float  # seconds, from the relay's start to its end
    end: StreamEnd


@runtime_checkable
class Inspector(Protocol):
    """What sees an inspected stream's bytes. The defaults pass everything through unchanged:
    a subclass overrides what it needs (see the module's docstring for the contract)."""

    def to_server(self, data: bytes) -> bytes | None:
        """Bytes the client sent; return what to forward (None: ``data`` itself)."""
        return None

    def to_client(self, data: bytes) -> bytes | None:
        """Bytes the server sent; return what to forward (None: ``data`` itself)."""
        return None

    def on_end(self, stats: StreamStats) -> None:
        """Called once, when the stream is over (both directions ended, or it was reset)."""
        return None


class _Ended(Exception):
    """A pump's way of saying how the stream ended, if not by EOF."""

    def __init__(self, end: StreamEnd, error: BaseException | None = None) -> None:
        super().__init__(end)
        self.end = end
        self.error = error


class InspectedRelay:
    """One inspected stream between ``client`` and ``server`` (connected, non-blocking stream
    sockets; neither is closed here). :meth:`run` relays until both directions end.

    ``buffered`` is the count of bytes read and not yet written (both directions), and
    ``max_buffered`` its high-water mark: at most one chunk per direction, or what the inspector
    made of it.
    """

    def __init__(self, client: socket.socket, server: socket.socket, inspector: Inspector, *,
                 log: Any = None, chunk: int = CHUNK) -> None:
        self.client = client
        self.server = server
        self.inspector = inspector
        self.log = log if log is not None else structlog.get_logger()
        self.chunk = chunk
        self.received = [0, 0]  # bytes read: from the client (to the server), from the server
        self.buffered = 0
        self.max_buffered = 0

    async def run(self) -> StreamStats:
        """Relay both directions; return how it went (after ``inspector.on_end`` saw it)."""
        for s in (self.client, self.server):
            s.setblocking(False)
            try:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # not TCP
        started = time.monotonic()
        up = asyncio.ensure_future(self._pump(0))
        down = asyncio.ensure_future(self._pump(1))
        end, error = StreamEnd.CLOSED, None
        try:
            pending = {up, down}
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                failed = [t.exception() for t in (up, down) if t in done and t.exception()]
                if not failed:
                    continue
                exc = failed[0]
                if isinstance(exc, _Ended):
                    end, error = exc.end, exc.error
                else:  # a bug of ours, or a socket error no peer explains
                    end, error = StreamEnd.ERROR, exc
                abort(self.client, self.server)  # the caller's close() sends RST both ways
                break
        except asyncio.CancelledError:  # cut short: neither peer may take it for a whole stream
            end = StreamEnd.CANCELLED
            abort(self.client, self.server)
            raise
        finally:
            for t in (up, down):
                if not t.done():
                    t.cancel()
            # The pumps unregister their fds before the caller closes (and the kernel reuses)
            # them. When we are being cancelled, this await is not: the cancel was delivered.
            await asyncio.gather(up, down, return_exceptions=True)
            stats = StreamStats(self.received[0], self.received[1],
                                time.monotonic() - started, end)
            self._report(stats, error)
        return stats

    def _report(self, stats: StreamStats, error: BaseException | None) -> None:
        if stats.end is StreamEnd.INSPECTOR_ERROR:
            self.log.warning("stream_inspector_failed", error=repr(error)[:200],
                             inspector=type(self.inspector).__qualname__, exc_info=error)
        elif stats.end is StreamEnd.INSPECTOR_CLOSED:
            self.log.info("stream_closed_by_inspector", reason=str(error)[:200],
                          inspector=type(self.inspector).__qualname__)
        elif stats.end is StreamEnd.ERROR:
            self.log.error("stream_relay_failed", error=repr(error)[:200], exc_info=error)
        try:
            self.inspector.on_end(stats)
        except Exception as exc:
            self.log.warning("stream_inspector_failed", error=repr(exc)[:200], hook="on_end",
                             inspector=type(self.inspector).__qualname__, exc_info=exc)

    async def _pump(self, direction: int) -> None:
        """Read one side, show the inspector, write the other; at EOF, half-close the other."""
        loop = asyncio.get_running_loop()
        if direction == 0:
            src, dst = self.client, self.server
            src_reset, dst_reset = StreamEnd.CLIENT_RESET, StreamEnd.SERVER_RESET
            look: Callable[[bytes], bytes | None] = self.inspector.to_server
        else:
            src, dst = self.server, self.client
            src_reset, dst_reset = StreamEnd.SERVER_RESET, StreamEnd.CLIENT_RESET
            look = self.inspector.to_client
        while True:
            try:
                data = src.recv(self.chunk)
            except (BlockingIOError, InterruptedError):
                await wait_fd(loop, src.fileno(), writable=False)
                continue
            except OSError as exc:
                if exc.errno in _RESET:
                    raise _Ended(src_reset) from None
                raise
            if not data:
                break
            self.received[direction] += len(data)
            try:
                out = look(data)
            except CloseStream as exc:
                raise _Ended(StreamEnd.INSPECTOR_CLOSED, exc) from None
            except Exception as exc:
                raise _Ended(StreamEnd.INSPECTOR_ERROR, exc) from None
            if out is None:
                out = data
            elif not isinstance(out, bytes | bytearray | memoryview):
                raise _Ended(StreamEnd.INSPECTOR_ERROR, TypeError(
                    f"{type(self.inspector).__qualname__} returned {type(out).__name__}, "
                    "not bytes or None"))
            await self._write(loop, dst, memoryview(out).cast("B"), dst_reset)
        try:
            dst.shutdown(socket.SHUT_WR)  # a real EOF (a cancelled pump never gets here)
        except OSError:
            pass  # the other side is gone already: its own pump says so

    async def _write(self, loop: asyncio.AbstractEventLoop, dst: socket.socket,
                     view: memoryview, reset: StreamEnd) -> None:
        left = len(view)
        self.buffered += left
        self.max_buffered = max(self.max_buffered, self.buffered)
        try:
            while view:
                try:
                    n = dst.send(view)
                except (BlockingIOError, InterruptedError):
                    await wait_fd(loop, dst.fileno(), writable=True)
                    continue
                except OSError as exc:
                    if exc.errno in _RESET:
                        raise _Ended(reset) from None
                    raise
                view = view[n:]
                left -= n
                self.buffered -= n
        finally:
            self.buffered -= left


async def inspect_stream(client: socket.socket, server: socket.socket, inspector: Inspector, *,
                         log: Any = None) -> StreamStats:
    """Relay ``client`` <-> ``server`` through ``inspector`` (see the module's docstring) until
    both directions end or the stream is reset; closes neither socket."""
    return await InspectedRelay(client, server, inspector, log=log).run()
