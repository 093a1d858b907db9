"""The worker's data path: tunnel packets in, kernel TCP streams and datagram sockets out, and back.

For a new flow the application decides. An upgraded TCP flow (IPv4 or IPv6) claims a NAT slot and
its packets are rewritten (source = the slot, destination = the worker's upgrade listener) into the
worker's TUN. The namespace's kernel does the TCP; the worker accepts the connection (the peer
address is the slot, which names the flow), connects the off-ramp and splices the two streams.
The kernel's packets come out of the TUN addressed to the slot and are rewritten back into the
flow's tunnel. An upgraded UDP or ICMP echo flow needs no kernel of ours: its payloads go out of a
datagram socket (:mod:`ipferry.worker.datagram_flows`) and replies are wrapped back into IP.

Refused flows get what a firewall would answer: ICMP "administratively prohibited" for policy,
a TCP reset when a limit is hit; a packet too big for the path gets "fragmentation needed" /
"packet too big" so PMTU discovery works, on either side.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import inspect
import socket
import struct
import time
from collections import deque

from ipferry.wire.icmp import echo_message, icmp_packet, tcp_packet, udp_packet, unreachable
from ipferry.wire.nat import NatPool, NatSlot, SlotPoolExhausted, rewrite_tcp
from ipferry.wire.packet import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_RST,
    TCP_SYN,
    Drop,
    Parsed,
    parse,
)
from ipferry.wire.sharding import owner
from ipferry.wire.vnet import HEADER_SIZE as HEADER
from ipferry.wire.vnet import PLAIN, is_gso, is_partial, sanitize, segment

from . import metrics
from .app import Application, Decision, FlowEnd, FlowStart, RulesApplication
from .audit import AuditLog, Refusals
from .connector import Connector
from .datagram_flows import UNREACHABLE, DatagramUpstream, PingNotPermitted, open_upstream
from .flows import CloseReason, Direction, Flow, FlowKey, FlowTable, LimitReached, TcpState
from .relay import abort, relay
from .tun import TunDevice
from .tunnels import Tunnel

# ICMPv6 is "icmp" to rules and metrics: one word for ping, whichever IP version.
PROTO_NAMES = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp", IPPROTO_ICMP: "icmp", IPPROTO_ICMPV6: "icmp"}
ECHO_REQUEST = {IPPROTO_ICMP: 8, IPPROTO_ICMPV6: 128}
ECHO_REPLY = {0, 129}
DEST_UNREACHABLE = {IPPROTO_ICMP: 3, IPPROTO_ICMPV6: 1}
PING_LOG_INTERVAL = 60.0  # how often "ping sockets not permitted" is logged again
LAST_KEPT = 1280  # of a datagram flow's last client packet: all an ICMP error embeds
MAX_UDP_PAYLOAD = {4: 65535 - 28, 6: 65535 - 8}


def forbidden_destination(dst: bytes) -> bool:
    """Destinations no tunnel may reach whatever the rules say: the daemon's own host
    (loopback: its admin API and on-ramps), "this host" (0.0.0.0/8, ::) and IPv6 spellings of
    IPv4 addresses (::ffff:a.b.c.d, ::a.b.c.d), which would slip past IPv4 rules."""
    if len(dst) == 4:
        return dst[0] in (0, 127)
    return dst[:10] == bytes(10) and (dst[10:12] in (b"\xff\xff", b"\0\0"))
UPGRADE_PORT = 1  # nsd binds the upgrade listeners there (see ipferry.nsd.network)
_LINGER_RST = struct.pack("ii", 1, 0)  # close() sends RST instead of FIN
MAX_PENDING = 8  # packets held per flow while an async hook decides or the off-ramp connects
MAX_INTERNED = 4096  # destination addresses shared between flows (never cleared: bounded)

PKT_IN = metrics.PACKETS.labels("from_tunnel")
PKT_OUT = metrics.PACKETS.labels("to_tunnel")
BYTES_IN = metrics.BYTES.labels("from_tunnel")
BYTES_OUT = metrics.BYTES.labels("to_tunnel")
PKT_TO_MESH = metrics.PACKETS.labels("to_mesh")
PKT_FROM_MESH = metrics.PACKETS.labels("from_mesh")


class FlowEntry(Flow):
    """A flow as the data path holds it: the tracked flow plus its legs and resources, one
    slotted object (the flow table's own record), so that a flow costs a few hundred bytes."""

    __slots__ = ("tunnel", "slot", "pending", "upstream", "payload_up", "payload_down",
                 "next_seq_up", "next_seq_down", "stream", "offramp", "conn", "ended", "audited",
                 "deadline", "seq")

    def __init__(self, key: FlowKey, decision: object, started: float,
                 tunnel: Tunnel | None = None) -> None:
        super().__init__(key, decision, started)
        self.tunnel = tunnel
        self.slot: NatSlot | None = None
        # Packets held while the application decides or the off-ramp connects; None after.
        # A tuple (a few held at most: smaller than a list); a plain packet is held as its
        # bytes, one with a virtio-net header as a pair.
        self.pending: tuple[bytes | tuple[bytes, bytes], ...] | None = ()
        self.upstream: DatagramUpstream | None = None  # UDP and ICMP echo flows
        self.payload_up = self.payload_down = 0  # new bytes, by direction
        self.next_seq_up: int | None = None
        self.next_seq_down: int | None = None
        self.stream: asyncio.Task | None = None
        self.offramp: socket.socket | None = None  # the TCP off-ramp's socket
        self.conn: socket.socket | None = None  # the upgraded connection, once accepted
        self.ended = False
        self.audited = False  # its flow_start record was written: a flow_end follows
        self.deadline = 0.0  # while the off-ramp connects: when it is given up
        self.seq = 0

    @property
    def payload(self) -> list[int]:
        return [self.payload_up, self.payload_down]

    @property
    def start(self) -> FlowStart:
        """What the hooks see of the flow (built when asked: not kept per flow)."""
        k = self.key
        return FlowStart(k.tenant, PROTO_NAMES.get(k.protocol, str(k.protocol)), _addr(k.src),
                         k.sport, _addr(k.dst), k.dport, self.tunnel.context)

    @property
    def connecting(self) -> bool:
        return self.deadline > 0.0


def _addr(b: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(b) == 16 else socket.AF_INET, b)


def reset_for(p: Parsed, packet: bytes) -> bytes:
    """The RST a TCP stack would answer ``packet`` with (RFC 793 "Reset Generation")."""
    if p.tcp_flags & TCP_ACK:
        ack_at = p.ihl + 8
        return tcp_packet(p.dst, p.dport, p.src, p.sport, int.from_bytes(
            packet[ack_at:ack_at + 4], "big"), 0, TCP_RST)
    seg_len = p.payload_length + (1 if p.tcp_flags & TCP_SYN else 0)
    return tcp_packet(p.dst, p.dport, p.src, p.sport, 0, p.seq + seg_len, TCP_RST | TCP_ACK)


class DataPath:
    def __init__(self, *, index: int, app: Application, audit: AuditLog, log,
                 flows: FlowTable, pools: dict[int, NatPool], local: dict[int, bytes],
                 connect_timeout: float, workers: int = 1, forward=None,
                 mtu: int = 65520, audit_on_error: str = "continue",
                 refusals_interval: float = 10.0) -> None:
        self.index = index
        self.workers = workers
        self.forward = forward  # (owner, tunnel, packet): hands a packet to its flow's owner
        self.app = app
        self.audit = audit
        self.log = log
        self.flows = flows
        self.pools = pools  # NAT slots by IP version
        self.local = local  # the upgrade listeners' addresses by IP version
        self.mtu = mtu  # the worker TUN's: larger client packets get "too big"
        self.connect_timeout = connect_timeout
        # The flow table's own dict: an entry *is* its flow's record (one object per flow).
        self.entries: dict[FlowKey, FlowEntry] = flows.by_key  # type: ignore[assignment]
        from .views import FlowIndex
        self.flow_index = FlowIndex()  # live flows in start order: the admin API's pages
        # Off-ramps connecting, in deadline order (one timeout for all: a FIFO is a heap).
        self.connecting: deque[FlowEntry] = deque()
        self.connector: Connector[FlowEntry] = Connector(self._offramp_connected)
        self.audit_on_error = audit_on_error  # "continue" (fail open) or "refuse" (fail closed)
        self.refusals = Refusals(audit, refusals_interval)
        self.by_slot: dict[tuple[bytes, int], FlowEntry] = {}
        self.active: dict[str, int] = {}  # flows by protocol, for the gauge
        self.streams: set[asyncio.Task] = set()  # relays, some outliving their flow entry
        self.hook_tasks: set[asyncio.Task] = set()  # on_flow_end calls in progress
        self.tun: TunDevice | None = None
        self._loop = asyncio.get_running_loop()
        self._listeners: list[socket.socket] = []
        self._ping_logged = -PING_LOG_INTERVAL
        self._error_logged = -PING_LOG_INTERVAL
        # Flows' destination addresses and ports, one object each for all flows (an int past 256
        # is an object of its own per flow otherwise).
        self._destinations: dict[bytes | int, bytes | int] = {}
        # The daemon's own UDP endpoints (GUE on-ramps): a flow there could speak for any tenant.
        self.own_endpoints: set[tuple[bytes | None, int]] = set()  # None: any address

    # -- equipment ---------------------------------------------------------------------------

    def detach(self) -> None:
        """Let go of the TUN and upgrade listener (nsd is rebuilding the namespace)."""
        for entry in list(self.entries.values()):
            self.end_flow(entry, CloseReason.EVICTED, close_reason="namespace_lost")
        for listener in self._listeners:
            self._loop.remove_reader(listener.fileno())
        self._listeners = []
        self.tun = None

    def attach(self, tun: TunDevice, *upgrade: socket.socket) -> None:
        """Use this TUN and these upgrade listeners (again after nsd rebuilt the namespace)."""
        self.tun = tun
        tun.on_packet = self.on_tun_packet
        for listener in upgrade:
            listener.setblocking(False)
            self._loop.add_reader(listener.fileno(), self._accept_upgraded, listener)
            self._listeners.append(listener)

    # -- from the tunnel ---------------------------------------------------------------------

    def on_tunnel_packet(self, tunnel: Tunnel, data: bytes) -> None:
        """A datagram of ``tunnel``: the packet (after a virtio-net header on a vnet tunnel).

        Nothing a packet does may raise out of here (the rest of the read batch would be lost):
        a fault of ours is dropped, counted (``internal_error``) and logged."""
        try:
            self._on_tunnel_packet(tunnel, data)
        except Exception:
            self._internal_error("tunnel_packet")

    def _internal_error(self, where: str) -> None:
        metrics.DROPS.labels("internal_error").inc()
        now = time.monotonic()
        if now - self._error_logged >= PING_LOG_INTERVAL:
            self._error_logged = now
            self.log.error("internal_error", where=where, exc_info=True)

    def _on_tunnel_packet(self, tunnel: Tunnel, data: bytes) -> None:
        if tunnel.local:
            PKT_IN.inc()
            BYTES_IN.inc(len(data) - (HEADER if tunnel.vnet else 0))
        else:
            PKT_FROM_MESH.inc()
        if tunnel.vnet:
            header, packet = data[:HEADER], memoryview(data)[HEADER:]
        else:
            header, packet = None, data
        p = parse(packet)
        if isinstance(p, Drop):
            metrics.DROPS.labels(p.value).inc()
            return
        if header is not None:
            # The client's header steers the kernel and our software GSO: only the truth passes.
            header = sanitize(header, p.version, p.protocol, p.ihl, p.payload_offset,
                              p.payload_length)
            if header is None:
                metrics.DROPS.labels("bad_vnet_header").inc()
                return
            if len(packet) > p.total_length:
                packet = packet[:p.total_length]
        if p.inner is None:
            key = FlowKey(tunnel.tenant, p.protocol, p.src, p.sport, p.dst, p.dport)
            entry = self.entries.get(key)
        else:
            entry = None  # an ICMP error: its flow is the embedded packet's
        if entry is None and self.workers > 1 and tunnel.local:
            # Only flows we own have entries here: hash only for the others (and new ones).
            h = p.inner or p
            o = owner(h.protocol, h.src, h.sport, h.dst, h.dport, self.workers)
            if o != self.index:
                if not tunnel.steered:
                    self.forward(o, tunnel, data)
                    return
                # The kernel's steering program disagrees with us: serve it where it landed
                # (every packet of the flow lands here alike), but count it: it should not be.
                metrics.GUE_MISSTEERED.inc()
        if p.inner is not None:
            self.on_tunnel_icmp_error(tunnel, p, packet)
            return
        if entry is not None and entry.tunnel is not tunnel:
            # Same tenant and 4-tuple from another tunnel: never let it touch this flow.
            metrics.DROPS.labels("tunnel_mismatch").inc()
            return
        if p.protocol == IPPROTO_TCP and p.total_length > self.mtu and not (
                header and is_gso(header)):  # (a superframe is many segments)
            self._too_big_for_tun(tunnel, p, packet)  # before any flow starts or waits
            return
        if entry is None:
            if not self._starts_flow(tunnel, p, packet):
                return
            entry = self.start_flow(tunnel, key, p, packet, header)
            if entry is None:
                return
        if entry.pending is not None:
            # Held while the application decides or the off-ramp connects (connect before
            # accept: the client's SYN reaches the kernel only once the off-ramp answered).
            if p.protocol == IPPROTO_TCP and p.tcp_flags & TCP_RST:
                # The client gave up (its tunnel alone can reach this flow): so do we, now.
                self.flows.observe(entry, Direction.TO_SERVER, p.tcp_flags, p.total_length,
                                   time.monotonic())
                self.end_flow(entry, CloseReason.RST)
                return
            if len(entry.pending) >= MAX_PENDING:
                metrics.DROPS.labels("decision_pending" if entry.decision is None
                                     else "connect_pending").inc()  # the client retransmits
                return
            entry.pending += (bytes(packet) if header is None else (bytes(packet), header),)
            return
        self.to_upstream(entry, p, packet, header)

    def _starts_flow(self, tunnel: Tunnel, p: Parsed, packet: bytes) -> bool:
        """May this packet of no known flow start one? (Counted and answered when not.)"""
        if forbidden_destination(p.dst) or (p.protocol == IPPROTO_UDP and (
                (p.dst, p.dport) in self.own_endpoints or (None, p.dport) in self.own_endpoints)):
            metrics.DROPS.labels("forbidden_destination").inc()
            self._answer_unreachable(tunnel, p, packet, "admin")
            return False
        if p.protocol == IPPROTO_TCP:
            if p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN:
                return True
            # Not the start of a flow we know (e.g. ours died with a worker): reset it so the
            # client fails fast instead of retransmitting into the void.
            metrics.DROPS.labels("no_flow").inc()
            if not p.tcp_flags & TCP_RST:
                self.send_to_tunnel(tunnel, reset_for(p, packet))
            return False
        if p.protocol != IPPROTO_UDP and p.icmp_type != ECHO_REQUEST[p.protocol]:
            metrics.DROPS.labels("icmp_unsolicited").inc()  # an echo reply nobody asked for
            return False
        return True

    def start_flow(self, tunnel: Tunnel, key: FlowKey, p: Parsed, packet: bytes,
                   header: bytes | None = None) -> FlowEntry | None:
        """A new flow: ask the application. Returns the entry when the flow goes on (its packet
        is then held in ``pending`` or sent on by the caller), None when it was refused."""
        now = time.monotonic()
        if len(self._destinations) < MAX_INTERNED:  # many flows, few destinations: one copy
            key = FlowKey(key.tenant, key.protocol, key.src, key.sport,
                          self._destinations.setdefault(key.dst, key.dst),
                          self._destinations.setdefault(key.dport, key.dport))
        entry = self.flows.start(key, None, now,
                                 lambda k, d, t: FlowEntry(k, d, t, tunnel))
        if isinstance(entry, LimitReached):
            metrics.DROPS.labels(entry.value).inc()
            # Summed up per tenant and interval: a flood of refusals must not flood the disk.
            self.refusals.add(key.tenant, entry.value)
            self.refuse(tunnel, p, packet, policy=False)
            return None
        self.flow_index.add(entry)  # (the table holds it already: self.entries is its dict)
        protocol = PROTO_NAMES.get(key.protocol, "other")
        metrics.FLOWS_STARTED.labels(protocol).inc()
        self._active(protocol, +1)
        try:
            decision = self.app.on_flow_start(entry.start)
        except Exception as exc:
            return self._hook_failed(entry, p, packet, exc)
        if inspect.isawaitable(decision):
            entry.pending += (bytes(packet) if header is None else (bytes(packet), header),)
            self._loop.create_task(self._decide_later(entry, decision, p, packet))
            return None
        return entry if self.apply_decision(entry, decision, p, packet) else None

    async def _decide_later(self, entry: FlowEntry, pending, p: Parsed, packet: bytes) -> None:
        packet = bytes(packet)  # the first packet, kept to answer it if the flow is refused
        try:
            decision = await pending
        except Exception as exc:
            if not entry.ended:
                self._hook_failed(entry, p, packet, exc)
            return
        if entry.ended:
            return
        if self.apply_decision(entry, decision, p, packet) and entry.pending is not None \
                and not entry.connecting:
            self._release(entry)  # a datagram flow: what came meanwhile goes on now

    def _release(self, entry: FlowEntry) -> None:
        """Send on what was held while the flow was decided and its off-ramp connected."""
        held, entry.pending = entry.pending or (), None
        for item in held:
            packet, header = (item, None) if isinstance(item, bytes) else item
            if entry.ended:
                return
            p = parse(packet)
            if isinstance(p, Parsed):
                self.to_upstream(entry, p, packet, header)

    def _hook_failed(self, entry: FlowEntry, p: Parsed, packet: bytes, exc: Exception) -> None:
        self.log.warning("flow_hook_failed", error=repr(exc), **self._flow_fields(entry))
        metrics.DROPS.labels("hook_error").inc()
        entry.decision = Decision.drop(f"hook error: {exc!r}")
        self.refuse(entry.tunnel, p, packet, policy=False)
        self.end_flow(entry, CloseReason.EVICTED, audit_start=True)
        return None

    def apply_decision(self, entry: FlowEntry, decision: Decision, p: Parsed,
                       packet: bytes) -> bool:
        """Memoise the decision; True when the flow goes on (upgraded), False when refused.

        A TCP flow goes on held: its off-ramp connects first, and the client's SYN goes to the
        kernel only when that succeeded (see :meth:`_offramp_connected`)."""
        if not isinstance(decision, Decision):
            return self._hook_failed(entry, p, packet, TypeError(f"not a Decision: {decision!r}"))
        entry.decision = decision
        if decision.action == "upgrade" and p.protocol == IPPROTO_TCP:
            # A limit first: a flow refused for want of a slot is summed up, not audited alone.
            try:
                entry.slot = self.pools[p.version].claim()
            except SlotPoolExhausted:
                return self._refuse_past_limit(entry, p, packet, "nat_exhausted")
            self.by_slot[entry.slot] = entry
            self._nat_gauge()
        recorded = self.audit.record(
            "flow_start", decision=decision.action, reason=decision.reason,
            upstream=_fmt(decision.upstream), **self._flow_fields(entry))
        entry.audited = True  # its flow_end is written (or counted lost) in any case
        if not recorded and self.audit_on_error == "refuse" and decision.action == "upgrade":
            # Fail closed: no flow goes without its record while the sink fails.
            return self._refuse_past_limit(entry, p, packet, "audit_unavailable")
        if decision.action != "upgrade":
            metrics.DROPS.labels("denied").inc()
            self.refuse(entry.tunnel, p, packet, policy=True)
            self.end_flow(entry, CloseReason.EVICTED, close_reason="denied")
            return False
        if p.protocol != IPPROTO_TCP:
            if not self._open_datagram_upstream(entry, p, packet):
                return False
            if not entry.pending:
                entry.pending = None  # nothing came while it was decided: straight on
            return True
        self._connect_offramp(entry, p, packet)
        return not entry.ended

    def _refuse_past_limit(self, entry: FlowEntry, p: Parsed, packet: bytes,
                           reason: str) -> bool:
        """Refuse a decided flow for want of a resource: counted, answered (a reset for TCP,
        "administratively prohibited" for the rest), summed up in the audit, not per flow."""
        metrics.DROPS.labels(reason).inc()
        self.refusals.add(entry.key.tenant, reason)
        entry.audited = False  # summed up in a flows_refused record, no flow_end of its own
        self.refuse(entry.tunnel, p, packet, policy=p.protocol != IPPROTO_TCP)
        self.end_flow(entry, CloseReason.EVICTED, close_reason=reason)
        return False

    def _nat_gauge(self) -> None:
        metrics.NAT_SLOTS.set(sum(pool.in_use for pool in self.pools.values()))

    def _open_datagram_upstream(self, entry: FlowEntry, p: Parsed, packet: bytes) -> bool:
        kind = "udp" if p.protocol == IPPROTO_UDP else "icmp"
        upstream = entry.decision.upstream or (_addr(entry.key.dst), entry.key.dport)
        if kind == "icmp" and (":" in upstream[0]) != (p.version == 6):
            upstream = (_addr(entry.key.dst), 0)  # an echo cannot change IP version on the way
        try:
            sock = open_upstream(kind, upstream)
        except PingNotPermitted as exc:
            metrics.DROPS.labels("icmp_not_permitted").inc()
            now = time.monotonic()
            if now - self._ping_logged >= PING_LOG_INTERVAL:
                self._ping_logged = now
                self.log.error("ping_not_permitted", error=exc.strerror,
                               fix="allow the daemon's group to open ICMP datagram sockets: "
                                   "sysctl -w net.ipv4.ping_group_range='0 2147483647' in the "
                                   "daemon's network namespace")
            self.end_flow(entry, CloseReason.EVICTED, close_reason="icmp_not_permitted")
            return False
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EADDRNOTAVAIL):
                # No local port left for one more connected socket: a limit, not the network.
                metrics.DROPS.labels("local_ports_exhausted").inc()
                self.end_flow(entry, CloseReason.EVICTED, close_reason="local_ports_exhausted")
                return False
            metrics.UPSTREAM_FAILURES.labels("unreachable").inc()
            self._answer_unreachable(entry.tunnel, p, packet, UNREACHABLE.get(exc.errno, "host"))
            self.end_flow(entry, CloseReason.EVICTED, close_reason="upstream_unreachable")
            return False
        entry.upstream = DatagramUpstream(sock, functools.partial(self.on_upstream_reply, entry),
                                          functools.partial(self.on_upstream_error, entry))
        return True

    def refuse(self, tunnel: Tunnel, p: Parsed, packet: bytes, *, policy: bool) -> None:
        """Answer a refused flow's packet: ICMP "administratively prohibited" for policy (as a
        firewall's reject does), a TCP reset for a limit; datagrams over a limit get nothing."""
        if policy:
            self._answer_unreachable(tunnel, p, packet, "admin")
        elif p.protocol == IPPROTO_TCP and not p.tcp_flags & TCP_RST:
            self.send_to_tunnel(tunnel, reset_for(p, packet))

    def _answer_unreachable(self, tunnel: Tunnel, p: Parsed, packet: bytes, kind: str,
                            mtu: int = 0) -> None:
        answer = unreachable(packet, p, kind, mtu=mtu)
        if answer is not None:
            metrics.ICMP_SENT.labels(kind).inc()
            self.send_to_tunnel(tunnel, answer)

    def to_upstream(self, entry: FlowEntry, p: Parsed, packet: bytes,
                    header: bytes | None = None) -> None:
        if entry.upstream is None:
            self.to_kernel(entry, p, packet, header)
            return
        # A datagram flow: the payload (UDP) or the whole ICMP message leaves by its socket.
        self.flows.observe(entry, Direction.TO_SERVER, 0, p.total_length, time.monotonic())
        entry.upstream.last = (p, bytes(packet[:LAST_KEPT]))
        if p.protocol == IPPROTO_UDP:
            # The UDP length says where the datagram ends (the parser checked it fits): bytes
            # after it are padding of the IP packet, not payload, as a kernel would see it.
            start, end = p.payload_offset, p.ihl + int.from_bytes(packet[p.ihl + 4:p.ihl + 6],
                                                                  "big")
        else:
            start, end = p.ihl, p.total_length
        entry.payload_up += end - p.payload_offset
        entry.upstream.send(memoryview(packet)[start:end])

    def on_upstream_reply(self, entry: FlowEntry, data: bytes) -> None:
        """A datagram from the off-ramp: wrap it back into IP towards the flow's tunnel."""
        if entry.ended:
            return
        key = entry.key
        if key.protocol == IPPROTO_UDP:
            if len(data) > MAX_UDP_PAYLOAD[4 if len(key.src) == 4 else 6]:
                metrics.DROPS.labels("reply_too_big").inc()  # more than IPv4 carries
                return
            out = udp_packet(key.dst, key.dport, key.src, key.sport, data)
            entry.payload_down += len(data)
        elif len(data) >= 8 and data[0] in ECHO_REPLY:
            # The kernel put its own identifier in; the client gets back the one it sent.
            seq = int.from_bytes(data[6:8], "big")
            out = icmp_packet(key.dst, key.src, echo_message(data[0], key.sport, seq, data[8:]))
            entry.payload_down += len(data) - 8
        else:
            metrics.DROPS.labels("upstream_unexpected").inc()
            return
        self.flows.observe(entry, Direction.TO_CLIENT, 0, len(out), time.monotonic())
        self.send_to_tunnel(entry.tunnel, out)

    def on_upstream_error(self, entry: FlowEntry, kind: str) -> None:
        """The off-ramp's kernel reported an ICMP error: the client gets the matching one."""
        if entry.ended or entry.upstream is None or entry.upstream.last is None:
            return
        p, packet = entry.upstream.last
        self._answer_unreachable(entry.tunnel, p, packet, kind, mtu=self.mtu)

    def to_kernel(self, entry: FlowEntry, p: Parsed, packet: bytes,
                  header: bytes | None = None) -> None:
        """Account a client packet, rewrite it to the upgrade listener, write it to the TUN
        (one larger than the TUN's MTU was answered before: see :meth:`on_tunnel_packet`)."""
        if p.tcp_flags & TCP_RST and (p.seq - (entry.next_seq_up or 0)) & 0xFFFFFFFF > 1:
            # Not at the sequence we expect (RFC 5961; +1 if a FIN went first): the kernel may
            # answer with a challenge ACK, but a blind reset must not end the flow here.
            self._write_to_kernel(entry, p, packet, header)
            return
        ended = self.flows.observe(entry, Direction.TO_SERVER, p.tcp_flags, p.total_length,
                                   time.monotonic())
        _count_payload(entry, 0, p)
        self._write_to_kernel(entry, p, packet, header)
        self._after_packet(entry, ended)

    def _too_big_for_tun(self, tunnel: Tunnel, p: Parsed, packet: bytes) -> None:
        metrics.DROPS.labels("too_big").inc()
        if p.version == 6 or packet[6] & 0x40:  # IPv4 without DF: we don't fragment; dropped
            self._answer_unreachable(tunnel, p, packet, "too_big", mtu=self.mtu)

    def _write_to_kernel(self, entry: FlowEntry, p: Parsed, packet: bytes,
                         header: bytes | None = None) -> None:
        buf = bytearray(packet)
        partial = header is not None and is_partial(header)
        rewrite_tcp(buf, p, entry.slot.address, entry.slot.port, self.local[p.version],
                    UPGRADE_PORT, partial=partial)
        if self.tun is None:
            return
        if header is not None and not self.tun.vnet:
            # A TUN without offload (namespace.offload = false) takes plain, MTU-sized packets.
            for seg in segment(buf, header):
                self.tun.write(seg)
            return
        self.tun.write(buf, header or PLAIN)

    def on_tunnel_icmp_error(self, tunnel: Tunnel, p: Parsed, packet: bytes) -> None:
        """An ICMP error from the client's side about one of our packets: match it to its flow.

        A TCP flow's error goes on to the namespace's kernel, translated to the slot (so a
        smaller MTU on the client's path reaches the kernel's PMTU cache); a UDP flow whose
        client says "unreachable" ends, since its replies have nowhere to go.
        """
        q = p.inner
        if q.protocol in ECHO_REQUEST:
            key = FlowKey(tunnel.tenant, q.protocol, q.dst, q.sport, q.src, 0)
        else:  # the embedded packet went to the client: its source is the flow's destination
            key = FlowKey(tunnel.tenant, q.protocol, q.dst, q.dport, q.src, q.sport)
        entry = self.entries.get(key)
        if entry is None or entry.tunnel is not tunnel or entry.decision is None:
            metrics.DROPS.labels("icmp_error_no_flow").inc()
            return
        metrics.ICMP_RECEIVED.labels(PROTO_NAMES[key.protocol]).inc()
        self.flows.observe(entry, Direction.TO_SERVER, 0, p.total_length, time.monotonic())
        if entry.slot is not None and self.tun is not None:
            self.tun.write(self._error_for_kernel(entry, p, packet))
        elif (key.protocol == IPPROTO_UDP and p.icmp_type == DEST_UNREACHABLE[p.protocol]
              and not (p.version == 4 and p.icmp_code == 4)):  # "frag needed" is no goodbye
            self.end_flow(entry, CloseReason.EVICTED, close_reason="client_unreachable")

    def _error_for_kernel(self, entry: FlowEntry, p: Parsed, packet: bytes) -> bytes:
        """The client's ICMP error as if about the kernel's own packet (local:1 -> the slot)."""
        q, slot = p.inner, entry.slot
        message = bytearray(packet[p.ihl:p.total_length])
        inner = 8  # the embedded packet's offset in the message
        local = self.local[p.version]
        src_at, dst_at = (8, 24) if p.version == 6 else (12, 16)
        message[inner + src_at:inner + src_at + len(local)] = local
        message[inner + dst_at:inner + dst_at + len(slot.address)] = slot.address
        ports = inner + q.ihl
        message[ports:ports + 4] = struct.pack("!HH", UPGRADE_PORT, slot.port)
        return icmp_packet(slot.address, local, message)

    # -- from the kernel ---------------------------------------------------------------------

    def on_tun_packet(self, data: bytes) -> None:
        try:
            self._on_tun_packet(data)
        except Exception:
            self._internal_error("tun_packet")

    def _on_tun_packet(self, data: bytes) -> None:
        if self.tun is not None and self.tun.vnet:
            header, packet = data[:HEADER], memoryview(data)[HEADER:]
        else:
            header, packet = None, data
        p = parse(packet)
        if isinstance(p, Drop):
            metrics.DROPS.labels(f"kernel_{p.value}").inc()
            return
        entry = self.by_slot.get((p.dst, p.dport)) if p.protocol == IPPROTO_TCP else None
        if entry is None:
            metrics.DROPS.labels("kernel_no_flow").inc()
            return
        if p.total_length > entry.tunnel.mtu and not (header and is_gso(header)):
            # More than the flow's tunnel carries: tell the kernel, as a router on its path
            # would (the ICMP comes "from" the slot, about the kernel's own packet).
            metrics.DROPS.labels("too_big").inc()
            answer = unreachable(packet, p, "too_big", mtu=entry.tunnel.mtu)
            if answer is not None and self.tun is not None:
                self.tun.write(answer)
            return
        key = entry.key
        ended = self.flows.observe(entry, Direction.TO_CLIENT, p.tcp_flags, p.total_length,
                                   time.monotonic())
        _count_payload(entry, 1, p)
        buf = bytearray(packet)
        rewrite_tcp(buf, p, key.dst, key.dport, key.src, key.sport,
                    partial=header is not None and is_partial(header))
        self.send_to_tunnel(entry.tunnel, buf, header)
        self._after_packet(entry, ended)

    def reset_client(self, tunnel: Tunnel, data: bytes) -> None:
        """Answer a tunnel packet with a TCP reset (unless it is not TCP or is a reset itself)."""
        packet = memoryview(data)[HEADER:] if tunnel.vnet else data
        p = parse(packet)
        if isinstance(p, Parsed) and p.protocol == IPPROTO_TCP and not p.tcp_flags & TCP_RST:
            self.send_to_tunnel(tunnel, reset_for(p, packet))

    def send_to_tunnel(self, tunnel: Tunnel, packet: bytes | bytearray,
                       header: bytes | None = None) -> None:
        """Send ``packet`` (with its virtio-net ``header``, None: a plain packet) in the framing
        ``tunnel`` speaks: header and all on a vnet tunnel, else a plain, whole packet."""
        if tunnel.vnet:
            packet = (header or PLAIN) + packet
        elif header is not None and (is_gso(header) or is_partial(header)):
            # The slow path: cut the superframe into MSS-sized packets, sum every checksum.
            for seg in segment(packet, header):
                self.relay_to_tunnel(tunnel, seg)
            return
        self.relay_to_tunnel(tunnel, packet)

    def relay_to_tunnel(self, tunnel: Tunnel, data: bytes | bytearray) -> None:
        """Send a datagram already in ``tunnel``'s framing (e.g. a reply from the mesh)."""
        if tunnel.local:
            PKT_OUT.inc()
            BYTES_OUT.inc(len(data) - (HEADER if tunnel.vnet else 0))
        else:
            PKT_TO_MESH.inc()  # back to the worker that holds the tunnel
        tunnel.send(data)

    def _after_packet(self, entry: FlowEntry, ended: bool) -> None:
        if ended:
            self.end_flow(entry, CloseReason.RST)
        elif entry.state is TcpState.TIME_WAIT:
            # Both FINs acknowledged: the flow is over. Its slot waits out TIME_WAIT in the pool's
            # quarantine, so late retransmissions cannot meet a new flow on the same 4-tuple.
            self.end_flow(entry, CloseReason.FIN)

    # -- the upgraded stream -----------------------------------------------------------------

    # -- the off-ramp: connect before accept ------------------------------------------------

    def _connect_offramp(self, entry: FlowEntry, p: Parsed, packet: bytes) -> None:
        """Start the off-ramp's connect (the original destination or the decision's upstream).

        No task per flow: a non-blocking connect watched by :attr:`connector` (one epoll set);
        the timeout is the FIFO :attr:`connecting`, checked by :meth:`expire`, so a SYN flood
        towards a silent upstream costs a socket and a few bytes per flow."""
        upstream = entry.decision.upstream or (_addr(entry.key.dst), entry.key.dport)
        family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
        try:
            up = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:  # EMFILE, ENOBUFS: a limit of ours, not the network's
            self._offramp_failed(entry, "error", exc.errno or 0, p, packet)
            return
        if family == socket.AF_INET6:  # never reach IPv4 through a mapped address
            up.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        entry.offramp = up
        err = up.connect_ex(upstream)
        if err in (errno.EINPROGRESS, 0):
            entry.deadline = time.monotonic() + self.connect_timeout
            self.connecting.append(entry)
            self.connector.watch(up.fileno(), entry)
        else:
            self._offramp_failed(entry, _failure(err), err, p, packet)

    def _offramp_connected(self, entry: FlowEntry) -> None:
        """The off-ramp's connect finished: let the client's SYN through, or answer it."""
        try:
            self._on_offramp_connected(entry)
        except Exception:
            self._internal_error("offramp_connected")
            self.end_flow(entry, CloseReason.EVICTED, close_reason="internal_error")

    def _on_offramp_connected(self, entry: FlowEntry) -> None:
        up = entry.offramp
        entry.deadline = 0.0
        err = up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._offramp_failed(entry, _failure(err), err)
            return
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._release(entry)  # the SYN (and its retransmissions) to the kernel, which answers

    def _offramp_failed(self, entry: FlowEntry, reason: str, err: int, p: Parsed | None = None,
                        packet: bytes | None = None) -> None:
        """The client gets what it would get end to end: a reset for a refused connect, the
        matching ICMP unreachable for an unreachable one, nothing for a silent one."""
        if entry.ended:
            return
        metrics.UPSTREAM_FAILURES.labels(reason).inc()
        self.log.info("upstream_failed", reason=reason, error=errno.errorcode.get(err, err),
                      **self._flow_fields(entry))
        if p is None and entry.pending:
            first = entry.pending[0]
            packet = first if isinstance(first, bytes) else first[0]
            p = parse(packet)
        try:
            if isinstance(p, Parsed) and reason != "timeout":
                if reason == "refused" or reason == "error":
                    self.refuse(entry.tunnel, p, packet, policy=False)  # a reset
                else:
                    self._answer_unreachable(entry.tunnel, p, packet,
                                             UNREACHABLE.get(err, "host"))
                if entry.pending:
                    entry.pending = entry.pending[1:]  # the first was answered: not dropped
        finally:  # whatever happened to the answer, the flow must not stay half-made
            self.end_flow(entry, CloseReason.EVICTED, close_reason=f"upstream_{reason}")

    def _connect_timeouts(self, now: float) -> None:
        while self.connecting and self.connecting[0].deadline <= now:
            entry = self.connecting.popleft()
            if entry.connecting and not entry.ended:
                self.connector.forget(entry.offramp.fileno())
                entry.deadline = 0.0
                self._offramp_failed(entry, "timeout", errno.ETIMEDOUT)

    # -- the upgraded stream -----------------------------------------------------------------

    def _accept_upgraded(self, listener: socket.socket) -> None:
        for _ in range(64):
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.log.warning("upgrade_accept_failed", error=exc.strerror)
                return
            entry = self.by_slot.get((socket.inet_pton(listener.family, peer[0]), peer[1]))
            if (entry is None or entry.ended or entry.offramp is None or entry.conn is not None
                    or entry.connecting):
                metrics.DROPS.labels("upgrade_no_flow").inc()
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                conn.close()
                continue
            conn.setblocking(False)
            entry.conn = conn
            entry.stream = self._loop.create_task(self.splice(entry, conn, entry.offramp))
            self.streams.add(entry.stream)
            entry.stream.add_done_callback(self.streams.discard)
            # Sockets close only once the stream task is done: a pump being cancelled still
            # unregisters its fds, which must not have been closed (and reused) under it.
            entry.stream.add_done_callback(lambda _task, entry=entry: self._close_sockets(entry))

    async def splice(self, entry: FlowEntry, conn: socket.socket, up: socket.socket) -> None:
        """Relay the upgraded stream and the (already connected) off-ramp."""
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await relay(conn, up)
        self._close_sockets(entry)

    def _close_sockets(self, entry: FlowEntry) -> None:
        if entry.connecting:
            self.connector.forget(entry.offramp.fileno())
            entry.deadline = 0.0
        if entry.offramp is not None:
            entry.offramp.close()
            entry.offramp = None
        if entry.conn is not None:
            entry.conn.close()
            entry.conn = None

    # -- flow end ----------------------------------------------------------------------------

    def end_flow(self, entry: FlowEntry, reason: CloseReason, *, audit_start: bool = False,
                 close_reason: str | None = None) -> None:
        if entry.ended:
            return
        entry.ended = True
        if entry.pending:  # held (deciding, connecting) and never sent on: counted, not lost
            metrics.DROPS.labels("held_at_end").inc(len(entry.pending))
        entry.pending = None
        self.flows.end(entry, reason)  # (the table's dict is self.entries)
        self.flow_index.discard(entry)
        if entry.slot is not None:
            self.by_slot.pop((entry.slot.address, entry.slot.port), None)
            self.pools[4 if len(entry.slot.address) == 4 else 6].release(entry.slot)
            self._nat_gauge()
        if entry.upstream is not None:
            entry.upstream.close()
        if entry.stream is not None and not entry.stream.done():
            if reason is CloseReason.FIN and close_reason is None:
                # Both FINs crossed, but the kernel may still hold data the off-ramp has not
                # read: the relay finishes on its own (its done-callback closes the sockets).
                pass
            else:
                # Cut short: both ends see a reset, never a clean FIN.
                abort(*(sock for sock in (entry.conn, entry.offramp) if sock is not None))
                entry.stream.cancel()
        else:
            self._close_sockets(entry)
        if audit_start:
            entry.audited = True
            self.audit.record(
                "flow_start", decision="drop", reason=entry.decision.reason, upstream=None,
                **self._flow_fields(entry))
        now = time.monotonic()
        flow = entry
        why = close_reason or str(flow.close_reason or reason)
        decision = entry.decision or Decision.drop("undecided")
        if entry.audited:  # a flow refused past a limit is in a flows_refused record instead
            self.audit.record("flow_end", decision=decision.action, reason=decision.reason,
                              close_reason=why, packets=flow.packets, bytes=flow.bytes,
                              payload_bytes=entry.payload,
                              duration=round(flow.duration(now), 6), **self._flow_fields(entry))
        protocol = PROTO_NAMES.get(entry.key.protocol, "other")
        metrics.FLOWS_ENDED.labels(protocol, why).inc()
        self._active(protocol, -1)
        hook = self.app.on_flow_end
        if getattr(hook, "__func__", None) is RulesApplication.on_flow_end:
            return  # the default application does nothing with it: build nothing
        end = FlowEnd(entry.start, decision, tuple(flow.packets), tuple(flow.bytes),
                      tuple(entry.payload), flow.duration(now), why)
        try:
            result = hook(end)
        except Exception as exc:
            self.log.warning("flow_end_hook_failed", error=repr(exc))
            return
        if inspect.isawaitable(result):  # a task only for an async hook (a mass end of
            task = self._loop.create_task(self._flow_end_hook(result))  # flows is many)
            self.hook_tasks.add(task)
            task.add_done_callback(self.hook_tasks.discard)

    def _active(self, protocol: str, delta: int) -> None:
        self.active[protocol] = n = self.active.get(protocol, 0) + delta
        metrics.FLOWS_ACTIVE.labels(protocol).set(n)

    async def _flow_end_hook(self, pending) -> None:
        try:
            await pending
        except Exception as exc:
            self.log.warning("flow_end_hook_failed", error=repr(exc))

    def expire(self) -> None:
        """Once a second: end the flows idle past their state's timeout (the table has already
        let go), give up off-ramps connecting too long, write the refusals' summary when due."""
        now = time.monotonic()
        self._connect_timeouts(now)
        for flow in self.flows.expire(now):
            self.end_flow(flow, flow.close_reason or CloseReason.IDLE)  # type: ignore[arg-type]
        if self.refusals.due(time.time()):
            self.refusals.flush()

    def close_tunnel(self, tunnel: Tunnel) -> None:
        for entry in [e for e in self.entries.values() if e.tunnel is tunnel]:
            if entry.fins == 3:  # only the last ACK was missing: a clean close
                self.end_flow(entry, CloseReason.FIN)
            else:
                self.end_flow(entry, CloseReason.EVICTED, close_reason="tunnel_closed")

    # -- views -------------------------------------------------------------------------------

    def _flow_fields(self, entry: FlowEntry) -> dict:
        k = entry.key
        return {"tenant": k.tenant, "protocol": PROTO_NAMES.get(k.protocol, str(k.protocol)),
                "src": _addr(k.src), "sport": k.sport, "dst": _addr(k.dst), "dport": k.dport,
                "tunnel": entry.tunnel.id, "tunnel_worker": entry.tunnel.origin}

    def flow_row(self, e: FlowEntry) -> dict:
        """A flow as ``/api/flows`` shows it: bounded (a tenant is short, see views.tenant_text),
        so that a page of 200 fits one control message."""
        from .views import tenant_text
        return {**self._flow_fields(e), "tenant": tenant_text(e.key.tenant),
                "state": str(e.state),
                "decision": e.decision.action if e.decision else None,
                "slot": str(e.slot) if e.slot else None, "packets": list(e.packets),
                "payload_bytes": list(e.payload),
                "age": round(e.duration(time.monotonic()), 3),
                "worker": self.index, "seq": e.seq}

