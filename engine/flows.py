"""Flow tracking, sans I/O: keys, per-flow state and accounting, limits and idle timeouts.

A flow is identified by (tenant, protocol, addresses, ports), always written from the client's
side (the side whose packet started it; an ICMP echo flow uses its identifier as the source port
and 0 as the destination port). TCP follows the handshake, FIN in each direction and RST; UDP and
ICMP flows are *unreplied* until the first reply, then *replied*, and end only on idle timeouts.
Every state has an idle timeout like conntrack's. Ending a flow yields its accounting once.

One record per flow (:class:`Flow`): its tracking, its two legs (:mod:`ipferry.engine.legs`) and
what the engine needs while it is made (held packets, the NAT slot, the off-ramp's deadline), in
one slotted object the table holds: a worker holds 100,000 of them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from ipferry.wire.packet import IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN

if TYPE_CHECKING:
    from ipferry.wire.nat import NatSlot

    from .decisions import Decision
    from .legs import ServerLeg, TunnelLeg

# A packet held while its flow is decided or its off-ramp connects: its bytes, or the bytes and
# the virtio-net header it came with.
Held = bytes | tuple[bytes, bytes]


class FlowKey(NamedTuple):
    """A flow's identity. A tuple, not a frozen dataclass: every packet builds one to look its
    flow up, and a tuple is made, hashed and compared in C (about 5x faster)."""

    tenant: str
    protocol: int
    src: bytes
    sport: int
    dst: bytes
    dport: int

    def reply(self) -> FlowKey:
        """The same flow seen from the other side."""
        return FlowKey(self.tenant, self.protocol, self.dst, self.dport, self.src, self.sport)


class Direction(enum.IntEnum):
    TO_SERVER = 0  # client -> off-ramp ("original" in conntrack's words)
    TO_CLIENT = 1  # replies


class TcpState(enum.StrEnum):
    SYN_SENT = "syn_sent"
    ESTABLISHED = "established"
    FIN_WAIT = "fin_wait"  # one side has sent FIN, the other may still send
    CLOSING = "closing"  # both sides sent FIN, waiting for the last ACK
    TIME_WAIT = "time_wait"
    CLOSED = "closed"
    # Sockets on both sides (an accepted client and an off-ramp): no packet of it is seen, so it
    # is never idle to us; it ends when its stream handler does.
    RELAYING = "relaying"


class DatagramState(enum.StrEnum):
    """UDP and ICMP: conntrack's unreplied and replied (its "stream") states."""

    UNREPLIED = "unreplied"
    REPLIED = "replied"


class CloseReason(enum.StrEnum):
    FIN = "fin"
    RST = "rst"
    IDLE = "idle_timeout"
    EVICTED = "evicted"  # the worker's owner dropped it (shutdown, off-ramp failure)


@dataclass(frozen=True)
class Timeouts:
    """Idle timeouts in seconds per state (the defaults are conntrack's, shortened where a
    proxy holding real sockets should not wait five days for a silent peer). A datagram flow that
    never got a reply (a DNS query, say) goes after ``udp_unreplied``; once replied, after
    ``udp_replied``; ICMP echo flows after ``icmp``."""

    syn_sent: float = 120.0
    established: float = 7200.0
    fin_wait: float = 120.0
    closing: float = 60.0
    time_wait: float = 120.0
    udp_unreplied: float = 30.0
    udp_replied: float = 120.0
    icmp: float = 30.0

    def for_flow(self, flow: Flow) -> float:
        state = flow.state
        if isinstance(state, DatagramState):
            if flow.key.protocol != IPPROTO_UDP:
                return self.icmp
            return self.udp_replied if state is DatagramState.REPLIED else self.udp_unreplied
        return {TcpState.SYN_SENT: self.syn_sent, TcpState.ESTABLISHED: self.established,
                TcpState.FIN_WAIT: self.fin_wait, TcpState.CLOSING: self.closing,
                TcpState.TIME_WAIT: self.time_wait, TcpState.CLOSED: 0.0,
                TcpState.RELAYING: float("inf")}[state]


