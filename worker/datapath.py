"""The worker's data path: tunnel packets in, kernel TCP streams out, and back.

For a new TCP flow the application decides; an upgraded flow claims a NAT slot and its packets
are rewritten (source = the slot, destination = the worker's upgrade listener) into the worker's
TUN. The namespace's kernel does the TCP; the worker accepts the connection (the peer address is
the slot, which names the flow), connects the off-ramp and splices the two streams. The kernel's
packets come out of the TUN addressed to the slot and are rewritten back into the flow's tunnel.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import socket
import struct
import time
from dataclasses import dataclass, field

from . import metrics
from .app import Application, Decision, FlowEnd, FlowStart, call_hook
from .audit import AuditLog
from .flows import CloseReason, Direction, Flow, FlowKey, FlowTable, LimitReached, TcpState
from .nat import NatPool, NatSlot, SlotPoolExhausted, rewrite_ipv4_tcp
from .packet import TCP_ACK, TCP_RST, TCP_SYN, Drop, Parsed, parse
from .relay import abort, relay
from .sharding import owner
from .tun import TunDevice
from .tunnels import Tunnel

PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp"}
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
    pending: list[tuple[Parsed, bytes]] = field(default_factory=list)
    payload: list[int] = field(default_factory=lambda: [0, 0])  # new bytes, by direction
    next_seq: list[int | None] = field(default_factory=lambda: [None, None])
    stream: asyncio.Task | None = None
    sockets: list[socket.socket] = field(default_factory=list)
    ended: bool = False


def _addr(b: bytes) -> str:
    return socket.inet_ntoa(b)


def reset_for(p: Parsed, packet: bytes) -> bytes:
    """The RST a TCP stack would answer ``packet`` with (slow path: dpkt builds it)."""
    import dpkt  # only here: a worker that never resets anything never pays for the import
    tcp = dpkt.tcp.TCP(packet[p.ihl:p.total_length])
    seg_len = p.payload_length + (1 if p.tcp_flags & TCP_SYN else 0)
    if p.tcp_flags & TCP_ACK:
        rst = dpkt.tcp.TCP(sport=p.dport, dport=p.sport, seq=tcp.ack, flags=dpkt.tcp.TH_RST)
    else:
        rst = dpkt.tcp.TCP(sport=p.dport, dport=p.sport, seq=0, ack=(tcp.seq + seg_len) & 0xFFFFFFFF,
                           flags=dpkt.tcp.TH_RST | dpkt.tcp.TH_ACK)
    ip = dpkt.ip.IP(src=p.dst, dst=p.src, p=dpkt.ip.IP_PROTO_TCP, ttl=64, data=rst)
    ip.len = 40
    return bytes(ip)


class DataPath:
    def __init__(self, *, index: int, app: Application, audit: AuditLog, log,
                 flows: FlowTable, pool: NatPool, local: ipaddress.IPv4Address,
                 connect_timeout: float, workers: int = 1, forward=None) -> None:
        self.index = index
        self.workers = workers
        self.forward = forward  # (owner, tunnel, packet): hands a packet to its flow's owner
        self.app = app
        self.audit = audit
        self.log = log
        self.flows = flows
        self.pool = pool
        self.local = local.packed
        self.connect_timeout = connect_timeout
        self.entries: dict[FlowKey, FlowEntry] = {}
        self.by_slot: dict[tuple[bytes, int], FlowEntry] = {}
        self.active: dict[str, int] = {}  # flows by protocol, for the gauge
        self.streams: set[asyncio.Task] = set()  # relays, some outliving their flow entry
        self.hook_tasks: set[asyncio.Task] = set()  # on_flow_end calls in progress
        self.tun: TunDevice | None = None
        self._loop = asyncio.get_running_loop()
        self._listener: socket.socket | None = None

    # -- equipment ---------------------------------------------------------------------------

    def detach(self) -> None:
        """Let go of the TUN and upgrade listener (nsd is rebuilding the namespace)."""
        for entry in list(self.entries.values()):
            self.end_flow(entry, CloseReason.EVICTED, close_reason="namespace_lost")
        if self._listener is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener = None
        self.tun = None

    def attach(self, tun: TunDevice, upgrade4: socket.socket) -> None:
        """Use this TUN and upgrade listener (again after nsd rebuilt the namespace)."""
        self.tun = tun
        tun.on_packet = self.on_tun_packet
        self._listener = upgrade4
        upgrade4.setblocking(False)
        self._loop.add_reader(upgrade4.fileno(), self._accept_upgraded)

    # -- from the tunnel ---------------------------------------------------------------------

    def on_tunnel_packet(self, tunnel: Tunnel, packet: bytes) -> None:
        if tunnel.local:
            PKT_IN.inc()
            BYTES_IN.inc(len(packet))
        else:
            PKT_FROM_MESH.inc()
        p = parse(packet)
        if isinstance(p, Drop):
            metrics.DROPS.labels(p.value).inc()
            return
        key = FlowKey(tunnel.tenant, p.protocol, p.src, p.sport, p.dst, p.dport)
        entry = self.entries.get(key)
        if entry is None and self.workers > 1 and tunnel.local:
            # Only flows we own have entries here: hash only for the others (and new ones).
            o = owner(p.protocol, p.src, p.sport, p.dst, p.dport, self.workers)
            if o != self.index:
                self.forward(o, tunnel, packet)
                return
        if entry is not None and entry.tunnel is not tunnel:
            # Same tenant and 4-tuple from another tunnel: never let it touch this flow.
            metrics.DROPS.labels("tunnel_mismatch").inc()
            return
        if entry is None:
            if p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN:
                # Not the start of a flow we know (e.g. ours died with a worker): reset it so
                # the client fails fast instead of retransmitting into the void.
                metrics.DROPS.labels("no_flow").inc()
                if not p.tcp_flags & TCP_RST:
                    self.send_to_tunnel(tunnel, reset_for(p, packet))
                return
            entry = self.start_flow(tunnel, key, p, packet)
            if entry is None:
                return
        if entry.decision is None:
            if len(entry.pending) >= MAX_PENDING:
                metrics.DROPS.labels("decision_pending").inc()  # the client will retransmit
                return
            entry.pending.append((p, packet))
            return
        self.to_kernel(entry, p, packet)

    def start_flow(self, tunnel: Tunnel, key: FlowKey, p: Parsed, packet: bytes) -> FlowEntry | None:
        now = time.monotonic()
        flow = self.flows.start(key, None, now)
        if isinstance(flow, LimitReached):
            metrics.DROPS.labels(flow.value).inc()
            self.audit.record("flow_start", decision="drop", reason=flow.value, upstream=None,
                              tenant=key.tenant, protocol=PROTO_NAMES.get(key.protocol),
                              src=_addr(key.src), sport=key.sport, dst=_addr(key.dst),
                              dport=key.dport, tunnel=tunnel.id, tunnel_worker=tunnel.origin)
            self.send_to_tunnel(tunnel, reset_for(p, packet))
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
            entry.pending.append((p, packet))
            self._loop.create_task(self._decide_later(entry, decision))
            return None
        return entry if self.apply_decision(entry, decision, p, packet) else None

    async def _decide_later(self, entry: FlowEntry, pending) -> None:
        first_p, first_packet = entry.pending[0]
        try:
            decision = await pending
        except Exception as exc:
            self._hook_failed(entry, first_p, first_packet, exc)
            return
        if entry.ended:
            return
        if self.apply_decision(entry, decision, first_p, first_packet):
            queued, entry.pending = entry.pending, []
            for p, packet in queued:
                if not entry.ended:
                    self.to_kernel(entry, p, packet)

    def _hook_failed(self, entry: FlowEntry, p: Parsed, packet: bytes, exc: Exception) -> None:
        self.log.warning("flow_hook_failed", error=repr(exc), **self._flow_fields(entry))
        metrics.DROPS.labels("hook_error").inc()
        entry.decision = Decision.drop(f"hook error: {exc!r}")
        self.send_to_tunnel(entry.tunnel, reset_for(p, packet))
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
            self.send_to_tunnel(entry.tunnel, reset_for(p, packet))
            self.end_flow(entry, CloseReason.EVICTED, close_reason="denied")
            return False
        try:
            entry.slot = self.pool.claim()
        except SlotPoolExhausted:
            metrics.DROPS.labels("nat_exhausted").inc()
            self.send_to_tunnel(entry.tunnel, reset_for(p, packet))
            self.end_flow(entry, CloseReason.EVICTED, close_reason="nat_exhausted")
            return False
        self.by_slot[(entry.slot.address, entry.slot.port)] = entry
        metrics.NAT_SLOTS.set(self.pool.in_use)
        return True

    def to_kernel(self, entry: FlowEntry, p: Parsed, packet: bytes) -> None:
        """Account a client packet, rewrite it to the upgrade listener, write it to the TUN."""
        if p.tcp_flags & TCP_RST and (p.seq - (entry.next_seq[0] or 0)) & 0xFFFFFFFF > 1:
            # Not at the sequence we expect (RFC 5961; +1 if a FIN went first): the kernel may
            # answer with a challenge ACK, but a blind reset must not end the flow here.
            self._write_to_kernel(entry, p, packet)
            return
        ended = self.flows.observe(entry.flow, Direction.TO_SERVER, p.tcp_flags, p.total_length,
                                   time.monotonic())
        _count_payload(entry, 0, p)
        self._write_to_kernel(entry, p, packet)
        self._after_packet(entry, ended)

    def _write_to_kernel(self, entry: FlowEntry, p: Parsed, packet: bytes) -> None:
        buf = bytearray(packet)
        rewrite_ipv4_tcp(buf, p.ihl, entry.slot.address, entry.slot.port, self.local,
                         UPGRADE_PORT)
        if self.tun is not None:
            self.tun.write(buf)

    # -- from the kernel ---------------------------------------------------------------------

    def on_tun_packet(self, packet: bytes) -> None:
        p = parse(packet)
        if isinstance(p, Drop):
            metrics.DROPS.labels(f"kernel_{p.value}").inc()
            return
        entry = self.by_slot.get((p.dst, p.dport))
        if entry is None:
            metrics.DROPS.labels("kernel_no_flow").inc()
            return
        key = entry.flow.key
        ended = self.flows.observe(entry.flow, Direction.TO_CLIENT, p.tcp_flags, p.total_length,
                                   time.monotonic())
        _count_payload(entry, 1, p)
        buf = bytearray(packet)
        rewrite_ipv4_tcp(buf, p.ihl, key.dst, key.dport, key.src, key.sport)
        self.send_to_tunnel(entry.tunnel, buf)
        self._after_packet(entry, ended)

    def reset_client(self, tunnel: Tunnel, packet: bytes) -> None:
        """Answer a tunnel packet with a TCP reset (unless it is not TCP or is a reset itself)."""
        p = parse(packet)
        if isinstance(p, Parsed) and not p.tcp_flags & TCP_RST:
            self.send_to_tunnel(tunnel, reset_for(p, packet))

    def send_to_tunnel(self, tunnel: Tunnel, packet: bytes | bytearray) -> None:
        if tunnel.local:
            PKT_OUT.inc()
            BYTES_OUT.inc(len(packet))
        else:
            PKT_TO_MESH.inc()  # back to the worker that holds the tunnel
        tunnel.send(packet)

    def _after_packet(self, entry: FlowEntry, ended: bool) -> None:
        if ended:
            self.end_flow(entry, CloseReason.RST)
        elif entry.flow.state is TcpState.TIME_WAIT:
            # Both FINs acknowledged: the flow is over. Its slot waits out TIME_WAIT in the pool's
            # quarantine, so late retransmissions cannot meet a new flow on the same 4-tuple.
            self.end_flow(entry, CloseReason.FIN)

    # -- the upgraded stream -----------------------------------------------------------------

    def _accept_upgraded(self) -> None:
        for _ in range(64):
            try:
                conn, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.log.warning("upgrade_accept_failed", error=exc.strerror)
                return
            entry = self.by_slot.get((socket.inet_aton(peer[0]), peer[1]))
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
            up = socket.socket(socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET,
                               socket.SOCK_STREAM)
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
            self.pool.release(entry.slot)
            metrics.NAT_SLOTS.set(self.pool.in_use)
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
