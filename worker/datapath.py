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
from dataclasses import dataclass, field

from ipferry.nsd.vnet import HEADER_SIZE as HEADER
from ipferry.nsd.vnet import PLAIN, is_gso, is_partial, sanitize, segment

from . import metrics
from .app import Application, Decision, FlowEnd, FlowStart, call_hook
from .audit import AuditLog
from .datagram_flows import UNREACHABLE, DatagramUpstream, PingNotPermitted, open_upstream
from .flows import CloseReason, Direction, Flow, FlowKey, FlowTable, LimitReached, TcpState
from .icmp import echo_message, icmp_packet, udp_packet, unreachable
from .nat import NatPool, NatSlot, SlotPoolExhausted, rewrite_tcp
from .packet import (
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
from .relay import abort, relay
from .sharding import owner
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
MAX_PENDING = 8  # packets held per flow while an async hook decides

PKT_IN = metrics.PACKETS.labels("from_tunnel")
PKT_OUT = metrics.PACKETS.labels("to_tunnel")
BYTES_IN = metrics.BYTES.labels("from_tunnel")
BYTES_OUT = metrics.BYTES.labels("to_tunnel")
PKT_TO_MESH = metrics.PACKETS.labels("to_mesh")
PKT_FROM_MESH = metrics.PACKETS.labels("from_mesh")


@dataclass
class FlowEntry:
    flow: Flow
    tunnel: Tunnel
    start: FlowStart
    decision: Decision | None = None  # None while the application decides
    slot: NatSlot | None = None
    pending: list[tuple[Parsed, bytes, bytes | None]] = field(default_factory=list)
    upstream: DatagramUpstream | None = None  # UDP and ICMP echo flows
    last: tuple[Parsed, bytes] | None = None  # datagram flows: the client's last packet
    payload: list[int] = field(default_factory=lambda: [0, 0])  # new bytes, by direction
    next_seq: list[int | None] = field(default_factory=lambda: [None, None])
    stream: asyncio.Task | None = None
    sockets: list[socket.socket] = field(default_factory=list)
    ended: bool = False


def _addr(b: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(b) == 16 else socket.AF_INET, b)


def reset_for(p: Parsed, packet: bytes) -> bytes:
    """The RST a TCP stack would answer ``packet`` with (slow path: dpkt builds it)."""
    import dpkt  # only here: a worker that never resets anything never pays for the import
    tcp = dpkt.tcp.TCP(bytes(packet[p.ihl:p.ihl + 20]))
    seg_len = p.payload_length + (1 if p.tcp_flags & TCP_SYN else 0)
    if p.tcp_flags & TCP_ACK:
        rst = dpkt.tcp.TCP(sport=p.dport, dport=p.sport, seq=tcp.ack, flags=dpkt.tcp.TH_RST)
    else:
        rst = dpkt.tcp.TCP(sport=p.dport, dport=p.sport, seq=0, ack=(tcp.seq + seg_len) & 0xFFFFFFFF,
                           flags=dpkt.tcp.TH_RST | dpkt.tcp.TH_ACK)
    if p.version == 6:
        ip6 = dpkt.ip6.IP6(src=p.dst, dst=p.src, nxt=IPPROTO_TCP, hlim=64, data=rst, plen=20)
        return bytes(ip6)
    ip = dpkt.ip.IP(src=p.dst, dst=p.src, p=dpkt.ip.IP_PROTO_TCP, ttl=64, data=rst)
    ip.len = 40
    return bytes(ip)


class DataPath:
    def __init__(self, *, index: int, app: Application, audit: AuditLog, log,
                 flows: FlowTable, pools: dict[int, NatPool], local: dict[int, bytes],
                 connect_timeout: float, workers: int = 1, forward=None,
                 mtu: int = 65520) -> None:
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
        self.entries: dict[FlowKey, FlowEntry] = {}
        self.by_slot: dict[tuple[bytes, int], FlowEntry] = {}
        self.active: dict[str, int] = {}  # flows by protocol, for the gauge
        self.streams: set[asyncio.Task] = set()  # relays, some outliving their flow entry
        self.hook_tasks: set[asyncio.Task] = set()  # on_flow_end calls in progress
        self.tun: TunDevice | None = None
        self._loop = asyncio.get_running_loop()
        self._listeners: list[socket.socket] = []
        self._ping_logged = -PING_LOG_INTERVAL
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
        """A datagram of ``tunnel``: the packet (after a virtio-net header on a vnet tunnel)."""
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
        if entry is None:
            if not self._starts_flow(tunnel, p, packet):
                return
            entry = self.start_flow(tunnel, key, p, packet, header)
            if entry is None:
                return
        if entry.decision is None:
            if len(entry.pending) >= MAX_PENDING:
                metrics.DROPS.labels("decision_pending").inc()  # the client will retransmit
                return
            entry.pending.append((p, bytes(packet), header))
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
        now = time.monotonic()
        flow = self.flows.start(key, None, now)
        if isinstance(flow, LimitReached):
            metrics.DROPS.labels(flow.value).inc()
            self.audit.record("flow_start", decision="drop", reason=flow.value, upstream=None,
                              tenant=key.tenant, protocol=PROTO_NAMES.get(key.protocol),
                              src=_addr(key.src), sport=key.sport, dst=_addr(key.dst),
                              dport=key.dport, tunnel=tunnel.id, tunnel_worker=tunnel.origin)
            self.refuse(tunnel, p, packet, policy=False)
            return None
        start = FlowStart(key.tenant, PROTO_NAMES.get(key.protocol, str(key.protocol)),
                          _addr(key.src), key.sport, _addr(key.dst), key.dport, tunnel.context)
        entry = FlowEntry(flow, tunnel, start)
        self.entries[key] = entry
        metrics.FLOWS_STARTED.labels(start.protocol).inc()  # refused ones too: they end as well
        self._active(start.protocol, +1)
        try:
            decision = self.app.on_flow_start(start)
        except Exception as exc:
            return self._hook_failed(entry, p, packet, exc)
        if inspect.isawaitable(decision):
            entry.pending.append((p, bytes(packet), header))
            self._loop.create_task(self._decide_later(entry, decision))
            return None
        return entry if self.apply_decision(entry, decision, p, packet) else None

    async def _decide_later(self, entry: FlowEntry, pending) -> None:
        first_p, first_packet, _ = entry.pending[0]
        try:
            decision = await pending
        except Exception as exc:
            self._hook_failed(entry, first_p, first_packet, exc)
            return
        if entry.ended:
            return
        if self.apply_decision(entry, decision, first_p, first_packet):
            queued, entry.pending = entry.pending, []
            for p, packet, header in queued:
                if not entry.ended:
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
        """Memoise the decision; True when the flow goes on (upgraded), False when refused."""
        if not isinstance(decision, Decision):
            return self._hook_failed(entry, p, packet, TypeError(f"not a Decision: {decision!r}"))
        entry.decision = decision
        entry.flow.decision = decision
        self.audit.record("flow_start", decision=decision.action, reason=decision.reason,
                          upstream=_fmt(decision.upstream), **self._flow_fields(entry))
        if decision.action != "upgrade":
            metrics.DROPS.labels("denied").inc()
            self.refuse(entry.tunnel, p, packet, policy=True)
            self.end_flow(entry, CloseReason.EVICTED, close_reason="denied")
            return False
        if p.protocol != IPPROTO_TCP:
            return self._open_datagram_upstream(entry, p, packet)
        pool = self.pools[p.version]
        try:
            entry.slot = pool.claim()
        except SlotPoolExhausted:
            metrics.DROPS.labels("nat_exhausted").inc()
            self.refuse(entry.tunnel, p, packet, policy=False)
            self.end_flow(entry, CloseReason.EVICTED, close_reason="nat_exhausted")
            return False
        self.by_slot[(entry.slot.address, entry.slot.port)] = entry
        self._nat_gauge()
        return True

    def _nat_gauge(self) -> None:
        metrics.NAT_SLOTS.set(sum(pool.in_use for pool in self.pools.values()))

    def _open_datagram_upstream(self, entry: FlowEntry, p: Parsed, packet: bytes) -> bool:
        kind = "udp" if p.protocol == IPPROTO_UDP else "icmp"
        upstream = entry.decision.upstream or (entry.start.dst, entry.start.dport)
        if kind == "icmp" and (":" in upstream[0]) != (p.version == 6):
            upstream = (entry.start.dst, 0)  # an echo cannot change IP version on the way
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
        self.flows.observe(entry.flow, Direction.TO_SERVER, 0, p.total_length, time.monotonic())
        entry.last = (p, bytes(packet[:LAST_KEPT]))
        entry.payload[0] += p.total_length - p.payload_offset
        start = p.payload_offset if p.protocol == IPPROTO_UDP else p.ihl
        entry.upstream.send(memoryview(packet)[start:p.total_length])

    def on_upstream_reply(self, entry: FlowEntry, data: bytes) -> None:
        """A datagram from the off-ramp: wrap it back into IP towards the flow's tunnel."""
        if entry.ended:
            return
        key = entry.flow.key
        if key.protocol == IPPROTO_UDP:
            if len(data) > MAX_UDP_PAYLOAD[4 if len(key.src) == 4 else 6]:
                metrics.DROPS.labels("reply_too_big").inc()  # more than IPv4 carries
                return
            out = udp_packet(key.dst, key.dport, key.src, key.sport, data)
            entry.payload[1] += len(data)
        elif len(data) >= 8 and data[0] in ECHO_REPLY:
            # The kernel put its own identifier in; the client gets back the one it sent.
            seq = int.from_bytes(data[6:8], "big")
            out = icmp_packet(key.dst, key.src, echo_message(data[0], key.sport, seq, data[8:]))
            entry.payload[1] += len(data) - 8
        else:
            metrics.DROPS.labels("upstream_unexpected").inc()
            return
        self.flows.observe(entry.flow, Direction.TO_CLIENT, 0, len(out), time.monotonic())
        self.send_to_tunnel(entry.tunnel, out)

    def on_upstream_error(self, entry: FlowEntry, kind: str) -> None:
        """The off-ramp's kernel reported an ICMP error: the client gets the matching one."""
        if entry.ended or entry.last is None:
            return
        p, packet = entry.last
        self._answer_unreachable(entry.tunnel, p, packet, kind, mtu=self.mtu)

    def to_kernel(self, entry: FlowEntry, p: Parsed, packet: bytes,
                  header: bytes | None = None) -> None:
        """Account a client packet, rewrite it to the upgrade listener, write it to the TUN."""
        if p.total_length > self.mtu and not (header and is_gso(header)):
            self._too_big_for_tun(entry.tunnel, p, packet)  # (a superframe is many segments)
            return
        if p.tcp_flags & TCP_RST and (p.seq - (entry.next_seq[0] or 0)) & 0xFFFFFFFF > 1:
            # Not at the sequence we expect (RFC 5961; +1 if a FIN went first): the kernel may
            # answer with a challenge ACK, but a blind reset must not end the flow here.
            self._write_to_kernel(entry, p, packet, header)
            return
        ended = self.flows.observe(entry.flow, Direction.TO_SERVER, p.tcp_flags, p.total_length,
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
        self.flows.observe(entry.flow, Direction.TO_SERVER, 0, p.total_length, time.monotonic())
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
        key = entry.flow.key
        ended = self.flows.observe(entry.flow, Direction.TO_CLIENT, p.tcp_flags, p.total_length,
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
        elif entry.flow.state is TcpState.TIME_WAIT:
            # Both FINs acknowledged: the flow is over. Its slot waits out TIME_WAIT in the pool's
            # quarantine, so late retransmissions cannot meet a new flow on the same 4-tuple.
            self.end_flow(entry, CloseReason.FIN)

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
            if entry is None or entry.ended:
                metrics.DROPS.labels("upgrade_no_flow").inc()
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                conn.close()
                continue
            conn.setblocking(False)
            entry.sockets.append(conn)
            entry.stream = self._loop.create_task(self.offramp(entry, conn))
            self.streams.add(entry.stream)
            entry.stream.add_done_callback(self.streams.discard)
            # Sockets close only once the stream task is done: a pump being cancelled still
            # unregisters its fds, which must not have been closed (and reused) under it.
            entry.stream.add_done_callback(lambda _task, entry=entry: self._close_sockets(entry))

    async def offramp(self, entry: FlowEntry, conn: socket.socket) -> None:
        """Connect the off-ramp (the original destination or the decision's upstream), splice."""
        upstream = entry.decision.upstream or (entry.start.dst, entry.start.dport)
        try:
            family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
            up = socket.socket(family, socket.SOCK_STREAM)
            if family == socket.AF_INET6:  # never reach IPv4 through a mapped address
                up.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            up.setblocking(False)
            entry.sockets.append(up)
            await asyncio.wait_for(self._loop.sock_connect(up, upstream), self.connect_timeout)
        except (OSError, TimeoutError) as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) else (
                "refused" if isinstance(exc, ConnectionRefusedError) else "error")
            metrics.UPSTREAM_FAILURES.labels(reason).inc()
            self.log.info("upstream_failed", upstream=_fmt(upstream), reason=reason,
                          **self._flow_fields(entry))
            # The client's peer is the namespace's kernel: a reset from it is the client's answer.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            self._close_sockets(entry)
            return
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await relay(conn, up)
        self._close_sockets(entry)

    def _close_sockets(self, entry: FlowEntry) -> None:
        for sock in entry.sockets:
            sock.close()
        entry.sockets.clear()

    # -- flow end ----------------------------------------------------------------------------

    def end_flow(self, entry: FlowEntry, reason: CloseReason, *, audit_start: bool = False,
                 close_reason: str | None = None) -> None:
        if entry.ended:
            return
        entry.ended = True
        self.flows.end(entry.flow, reason)
        self.entries.pop(entry.flow.key, None)
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
                abort(*entry.sockets)  # cut short: both ends see a reset, never a clean FIN
                entry.stream.cancel()
        else:
            self._close_sockets(entry)
        if audit_start:
            self.audit.record("flow_start", decision="drop", reason=entry.decision.reason,
                              upstream=None, **self._flow_fields(entry))
        now = time.monotonic()
        flow = entry.flow
        why = close_reason or str(flow.close_reason or reason)
        decision = entry.decision or Decision.drop("undecided")
        self.audit.record("flow_end", decision=decision.action, reason=decision.reason,
                          close_reason=why, packets=list(flow.packets), bytes=list(flow.bytes),
                          payload_bytes=list(entry.payload),
                          duration=round(flow.duration(now), 6), **self._flow_fields(entry))
        metrics.FLOWS_ENDED.labels(entry.start.protocol, why).inc()
        self._active(entry.start.protocol, -1)
        end = FlowEnd(entry.start, decision, tuple(flow.packets), tuple(flow.bytes),
                      tuple(entry.payload), flow.duration(now), why)
        task = self._loop.create_task(self._flow_end_hook(end))
        self.hook_tasks.add(task)
        task.add_done_callback(self.hook_tasks.discard)

    def _active(self, protocol: str, delta: int) -> None:
        self.active[protocol] = n = self.active.get(protocol, 0) + delta
        metrics.FLOWS_ACTIVE.labels(protocol).set(n)

    async def _flow_end_hook(self, end: FlowEnd) -> None:
        try:
            await call_hook(self.app.on_flow_end, end)
        except Exception as exc:
            self.log.warning("flow_end_hook_failed", error=repr(exc))

    def expire(self) -> None:
        """End the flows idle past their state's timeout (the table has already let go)."""
        for flow in self.flows.expire(time.monotonic()):
            entry = self.entries.get(flow.key)
            if entry is not None:
                self.end_flow(entry, flow.close_reason or CloseReason.IDLE)

    def close_tunnel(self, tunnel: Tunnel) -> None:
        for entry in [e for e in self.entries.values() if e.tunnel is tunnel]:
            if all(entry.flow.fin_seen):  # only the last ACK was missing: a clean close
                self.end_flow(entry, CloseReason.FIN)
            else:
                self.end_flow(entry, CloseReason.EVICTED, close_reason="tunnel_closed")

    # -- views -------------------------------------------------------------------------------

    def _flow_fields(self, entry: FlowEntry) -> dict:
        s = entry.start
        return {"tenant": s.tenant, "protocol": s.protocol, "src": s.src, "sport": s.sport,
                "dst": s.dst, "dport": s.dport, "tunnel": entry.tunnel.id,
                "tunnel_worker": entry.tunnel.origin}

    def flow_list(self, tenant: str | None = None) -> list[dict]:
        now = time.monotonic()
        return [{**self._flow_fields(e), "state": str(e.flow.state),
                 "decision": e.decision.action if e.decision else None,
                 "slot": str(e.slot) if e.slot else None, "packets": list(e.flow.packets),
                 "payload_bytes": list(e.payload), "age": round(e.flow.duration(now), 3),
                 "worker": self.index}
                for e in self.entries.values() if tenant is None or e.start.tenant == tenant]


def _count_payload(entry: FlowEntry, direction: int, p: Parsed) -> None:
    """Count the bytes by which this segment advances its direction's sequence space.

    Retransmissions (a tail loss probe the peer already had, say) add nothing, so the audit's
    payload bytes are what the application sent, however often TCP sent it.
    """
    if p.tcp_flags & TCP_SYN:
        entry.next_seq[direction] = (p.seq + 1) & 0xFFFFFFFF
        return
    expected = entry.next_seq[direction]
    n = p.payload_length
    if expected is None or not n:
        return
    end = (p.seq + n) & 0xFFFFFFFF
    new = (end - expected) & 0xFFFFFFFF
    if 0 < new <= n:
        entry.payload[direction] += new
        entry.next_seq[direction] = end


def _fmt(hp: tuple[str, int] | None) -> str | None:
    return f"{hp[0]}:{hp[1]}" if hp else None