class Flow:
    """One flow: tracking, legs and the engine's state. Slotted, with counters as plain fields
    (not lists): every object per flow costs RSS (see bench/flowmem.py)."""

    __slots__ = ("key", "decision", "started", "last_seen", "state", "packets_up",
                 "packets_down", "bytes_up", "bytes_down", "fins", "last_fin", "close_reason",
                 "client", "server", "slot", "stream", "pending", "payload_up", "payload_down",
                 "next_seq_up", "next_seq_down", "ended", "audited", "deadline", "seq", "host")

    def __init__(self, key: FlowKey, decision: Decision | None, started: float,
                 client: TunnelLeg | None = None) -> None:
        self.key = key
        self.decision = decision  # the application's, memoised (None: not decided yet)
        self.started = started
        self.last_seen = started
        self.state: TcpState | DatagramState = TcpState.SYN_SENT
        self.packets_up = self.packets_down = 0  # by Direction: to the server, to the client
        self.bytes_up = self.bytes_down = 0
        self.fins = 0  # bit 1 << Direction: that side sent its FIN
        self.last_fin: Direction | None = None  # whose FIN came second gets the last ACK
        self.close_reason: CloseReason | None = None
        # The legs: the client's (a tunnel) and the off-ramp (None until decided).
        self.client: TunnelLeg = client  # type: ignore[assignment]  # (None: a bare table's)
        self.server: ServerLeg | None = None
        self.slot: NatSlot | None = None  # an upgraded TCP flow's address in the namespace
        self.stream: object = None  # the driver's: the upgraded stream and its handler
        # Packets held while the application decides or the off-ramp connects; None after.
        # A tuple (a few at most: smaller than a list).
        self.pending: tuple[Held, ...] | None = ()
        self.payload_up = self.payload_down = 0  # new bytes, by direction
        self.next_seq_up: int | None = None
        self.next_seq_down: int | None = None
        self.ended = False
        self.audited = False  # its flow_start record was written: a flow_end follows
        self.deadline = 0.0  # while the off-ramp connects: when it is given up
        self.seq = 0  # its place in start order (the admin API's pages)
        self.host: str | None = None  # its destination's name, if the daemon's resolver gave it

    @property
    def packets(self) -> list[int]:
        return [self.packets_up, self.packets_down]

    @property
    def bytes(self) -> list[int]:
        return [self.bytes_up, self.bytes_down]

    @property
    def payload(self) -> list[int]:
        return [self.payload_up, self.payload_down]

    @property
    def fin_seen(self) -> list[bool]:
        return [bool(self.fins & 1), bool(self.fins & 2)]

    @property
    def connecting(self) -> bool:
        return self.deadline > 0.0

    def duration(self, now: float) -> float:
        return max(0.0, now - self.started)


class LimitReached(enum.StrEnum):
    """Why a new flow was refused: the ``reason`` label of its drop counter."""

    WORKER = "flow_limit_worker"
    TENANT = "flow_limit_tenant"
    DATAGRAM_TENANT = "datagram_flow_limit_tenant"  # UDP/ICMP: each holds a local port


