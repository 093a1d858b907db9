"""Datagram sockets driven by the loop: drain what is readable, queue what cannot be sent yet.

Tunnels (SOCK_SEQPACKET to a client) and mesh links (SOCK_SEQPACKET between workers) both carry
one packet per datagram; this is their shared I/O.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable

from . import metrics

READ_SIZE = 65536 + 64  # a packet at the largest MTU, plus a mesh frame header
BATCH = 64  # datagrams drained per wake-up before yielding to the loop
QUEUE_BYTES = 8 << 20  # per socket: beyond it packets are dropped (TCP retransmits them)


def drain(sock: socket.socket, on_datagram: Callable[[bytes], None],
          on_eof: Callable[[], None]) -> None:
    """Read up to BATCH datagrams; ``on_eof`` at EOF or error (then stop)."""
    for _ in range(BATCH):
        try:
            data = sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            on_eof()
            return
        on_datagram(data)


class DatagramQueue:
    """Non-blocking datagram sends with a bounded queue while the socket is full."""

    def __init__(self, sock, drop_reason: str) -> None:
        self.sock = sock
        self.drop_reason = drop_reason
        self._queue: deque[bytes] = deque()
        self._queued = 0  # bytes
        self._loop = asyncio.get_running_loop()
        self.closed = False

    def send(self, data: bytes | bytearray, *, control: bool = False) -> bool:
        """Send or queue ``data``; False if it was dropped. ``control`` messages (small, and
        whose loss would desynchronise the peer) are queued beyond the bound."""
        if self.closed:
            return False
        if not self._queue:
            try:
                self.sock.send(data)
                return True
            except BlockingIOError:
                self._loop.add_writer(self.sock.fileno(), self._flush)
            except OSError:
                metrics.DROPS.labels(self.drop_reason).inc()
                return False
        if self._queued >= QUEUE_BYTES and not control:
            metrics.DROPS.labels(self.drop_reason).inc()
            return False
        self._queue.append(bytes(data))
        self._queued += len(data)
        return True

    def _flush(self) -> None:
        while self._queue:
            try:
                self.sock.send(self._queue[0])
            except BlockingIOError:
                return
            except OSError:
                self._queue.clear()
                self._queued = 0
                break
            self._queued -= len(self._queue.popleft())
        self._loop.remove_writer(self.sock.fileno())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._queue:
                self._loop.remove_writer(self.sock.fileno())
                self._queue.clear()
                self._queued = 0
