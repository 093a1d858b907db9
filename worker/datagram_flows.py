"""Upgrade IP -> UDP (and ICMP echo): one datagram socket per flow, no kernel stack of ours needed.

A UDP flow's payloads leave through a UDP socket connected to its off-ramp (the original
destination or the decision's upstream); an ICMP echo flow's requests through an unprivileged
ICMP datagram ("ping") socket, which the host allows only to the groups in
``net.ipv4.ping_group_range``. What comes back is handed to ``on_reply`` as the bare payload (UDP)
or ICMP message (echo), for the data path to wrap back into IP towards the tunnel. Errors the
kernel reports on the connected socket (an ICMP port unreachable from the off-ramp, say) are
handed to ``on_error`` as the kind of ICMP destination unreachable the client must get.

UDP payloads of one flow that arrive together (one wake-up's packets) and have the same size (the
last may be shorter) leave in one ``sendmsg`` with ``UDP_SEGMENT`` (UDP GSO): the kernel cuts
them into the same datagrams, after one trip down the stack instead of one per datagram. They go
on the loop's next turn, at the latest. A path that cannot take GSO (``EIO``, ``EINVAL``) turns
it off for that flow and gets them one by one.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Callable

from ipferry.engine.core import UNREACHABLE

from . import metrics

READ_BATCH = 64
READ_SIZE = 65535
SOL_UDP = 17
UDP_SEGMENT = 103  # <linux/udp.h>
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS of every kernel that has UDP GSO
GSO_MAX_BYTES = 65000  # one send's payload: under an IP datagram's 64 KiB, headers and all
GSO_MAX_SEGMENT = 1472  # a bigger datagram would be cut into IP fragments: GSO refuses those
_GSO_REFUSED = (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP)
_U16 = struct.Struct("=H")



class PingNotPermitted(OSError):
    """The host does not let this process open ICMP datagram sockets."""


def open_upstream(kind: str, upstream: tuple[str, int]) -> socket.socket:
    """A non-blocking datagram socket connected to ``upstream`` (``kind``: "udp" or "icmp")."""
    family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
    if kind == "udp":
        proto = 0
    else:
        proto = socket.IPPROTO_ICMPV6 if family == socket.AF_INET6 else socket.IPPROTO_ICMP
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM, proto)
    except PermissionError as exc:
        raise PingNotPermitted(exc.errno, "ICMP datagram sockets are not allowed for this "
                               "group (net.ipv4.ping_group_range)") from None
    try:
        if family == socket.AF_INET6:  # never reach IPv4 through a mapped address
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setblocking(False)
        sock.connect((upstream[0], upstream[1] if kind == "udp" else 0))
    except BaseException:
        sock.close()
        raise
    return sock


class DatagramUpstream:
    """The off-ramp socket of one datagram flow."""

    def __init__(self, sock: socket.socket, on_reply: Callable[[bytes], None],
                 on_error: Callable[[str], None]) -> None:
        self.sock = sock
        self.on_reply = on_reply
        self.on_error = on_error
        self.closed = False
        self.gso = sock.type == socket.SOCK_DGRAM and sock.proto in (0, socket.IPPROTO_UDP)
        self.gso_sends = 0  # sendmsg calls that carried a batch
        self._batch: list[bytes | memoryview] = []
        self._segment = 0  # the batch's datagram size
        self._bytes = 0
        self._flush_due = False
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._read)

    def send(self, data: bytes | memoryview) -> None:
        n = len(data)
        batch = self._batch
        if batch:
            if (0 < n <= self._segment and len(batch) < GSO_MAX_SEGMENTS
                    and self._bytes + n <= GSO_MAX_BYTES):
                batch.append(data)
                self._bytes += n
                if n < self._segment:  # a shorter datagram ends a GSO batch
                    self.flush()
                return
            self.flush()
        if self.gso and 0 < n <= GSO_MAX_SEGMENT:
            self._batch = [data]
            self._segment = self._bytes = n
            if not self._flush_due:
                self._flush_due = True
                self._loop.call_soon(self._flush_soon)
            return
        self._send_one(data)

    def _flush_soon(self) -> None:
        self._flush_due = False
        self.flush()

    def flush(self) -> None:
        """Send what waits (before the loop's next turn, or now: a close, a datagram that does not
        fit the batch)."""
        batch = self._batch
        if not batch or self.closed:
            return
        self._batch = []
        if len(batch) == 1:
            self._send_one(batch[0])
            return
        try:
            self.sock.sendmsg([b"".join(batch)],
                              [(SOL_UDP, UDP_SEGMENT, _U16.pack(self._segment))])
            self.gso_sends += 1
        except BlockingIOError:
            metrics.DROPS.labels("upstream_queue_full").inc(len(batch))
        except OSError as exc:
            if exc.errno not in _GSO_REFUSED:
                self._failed(exc)
                return
            self.gso = False  # (a route without checksum offload, a smaller MTU): one by one
            for data in batch:
                self._send_one(data)

    def _send_one(self, data: bytes | memoryview) -> None:
        try:
            self.sock.send(data)
        except BlockingIOError:
            metrics.DROPS.labels("upstream_queue_full").inc()  # datagram semantics: lost
        except OSError as exc:
            self._failed(exc)

    def _read(self) -> None:
        for _ in range(READ_BATCH):
            try:
                data = self.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._failed(exc)
                return
            self.on_reply(data)
            if self.closed:
                return

    def _failed(self, exc: OSError) -> None:
        kind = None if exc.errno is None else UNREACHABLE.get(exc.errno)
        if kind is None:
            metrics.DROPS.labels("upstream_error").inc()
            return
        self.on_error(kind)

    def close(self) -> None:
        if self.closed:
            return
        self.flush()  # what the flow sent before it ended still goes
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