class FlowTable:
    def __init__(self, *, max_flows: int = 100_000, max_flows_per_tenant: int = 10_000,
                 max_datagram_flows_per_tenant: int = 1_000,
                 timeouts: Timeouts | None = None) -> None:
        self.max_flows = max_flows
        self.max_flows_per_tenant = max_flows_per_tenant
        # A datagram flow holds a connected socket, so a local port of the host: fewer of them.
        self.max_datagram_flows_per_tenant = max_datagram_flows_per_tenant
        self._datagram_per_tenant: dict[str, int] = {}
        self.timeouts = timeouts or Timeouts()
        self._flows: dict[FlowKey, Flow] = {}
        self._per_tenant: dict[str, int] = {}

    @property
    def by_key(self) -> dict[FlowKey, Flow]:
        """The table itself: every flow by its key (read it; change it through start and end)."""
        return self._flows

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[Flow]:
        return iter(list(self._flows.values()))

    def get(self, key: FlowKey) -> Flow | None:
        return self._flows.get(key)

    def tenant_count(self, tenant: str) -> int:
        return self._per_tenant.get(tenant, 0)

    def start(self, key: FlowKey, decision: Decision | None, now: float,
              client: TunnelLeg | None = None) -> Flow | LimitReached:
        """Track a new flow from ``client`` (or say which limit refuses it)."""
        if len(self._flows) >= self.max_flows:
            return LimitReached.WORKER
        if self._per_tenant.get(key.tenant, 0) >= self.max_flows_per_tenant:
            return LimitReached.TENANT
        flow = Flow(key, decision, now, client)
        if key.protocol != IPPROTO_TCP:
            n = self._datagram_per_tenant.get(key.tenant, 0)
            if n >= self.max_datagram_flows_per_tenant:
                return LimitReached.DATAGRAM_TENANT
            self._datagram_per_tenant[key.tenant] = n + 1
            flow.state = DatagramState.UNREPLIED
        self._flows[key] = flow
        self._per_tenant[key.tenant] = self._per_tenant.get(key.tenant, 0) + 1
        return flow

    def observe(self, flow: Flow, direction: Direction, tcp_flags: int, length: int,
                now: float) -> bool:
        """Account one packet and advance the state; True when the flow just ended (TCP only:
        datagram flows end by idle timeout)."""
        if direction:
            flow.packets_down += 1
            flow.bytes_down += length
        else:
            flow.packets_up += 1
            flow.bytes_up += length
        flow.last_seen = now
        if isinstance(flow.state, DatagramState):
            if direction is Direction.TO_CLIENT:
                flow.state = DatagramState.REPLIED
            return False
        if tcp_flags & TCP_RST:
            return self.end(flow, CloseReason.RST)
        state = flow.state
        if state is TcpState.SYN_SENT:
            if direction is Direction.TO_CLIENT and tcp_flags & TCP_SYN and tcp_flags & TCP_ACK:
                flow.state = TcpState.ESTABLISHED
        if tcp_flags & TCP_FIN and not flow.fins & (1 << direction):
            flow.fins |= 1 << direction
            flow.last_fin = direction
            flow.state = TcpState.CLOSING if flow.fins == 3 else TcpState.FIN_WAIT
        elif (flow.state is TcpState.CLOSING and direction is not flow.last_fin
              and tcp_flags & TCP_ACK and not tcp_flags & TCP_FIN):
            # The other side's ACK of the second FIN: done (an ACK of the first FIN that comes
            # late is not it). The engine ends the flow here; its NAT slot waits out the
            # kernel's TIME_WAIT in the pool's quarantine, not in this table.
            flow.state = TcpState.TIME_WAIT
            flow.close_reason = CloseReason.FIN
        return False

    def end(self, flow: Flow, reason: CloseReason) -> bool:
        """Remove ``flow``; True if it was still tracked (so accounting is reported once)."""
        if self._flows.pop(flow.key, None) is None:
            return False
        flow.close_reason = flow.close_reason or reason
        if isinstance(flow.state, DatagramState):
            left = self._datagram_per_tenant[flow.key.tenant] - 1
            if left:
                self._datagram_per_tenant[flow.key.tenant] = left
            else:
                del self._datagram_per_tenant[flow.key.tenant]
        flow.state = TcpState.CLOSED
        left = self._per_tenant[flow.key.tenant] - 1
        if left:
            self._per_tenant[flow.key.tenant] = left
        else:
            del self._per_tenant[flow.key.tenant]
        return True

    def expire(self, now: float) -> list[Flow]:
        """End and return every flow idle longer than its state allows (TIME_WAIT ends as FIN)."""
        ended = []
        for flow in list(self._flows.values()):
            if now - flow.last_seen >= self.timeouts.for_flow(flow):
                reason = CloseReason.FIN if flow.state is TcpState.TIME_WAIT else CloseReason.IDLE
                self.end(flow, reason)
                ended.append(flow)
        return ended
