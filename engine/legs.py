"""The two legs of a flow: where its packets or bytes come from and where they go.

A flow has a *client* leg (the side whose first packet started it) and a *server* leg (its
off-ramp). Each leg is one of three kinds:

- an IP tunnel (:class:`TunnelLeg`): packets, addressed as the client sent them; a connected or
  GUE tunnel of this worker, or one another worker holds (reached over the mesh);
- a kernel stream (:class:`StreamLeg`): a TCP socket, the off-ramp's connection (the upgraded
  side is the kernel's own socket in the namespace, accepted once the flow's SYN reached it);
- a datagram socket (:class:`DatagramLeg`): UDP payloads or ICMP echo messages;
- IP packets into the tunnel of a device of the tenant's private network (:class:`RoutedLeg`,
  layer 3);
- a stream *downgraded* into a device's tunnel (:class:`DowngradedLeg`): a kernel socket that nsd
  connected, inside the namespace, to a NAT slot of the worker; its packets come out of the TUN and
  go into the device's tunnel as the client's;
- an accepted TCP connection (:class:`AcceptedLeg`), the client leg of a ``kind = "tcp"`` on-ramp.

The engine only reads a leg's description; the sockets are the driver's (``handle``), opaque here.
Between two stream legs sits a stream handler (see :mod:`ipferry.worker.streams`): splice today.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Protocol

from ipferry.wire.packet import TCP_ACK, TCP_FIN, TCP_RST

if TYPE_CHECKING:
    from ipferry.wire.nat import NatSlot
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
    def device(self) -> tuple[int, int]: ...  # what it reaches: (origin, the id there)
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
    @property
    def anycast(self) -> bool: ...  # one node of several behind ECMP hears it (GUE)
    @property
    def lands(self) -> bool: ...  # a TUN queue: new flows are served where they land

    def send(self, packet: bytes | bytearray) -> None:
        """The driver's (the engine never sends): one datagram in the tunnel's framing."""


class StreamLeg:
    """A kernel stream: the off-ramp's TCP connection to ``upstream``."""

    __slots__ = ("upstream", "handle", "connected")
    kind = LegKind.STREAM
    layer = "tcp"
    tunnel: TunnelLeg | None = None  # (a downgraded leg's destination)

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.handle: object = None  # the driver's socket
        self.connected = False


class DowngradedLeg(StreamLeg):
    """A stream downgraded into ``tunnel``, a device's: the driver asks nsd for a socket connected
    (inside the namespace) to ``slot``, a NAT slot of this worker; the kernel's packets to the slot
    come out of the worker's TUN and go into the device's tunnel as ``peer`` -> ``device``
    (the client's address, a port that this worker owns, and the device's address and port).
    The device's answers come back the same way.

    The leg's own TCP connection is tracked here (both FINs and the last ACK, or a reset): a flow
    ends only once both its legs are done, so the last packets of either still find it."""

    __slots__ = ("tunnel", "slot", "peer", "device", "kernel", "fins", "last_fin", "done")
    layer = "tcp"

    def __init__(self, upstream: tuple[str, int], tunnel: TunnelLeg, slot: NatSlot,
                 peer: tuple[bytes, int], device: tuple[bytes, int]) -> None:
        super().__init__(upstream)
        self.tunnel = tunnel
        self.slot = slot
        self.peer = peer  # what the device sees the connection come from
        self.device = device
        self.kernel: tuple[bytes, int] | None = None  # the socket's own address, from its SYN
        self.fins = 0  # bit 0: the kernel sent its FIN, bit 1: the device did
        self.last_fin = 0
        self.done = False

    def observe(self, from_device: bool, flags: int) -> bool:
        """Track one packet of the leg's connection; True once it is over (a reset, or the ACK
        of the second FIN)."""
        if flags & TCP_RST:
            self.done = True
            return True
        bit = 2 if from_device else 1
        if flags & TCP_FIN and not self.fins & bit:
            self.fins |= bit
            self.last_fin = bit
        elif self.fins == 3 and bit != self.last_fin and flags & TCP_ACK:
            self.done = True
        return self.done


class RoutedLeg:
    """IP packets into ``tunnel``, a device of the tenant's private network (layer 3). With
    ``rebuild`` (a UDP flow asked for as a stream), each datagram's payload is wrapped in fresh
    IP and UDP headers instead of the packet passing as it came."""

    __slots__ = ("tunnel", "upstream", "rebuild")
    kind = LegKind.TUNNEL
    layer = "ip"

    def __init__(self, tunnel: TunnelLeg, upstream: tuple[str, int], rebuild: bool = False) -> None:
        self.tunnel = tunnel
        self.upstream = upstream
        self.rebuild = rebuild


class AcceptedLeg:
    """A client's TCP connection accepted by a ``kind = "tcp"`` on-ramp: a stream, no packets.

    It stands where a flow's tunnel would for what the engine and the audit read of a client
    (tenant, context); nothing is ever sent to it as packets."""

    __slots__ = ("tenant", "context", "handle", "onramp", "origin")
    kind = LegKind.STREAM
    id = 0  # no tunnel
    mtu = 65535
    vnet = False
    local = True
    steered = True  # accepted by its owner: never forwarded
    anycast = False
    lands = False

    def __init__(self, tenant: str, context: TunnelContext, handle: object, onramp: str,
                 origin: int) -> None:
        self.tenant = tenant
        self.context = context
        self.handle = handle  # the driver's socket
        self.onramp = onramp
        self.origin = origin

    @property
    def device(self) -> tuple[int, int]:
        return (self.origin, 0)

    def send(self, packet: bytes | bytearray) -> None:
        """A stream takes no packets (an answer to a held packet never comes here)."""


class DatagramLeg:
    """A datagram socket towards ``upstream``: UDP (``protocol`` "udp") or ICMP echo ("icmp")."""

    __slots__ = ("upstream", "protocol", "handle", "last")
    kind = LegKind.DATAGRAM
    tunnel: TunnelLeg | None = None  # (no device behind it)

    def __init__(self, upstream: tuple[str, int], protocol: str) -> None:
        self.upstream = upstream
        self.protocol = protocol
        self.handle: object = None  # the driver's socket reader
        # The client's last packet (its start: all an ICMP error embeds), to answer an error
        # the off-ramp's kernel reports about it.
        self.last: tuple[Parsed, bytes] | None = None

    @property
    def layer(self) -> str:
        return self.protocol


ServerLeg = StreamLeg | DatagramLeg | RoutedLeg


def same_device(a: TunnelLeg | None, b: TunnelLeg) -> bool:
    """Do two tunnel legs reach the same device? The same object, the same tunnel of the same
    worker (another worker's, seen over the mesh or through our queue of its TUN), or the same
    configured GUE site."""
    if a is b:
        return True
    if a is None:
        return False
    if a.id and a.device == b.device:  # (ids are per worker: a queue of another's TUN has ours)
        return True
    site = getattr(a, "site", None)
    return site is not None and site == getattr(b, "site", None) and a.tenant == b.tenant
