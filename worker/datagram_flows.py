"""Upgrade IP -> UDP (and ICMP echo): one datagram socket per flow, no kernel stack of ours needed.

A UDP flow's payloads leave through a UDP socket connected to its off-ramp (the original
destination or the decision's upstream); an ICMP echo flow's requests through an unprivileged
ICMP datagram ("ping") socket, which the host allows only to the groups in
``net.ipv4.ping_group_range``. What comes back is handed to ``on_reply`` as the bare payload (UDP)
or ICMP message (echo), for the data path to wrap back into IP towards the tunnel. Errors the
kernel reports on the connected socket (an ICMP port unreachable from the off-ramp, say) are
handed to ``on_error`` as the kind of ICMP destination unreachable the client must get.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from ipferry.engine.core import UNREACHABLE

from . import metrics

READ_BATCH = 64
READ_SIZE = 65535



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
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._read)

    def send(self, data: bytes | memoryview) -> None:
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
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
