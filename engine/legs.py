"""The two legs of a flow: where its packets or bytes come from and where they go.

A flow has a *client* leg (the side whose first packet started it) and a *server* leg (its
off-ramp). Each leg is one of three kinds:

- an IP tunnel (:class:`TunnelLeg`): packets, addressed as the client sent them; a connected or
  GUE tunnel of this worker, or one another worker holds (reached over the mesh);
- a kernel stream (:class:`StreamLeg`): a TCP socket, the off-ramp's connection (the upgraded
  side is the kernel's own socket in the namespace, accepted once the flow's SYN reached it);
- a datagram socket (:class:`DatagramLeg`): UDP payloads or ICMP echo messages.

The engine only reads a leg's description; the sockets are the driver's (``handle``), opaque here.
Between two stream legs sits a stream handler (see :mod:`ipferry.worker.streams`): splice today.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ipferry.wire.packet import Parsed

    from .decisions import TunnelContext


class LegKind(enum.StrEnum):
    TUNNEL = "tunnel"
    STREAM = "stream"
    DATAGRAM = "datagram"


class TunnelLeg(Protocol):
    """What the engine reads of an IP tunnel, and the send its driver carries actions out with
    (the worker's tunnels add ``close`` and the admin API's row)."""

    @property
    def id(self) -> int: ...
    @property
    def origin(self) -> int: ...  # the worker that holds it
    @property
    def tenant(self) -> str: ...
    @property
    def context(self) -> TunnelContext: ...
    @property
    def mtu(self) -> int: ...
    @property
    def vnet(self) -> bool: ...  # its datagrams start with a virtio-net header
    @property
    def local(self) -> bool: ...  # held by this worker (else: reached over the mesh)
    @property
    def steered(self) -> bool: ...  # the kernel's steering program picked this worker

    def send(self, packet: bytes | bytearray) -> None:
        """The driver's (the engine never sends): one datagram in the tunnel's framing."""


class StreamLeg:
    """A kernel stream: today the off-ramp's TCP connection to ``upstream``."""

    __slots__ = ("upstream", "handle", "connected")
    kind = LegKind.STREAM

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.handle: object = None  # the driver's socket
        self.connected = False


class DatagramLeg:
    """A datagram socket towards ``upstream``: UDP (``protocol`` "udp") or ICMP echo ("icmp")."""

    __slots__ = ("upstream", "protocol", "handle", "last")
    kind = LegKind.DATAGRAM

    def __init__(self, upstream: tuple[str, int], protocol: str) -> None:
        self.upstream = upstream
        self.protocol = protocol
        self.handle: object = None  # the driver's socket reader
        # The client's last packet (its start: all an ICMP error embeds), to answer an error
        # the off-ramp's kernel reports about it.
        self.last: tuple[Parsed, bytes] | None = None


ServerLeg = StreamLeg | DatagramLeg
