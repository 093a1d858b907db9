"""What the application decides about, and decides: values the engine and the hooks share.

Frozen dataclasses (a decision is shared by every flow its rule decides: memory per flow).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TunnelContext:
    tenant: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FlowStart:
    tenant: str
    protocol: str  # "tcp", "udp", ...
    src: str
    sport: int
    dst: str
    dport: int
    context: TunnelContext
    # The name the daemon's resolver gave the tenant this destination for, if it did (lately).
    host: str | None = None


@dataclass(frozen=True)
class Decision:
    """``upgrade``: let the flow go on, to ``upstream`` (None: the original destination);
    ``drop``: refuse, with ``reason`` (the rule that said so).

    ``layer`` says how a flow that goes on is carried: None (the default) is IP packets into the
    tunnel of a device of the tenant's private network when the destination is one, else
    upgraded to a stream or datagrams and off-ramped by a socket; ``"ip"`` asks for IP packets
    (a destination that is no device is then off-ramped as by default); ``"stream"`` always
    upgrades a TCP flow to a stream (so :meth:`on_stream_start` may inspect it) and, towards a
    device, downgrades it back into that device's tunnel."""

    action: str  # "upgrade" | "drop"
    upstream: tuple[str, int] | None = None
    reason: str = ""
    layer: str | None = None  # None | "ip" | "stream"

    @classmethod
    def upgrade(cls, upstream: tuple[str, int] | None = None, reason: str = "",
                layer: str | None = None) -> Decision:
        return cls("upgrade", upstream, reason, layer)

    @classmethod
    def drop(cls, reason: str) -> Decision:
        return cls("drop", None, reason)


@dataclass(frozen=True)
class StreamStart:
    """What ``on_stream_start`` sees of a stream about to be relayed: its flow, where the server
    leg goes, and whether that leg is a stream downgraded into a device's tunnel (then
    ``destination_tunnel`` is that tunnel's id)."""

    flow: FlowStart
    upstream: tuple[str, int]
    downgraded: bool = False
    destination_tunnel: int | None = None


@dataclass(frozen=True)
class FlowEnd:
    start: FlowStart
    decision: Decision
    packets: tuple[int, int]  # (to server, to client)
    bytes: tuple[int, int]
    payload_bytes: tuple[int, int]
    duration: float
    close_reason: str


@dataclass(frozen=True)
class DnsQueryStart:
    """What ``on_dns_query`` sees of a query to the daemon's resolver: who asks (the flow's
    tenant, source and tunnel context), for what name (lowercase, no trailing dot) and type."""

    tenant: str
    src: str
    sport: int
    name: str
    type: str  # "A", "AAAA", "TXT", ... (the number for a type without a name)
    context: TunnelContext


@dataclass(frozen=True)
class DnsDecision:
    """``allow``: forward to the host's resolver; ``nxdomain`` / ``refused``: answer so;
    ``answer``: answer ``address`` (an A or AAAA record, TTL 60) without asking anyone."""

    action: str  # "allow" | "nxdomain" | "refused" | "answer"
    address: str | None = None
    reason: str = ""

    @classmethod
    def allow(cls, reason: str = "") -> DnsDecision:
        return cls("allow", None, reason)

    @classmethod
    def nxdomain(cls, reason: str = "") -> DnsDecision:
        return cls("nxdomain", None, reason)

    @classmethod
    def refused(cls, reason: str = "") -> DnsDecision:
        return cls("refused", None, reason)

    @classmethod
    def answer(cls, address: str, reason: str = "") -> DnsDecision:
        return cls("answer", address, reason)
