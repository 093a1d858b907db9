"""Stream to stream, driven by the loop's fd callbacks: no task per direction.

Each direction moves bytes from its source socket to its destination. A stream's first
:data:`SPLICE_AFTER` bytes go through Python (``recv`` and ``send``: two system calls, as splice
needs, and no pipe to make for the short exchanges most flows are); past that the direction makes
its pipe and moves with ``os.splice``, so bulk bytes never enter Python. A direction waits on the
loop for its source (readable) or its destination (writable) when the kernel says EAGAIN. EOF in
one direction is a half-close (``shutdown(SHUT_WR)`` on the other socket); the other direction
keeps flowing until it ends too. A reset on either socket resets the other.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import struct

CHUNK = 1 << 20
PIPE_SIZE = 1 << 20
SPLICE_AFTER = 1 << 16  # bytes a direction moves through Python before it makes its pipe
RECV_SIZE = 1 << 16
ROUNDS = 8  # read/write rounds per callback: the loop's other fds get their turn
F_SETPIPE_SZ = 1031
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


async def wait_fd(loop: asyncio.AbstractEventLoop, fd: int, writable: bool) -> None:
    """Until ``fd`` is readable (or writable): the loop's callback, awaited."""
    fut = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if writable else \
        (loop.add_reader, loop.remove_reader)

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    add(fd, wake)
    try:
        await fut
    finally:
        remove(fd)


_RESET = (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE, errno.ETIMEDOUT)
_LINGER_RST = struct.pack("ii", 1, 0)


class _Direction:
    """One direction of a relay: ``src`` to ``dst``. Holds what was read and not yet written
    (``held``: bytes, or a count in the pipe once it splices)."""

    __slots__ = ("relay", "src", "dst", "sfd", "dfd", "moved", "held", "pipe", "pending",
                 "waiting", "ended", "reset")

    def __init__(self, relay: Relay, src: socket.socket, dst: socket.socket) -> None:
        self.relay = relay
        self.src, self.dst = src, dst
        self.sfd, self.dfd = src.fileno(), dst.fileno()
        self.moved = 0
        self.held = b""  # read, not yet sent (recv mode)
        self.pipe: tuple[int, int] | None = None
        self.pending = 0  # bytes in the pipe, not yet spliced out (splice mode)
        self.waiting = ""  # "r": the loop watches src; "w": it watches dst; "": neither
        self.ended = False
        self.reset: socket.socket | None = None

    def start(self) -> None:
        if not self.ended:  # (the other direction's reset may have stopped this one first)
            self._watch("r")
            self.step()

    def _watch(self, what: str) -> None:
        if what == self.waiting:
            return
        loop = self.relay.loop
        if self.waiting == "r":
            loop.remove_reader(self.sfd)
        elif self.waiting == "w":
            loop.remove_writer(self.dfd)
        if what == "r":
            loop.add_reader(self.sfd, self.step)
        elif what == "w":
            loop.add_writer(self.dfd, self.step)
        self.waiting = what

    def step(self) -> None:
        try:
            self._step()
        except Exception as exc:  # not the network's doing: cut both ends, say why
            self.relay.failed(exc)

    def _step(self) -> None:
        for _ in range(ROUNDS):
            if self.held or self.pending:  # write out what was read first
                try:
                    if self.pipe is None:
                        sent = self.dst.send(self.held)
                        self.held = self.held[sent:]
                    else:
                        sent = os.splice(self.pipe[0], self.dfd, self.pending, flags=_FLAGS)
                        self.pending -= sent
                    self.moved += sent
                except BlockingIOError:
                    self._watch("w")
                    return
                except OSError as exc:
                    if exc.errno not in _RESET:
                        raise
                    self._end(self.dst)
                    return
                if self.held or self.pending:
                    continue
                self._watch("r")
            try:
                if self.pipe is None and self.moved >= SPLICE_AFTER:
                    self.pipe = _pipe()
                if self.pipe is None:
                    data = self.src.recv(RECV_SIZE)
                    n = len(data)
                    self.held = data
                else:
                    n = os.splice(self.sfd, self.pipe[1], CHUNK, flags=_FLAGS)
                    self.pending = n
            except BlockingIOError:
                self._watch("r")
                return
            except OSError as exc:
                if exc.errno not in _RESET:
                    raise
                self._end(self.src)
                return
            if n == 0:
                self._end(None)
                return

    def _end(self, reset: socket.socket | None) -> None:
        self.close()
        self.reset = reset
        if reset is None:  # a real EOF: pass it on as a half-close
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self.relay.ended(self)

    def close(self) -> None:
        """Stop watching and drop the pipe; idempotent (the relay's end, a cancel)."""
        if self.ended:
            return
        self.ended = True
        self._watch("")
        if self.pipe is not None:
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            self.pipe = None


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)  # fewer splice calls per byte
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size: the default 64 KiB still works
    return r, w


class Relay:
    """Both directions of ``a`` and ``b``; :attr:`done` has (bytes a->b, bytes b->a) once both
    have ended. Closes neither socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop, a: socket.socket,
                 b: socket.socket) -> None:
        self.loop = loop
        self.a, self.b = a, b
        self.done: asyncio.Future[tuple[int, int]] = loop.create_future()
        self.ab = _Direction(self, a, b)
        self.ba = _Direction(self, b, a)

    def start(self) -> None:
        self.ab.start()
        self.ba.start()

    def ended(self, direction: _Direction) -> None:
        if direction.reset is not None:  # one end reset: reset the other, stop both
            other = self.b if direction.reset is self.a else self.a
            try:
                other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass
            self.close()
        if self.ab.ended and self.ba.ended and not self.done.done():
            self.done.set_result((self.ab.moved, self.ba.moved))

    def failed(self, exc: BaseException) -> None:
        abort(self.a, self.b)
        self.close()
        if not self.done.done():
            self.done.set_exception(exc)

    def close(self) -> None:
        """Stop both directions (their fds unwatched, pipes closed): before the sockets close."""
        self.ab.close()
        self.ba.close()


async def relay(a: socket.socket, b: socket.socket) -> tuple[int, int]:
    """Both directions until both have ended; returns (bytes a->b, bytes b->a). Closes neither.

    A reset on one side is passed on as a reset of the other (``SO_LINGER`` 0, so that the
    caller's close sends RST), not as a FIN: the peer must not take a cut stream for a whole one.
    Cancelled (the flow cut short), it stops watching both sockets before returning.
    """
    r = Relay(asyncio.get_running_loop(), a, b)
    try:
        r.start()
        return await r.done
    finally:
        r.close()


def abort(*socks: socket.socket) -> None:
    """Make the coming close() send RST, not FIN: for streams cut short."""
    for s in socks:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
