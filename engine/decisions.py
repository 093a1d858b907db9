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


@dataclass(frozen=True)
class Decision:
    """``upgrade``: terminate in the kernel and off-ramp to ``upstream`` (None: the original
    destination). ``drop``: refuse, with ``reason`` (the rule that said so)."""

    action: str  # "upgrade" | "drop"
    upstream: tuple[str, int] | None = None
    reason: str = ""

    @classmethod
    def upgrade(cls, upstream: tuple[str, int] | None = None, reason: str = "") -> Decision:
        return cls("upgrade", upstream, reason)

    @classmethod
    def drop(cls, reason: str) -> Decision:
        return cls("drop", None, reason)


@dataclass(frozen=True)
class FlowEnd:
    start: FlowStart
    decision: Decision
    packets: tuple[int, int]  # (to server, to client)
    bytes: tuple[int, int]
    payload_bytes: tuple[int, int]
    duration: float
    close_reason: str
