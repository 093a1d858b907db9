"""Datagram sockets driven by the loop: drain what is readable, queue what cannot be sent yet.

Tunnels (SOCK_SEQPACKET to a client) and mesh links (SOCK_SEQPACKET between workers) both carry
one packet per datagram; this is their shared I/O.

EOF or an empty datagram? On a unix SOCK_SEQPACKET socket ``recv()`` returns ``b""`` for both: a
zero-length record, and the end once the peer has shut down or closed. Linux flags neither (no
``MSG_EOR``, no ``MSG_TRUNC``, no address), and ``SIOCINQ`` does not count empty records. What
does tell them apart (``tests/worker/test_datagrams.py`` pins it on the running kernel):

- the kernel reports the end only when the socket's receive side is shut down (the peer closed
  or called ``shutdown(SHUT_WR)``), which ``poll()`` shows as ``POLLRDHUP``: no ``POLLRDHUP``
  after a ``b""``, and the ``b""`` was a datagram;
- with ``POLLRDHUP`` the peer sends no more: a ``b""`` that leaves bytes in the queue
  (``SIOCINQ``, which on a SEQPACKET socket sums every queued record) was a datagram too, and
  one that leaves no bytes is the end (what it may leave unread is empty records only).

(``SO_PASSCRED`` would be exact, every record carries credentials and the end none, but it needs
``recvmsg()`` and a control buffer on every read.) The fast path pays nothing for this: the
checks run only after a ``recv()`` returned ``b""``.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import select
import socket
import termios
from collections import deque
from collections.abc import Callable

from . import metrics

READ_SIZE = 65536 + 64  # a packet at the largest MTU, plus a mesh frame header
BATCH = 64  # datagrams drained per wake-up before yielding to the loop
QUEUE_BYTES = 8 << 20  # per socket: beyond it packets are dropped (TCP retransmits them)


def drain(sock: socket.socket, on_datagram: Callable[[bytes], None],
          on_eof: Callable[[], None], empty_reason: str = "empty_datagram") -> None:
    """Read up to BATCH datagrams; ``on_eof`` at EOF or error (then stop). A zero-length
    datagram is dropped and counted under ``empty_reason``, never taken for the end."""
    for _ in range(BATCH):
        try:
            data = sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except ConnectionResetError:
            # The peer closed with our packets unread in its queue: Linux reports that once,
            # *before* what the peer sent us first. Those are still ours: read on, to the EOF.
            continue
        except OSError:
            on_eof()
            return
        if data:
            on_datagram(data)
        elif at_eof(sock):
            on_eof()
            return
        else:
            metrics.DROPS.labels(empty_reason).inc()


_RDHUP = select.POLLRDHUP | select.POLLHUP


def at_eof(sock: socket.socket) -> bool:
    """After ``sock.recv()`` returned ``b""`` on a SEQPACKET socket: was that the end (True) or
    a zero-length datagram (False)? See the module's docstring."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    if not any(events & _RDHUP for _, events in poller.poll(0)):
        return False  # the peer can still send: the kernel would have waited, not ended
    return queued_bytes(sock) == 0


def queued_bytes(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive queue (``SIOCINQ``; all records, on SEQPACKET)."""
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    except OSError:
        return 0
    return buf[0]


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
