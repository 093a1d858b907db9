"""Stream to stream with ``os.splice`` through a pipe: the bytes never enter Python.

Each direction is its own pump: splice from the source socket into a pipe, from the pipe into the
destination, waiting on the loop for readability or writability when the kernel says EAGAIN. EOF
in one direction is a half-close (``shutdown(SHUT_WR)`` on the other socket); the other direction
keeps flowing until it ends too.
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


async def pump(src: socket.socket, dst: socket.socket) -> tuple[int, socket.socket | None]:
    """Move bytes from ``src`` to ``dst`` until EOF, then half-close ``dst``.

    Returns the byte count and the socket that was reset, if one was (then no FIN is sent).
    """
    loop = asyncio.get_running_loop()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)  # fewer splice calls per byte
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size: the default 64 KiB still works
    moved, reset = 0, None
    try:
        while reset is None:
            try:
                n = os.splice(src.fileno(), w, CHUNK, flags=_FLAGS)
            except BlockingIOError:
                await wait_fd(loop, src.fileno(), writable=False)
                continue
            except OSError as exc:
                if exc.errno not in _RESET:
                    raise
                reset = src
                break
            if n == 0:
                break
            while n:  # drain the pipe into the destination
                try:
                    m = os.splice(r, dst.fileno(), n, flags=_FLAGS)
                except BlockingIOError:
                    await wait_fd(loop, dst.fileno(), writable=True)
                    continue
                except OSError as exc:
                    if exc.errno not in _RESET:
                        raise
                    reset = dst
                    break
                n -= m
                moved += m
    finally:
        os.close(r)
        os.close(w)
    if reset is None:  # a real EOF (a cancelled pump never gets here: no false FIN)
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    return moved, reset


def abort(*socks: socket.socket) -> None:
    """Make the coming close() send RST, not FIN: for streams cut short."""
    for s in socks:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass


async def relay(a: socket.socket, b: socket.socket) -> tuple[int, int]:
    """Both directions until both have ended; returns (bytes a->b, bytes b->a). Closes neither.

    A reset on one side is passed on as a reset of the other (``SO_LINGER`` 0, so that the
    caller's close sends RST), not as a FIN: the peer must not take a cut stream for a whole one.
    """
    ab = asyncio.ensure_future(pump(a, b))
    ba = asyncio.ensure_future(pump(b, a))
    moved = {ab: 0, ba: 0}
    pending = {ab, ba}
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                reset: socket.socket | None
                if task.exception() is not None:
                    reset = a  # an unexpected error: cut both ends
                else:
                    moved[task], reset = task.result()
                if reset is not None:
                    other = b if reset is a else a
                    other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                    for t in pending:
                        t.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    pending = set()
    finally:
        for t in (ab, ba):
            if not t.done():
                t.cancel()
        await asyncio.gather(ab, ba, return_exceptions=True)
    return moved[ab], moved[ba]
