"""One HTTP/1.1 connection: an h11 state machine driven over a non-blocking socket.

h11 parses and frames (sans I/O); this is its driver: read when h11 needs data, write what it
produces, wait on the event loop when the kernel says EAGAIN. Writes complete before the next
read, so a connection holds at most one read chunk (:data:`CHUNK`) of a body: a 1 GB upload
costs its chunk, not its size.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Any

import h11

from ..relay import wait_fd

__all__ = ["CHUNK", "ConnectionLost", "HttpConn"]

CHUNK = 64 * 1024
_LOST = (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE, errno.ETIMEDOUT, errno.ECONNABORTED,
         errno.EHOSTUNREACH, errno.ENETUNREACH)


class ConnectionLost(Exception):
    """The peer reset the connection, or it failed under us (the errno's name says which)."""


class HttpConn:
    """``sock`` (connected, non-blocking) spoken to as ``role`` (h11.SERVER: we answer requests;
    h11.CLIENT: we send them). ``received``/``sent`` count bytes on the wire."""

    __slots__ = ("sock", "h11", "received", "sent", "_loop", "_held", "_release")

    def __init__(self, sock: socket.socket, role: Any, *, max_head: int = 65536,
                 release: Callable[[], None] | None = None) -> None:
        sock.setblocking(False)
        if sock.family != socket.AF_UNIX:
            # Heads and bodies go as soon as they are whole: Nagle's wait for an ACK would meet
            # the peer's delayed ACK (40 ms a request on keep-alive connections).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._held = b""  # a framed head waiting to go out with what follows it
        self._release = release  # who closes the socket when we are done (None: we do)
        self.sock = sock
        self.h11 = h11.Connection(role, max_incomplete_event_size=max_head)
        self.received = 0
        self.sent = 0
        self._loop = asyncio.get_running_loop()

    async def next_event(self) -> Any:
        """The next h11 event (reading as needed); ``h11.PAUSED`` once the peer switched
        protocols or waits for the next cycle. Raises h11.RemoteProtocolError for bad input,
        :class:`ConnectionLost` for a reset."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            await self._read()

    async def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(CHUNK)
            except (BlockingIOError, InterruptedError):
                await wait_fd(self._loop, self.sock.fileno(), writable=False)
                continue
            except OSError as exc:
                if exc.errno in _LOST:
                    raise ConnectionLost(errno.errorcode.get(exc.errno or 0, "error")) from None
                raise
            self.received += len(data)
            self.h11.receive_data(data)  # b"": EOF, which h11 turns into ConnectionClosed
            return

    async def send(self, event: Any) -> None:
        """Frame ``event`` and write it all (with a head :meth:`hold` kept back)."""
        data = self.h11.send(event)
        if self._held:
            data, self._held = self._held + (data or b""), b""
        if data:
            await self.write(data)

    def hold(self, event: Any) -> None:
        """Frame ``event`` (a head) and keep it for the next :meth:`send`: one write, one
        segment, for a head and the start of its body."""
        self._held += self.h11.send(event) or b""

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write raw bytes (what h11 framed, or a switched connection's first bytes)."""
        view = memoryview(data).cast("B")
        while view:
            try:
                n = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                await wait_fd(self._loop, self.sock.fileno(), writable=True)
                continue
            except OSError as exc:
                if exc.errno in _LOST:
                    raise ConnectionLost(errno.errorcode.get(exc.errno or 0, "error")) from None
                raise
            self.sent += n
            view = view[n:]

    def close(self) -> None:
        """Done with the connection: its owner closes it (a dialed flow's off-ramp), else we."""
        if self._release is not None:
            release, self._release = self._release, None
            release()
        else:
            self.sock.close()

    @property
    def reusable(self) -> bool:
        """Both sides are done with a message and neither asked to close: another may follow."""
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    def trailing(self) -> bytes:
        """Bytes received past the last message (a switched protocol's first bytes)."""
        return bytes(self.h11.trailing_data[0])