def _count_payload(entry: FlowEntry, direction: int, p: Parsed) -> None:
    """Count the bytes by which this segment advances its direction's sequence space.

    Retransmissions (a tail loss probe the peer already had, say) add nothing, so the audit's
    payload bytes are what the application sent, however often TCP sent it.
    """
    if p.tcp_flags & TCP_SYN:
        if direction:
            entry.next_seq_down = (p.seq + 1) & 0xFFFFFFFF
        else:
            entry.next_seq_up = (p.seq + 1) & 0xFFFFFFFF
        return
    expected = entry.next_seq_down if direction else entry.next_seq_up
    n = p.payload_length
    if expected is None or not n:
        return
    end = (p.seq + n) & 0xFFFFFFFF
    new = (end - expected) & 0xFFFFFFFF
    if 0 < new <= n:
        if direction:
            entry.payload_down += new
            entry.next_seq_down = end
        else:
            entry.payload_up += new
            entry.next_seq_up = end


def _failure(err: int) -> str:
    """An off-ramp connect's errno as the ``reason`` of ipferry_upstream_failures_total."""
    if err == errno.ECONNREFUSED:
        return "refused"
    if err == errno.ETIMEDOUT:  # the kernel gave up retrying its SYN: the upstream is silent
        return "timeout"
    return "unreachable" if err in UNREACHABLE else "error"


def _fmt(hp: tuple[str, int] | None) -> str | None:
    return f"{hp[0]}:{hp[1]}" if hp else None
