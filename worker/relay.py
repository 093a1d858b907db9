"""Stream to stream with ``os.splice`` through a pipe: the bytes never enter Python.

Each direction is its own pump: splice from the source socket into a pipe, from the pipe into the
destination, waiting on the loop for readability or writability when the kernel says EAGAIN. EOF
in one direction is a half-close (``shutdown(SHUT_WR)`` on the other socket); the other direction
keeps flowing until it ends too.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket

CHUNK = 1 << 20
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


async def _wait(loop: asyncio.AbstractEventLoop, fd: int, writable: bool) -> None:
    fut = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if writable else \
        (loop.add_reader, loop.remove_reader)
    add(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        remove(fd)


async def pump(src: socket.socket, dst: socket.socket) -> int:
    """Move bytes from ``src`` to ``dst`` until EOF; then half-close ``dst``. Returns the count."""
    loop = asyncio.get_running_loop()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    moved = 0
    try:
        while True:
            try:
                n = os.splice(src.fileno(), w, CHUNK, flags=_FLAGS)
            except BlockingIOError:
                await _wait(loop, src.fileno(), writable=False)
                continue
            except OSError as exc:
                if exc.errno in (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE):
                    break
                raise
            if n == 0:
                break
            while n:  # drain the pipe into the destination
                try:
                    m = os.splice(r, dst.fileno(), n, flags=_FLAGS)
                except BlockingIOError:
                    await _wait(loop, dst.fileno(), writable=True)
                    continue
                n -= m
                moved += m
    finally:
        os.close(r)
        os.close(w)
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    return moved


async def relay(a: socket.socket, b: socket.socket) -> tuple[int, int]:
    """Both directions until both have ended; returns (bytes a->b, bytes b->a). Closes neither."""
    ab, ba = await asyncio.gather(pump(a, b), pump(b, a), return_exceptions=True)
    return (ab if isinstance(ab, int) else 0, ba if isinstance(ba, int) else 0)
