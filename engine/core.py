"""The flow engine, sans I/O: events in, actions out.

Every input is a method that takes the time (``now``, monotonic seconds) and returns the
:mod:`actions <ipferry.engine.actions>` for the driver, in order. Nothing here opens a socket,
reads a clock, counts a metric or awaits: the same inputs give the same actions, so each
behaviour is a unit test of a few lines (tests/engine/).

A flow has two legs (:mod:`ipferry.engine.legs`). Today's shapes:

- TCP from a tunnel, *upgraded*: the client leg is the tunnel; its packets are rewritten (source
  = the flow's NAT slot, destination = the worker's upgrade listener) into the namespace's kernel
  by the worker's TUN, so the kernel terminates TCP; the server leg is a kernel stream, the
  off-ramp's connection, made *before* the client's SYN reaches the kernel (connect before
  accept). The stream handler relays the accepted stream and the off-ramp.
- UDP and ICMP echo from a tunnel: the server leg is a datagram socket; its replies are wrapped
  back into IP towards the tunnel.

Refused flows get what a firewall would answer: ICMP "administratively prohibited" for policy,
a TCP reset when a limit is hit; a packet too big for the path gets "fragmentation needed" /
"packet too big" so PMTU discovery works, on either side.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections import deque
from typing import Any

from ipferry.wire.dns import DNS_ADDRESSES, DNS_PORT
from ipferry.wire.icmp import echo_message, icmp_packet, tcp_packet, udp_packet, unreachable
from ipferry.wire.nat import NatPool, NatSlot, SlotPoolExhausted, rewrite_tcp
from ipferry.wire.packet import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    Drop,
    Parsed,
    parse,
)
from ipferry.wire.sharding import owner
from ipferry.wire.vnet import HEADER_SIZE as HEADER
from ipferry.wire.vnet import is_gso, is_partial, sanitize

from .actions import (
    Action,
    Audit,
    AuditFlowStart,
    CloseAccepted,
    ConnectOfframp,
    Count,
    DecideFlow,
    FlowEnded,
    FlowStarted,
    Forward,
    Log,
    OpenDatagram,
    RefusedPastLimit,
    RelayStreams,
    SendDatagram,
    SendToTunnel,
    WriteTun,
)
from .decisions import Decision, FlowStart, TunnelContext
from .flows import CloseReason, Direction, Flow, FlowKey, FlowTable, LimitReached, TcpState
from .legs import (
    AcceptedLeg,
    DatagramLeg,
    DowngradedLeg,
    RoutedLeg,
    StreamLeg,
    TunnelLeg,
    same_device,
)
from .names import NameCache
from .routes import NO_ROUTE, PROHIBITED, Route, RouteTable, Unrouted

# ICMPv6 is "icmp" to rules and metrics: one word for ping, whichever IP version.
PROTO_NAMES = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp", IPPROTO_ICMP: "icmp", IPPROTO_ICMPV6: "icmp"}
ECHO_REQUEST = {IPPROTO_ICMP: 8, IPPROTO_ICMPV6: 128}


def _quoted_keys(tunnel: TunnelLeg, q: Parsed) -> tuple[FlowKey, FlowKey]:
    """The flows an ICMP error from ``tunnel`` quoting ``q`` may be about: one whose packet went
    to the client (the quoted packet's source is the flow's destination), and one the client's
    packet (``q`` as sent) started, e.g. routed to the device that answers with the error."""
    if q.protocol in ECHO_REQUEST:
        return (FlowKey(tunnel.tenant, q.protocol, q.dst, q.sport, q.src, 0),
                FlowKey(tunnel.tenant, q.protocol, q.src, q.sport, q.dst, 0))
    return (FlowKey(tunnel.tenant, q.protocol, q.dst, q.dport, q.src, q.sport),
            FlowKey(tunnel.tenant, q.protocol, q.src, q.sport, q.dst, q.dport))


def _opens_flow(p: Parsed) -> bool:
    """Can only be a new flow's first packet: a TCP SYN, an echo request. (A UDP datagram may
    be a device's answer in a flow another worker routed to it.)"""
    if p.protocol == IPPROTO_TCP:
        return p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
    return p.protocol != IPPROTO_UDP and p.icmp_type == ECHO_REQUEST[p.protocol]
ECHO_REPLY = (0, 129)  # IPv4's, IPv6's: a reply of the other's kind is not the flow's
DEST_UNREACHABLE = {IPPROTO_ICMP: 3, IPPROTO_ICMPV6: 1}
LAST_KEPT = 1280  # of a datagram flow's last client packet: all an ICMP error embeds
MAX_UDP_PAYLOAD = {4: 65535 - 28, 6: 65535 - 8}
UPGRADE_PORT = 1  # nsd binds the upgrade listeners there (see ipferry.nsd.network)
MAX_PENDING = 8  # packets held per flow while an async hook decides or the off-ramp connects
MAX_CUT = 4096  # slots of flows cut short whose sockets' resets still pass (see FlowEngine.cut)
CUT_KEPT = 5.0  # seconds
MAX_INTERNED = 4096  # destination addresses shared between flows (never cleared: bounded)
# An off-ramp socket's errno -> the ICMP unreachable the client gets (see wire.icmp.unreachable)
UNREACHABLE = {errno.ECONNREFUSED: "port", errno.EHOSTUNREACH: "host", errno.ENETUNREACH: "net",
               errno.EACCES: "admin", errno.EPERM: "admin"}


def forbidden_destination(dst: bytes) -> bool:
    """Destinations no tunnel may reach whatever the rules say: the daemon's own host
    (loopback: its admin API and on-ramps), "this host" (0.0.0.0/8, ::) and IPv6 spellings of
    IPv4 addresses (::ffff:a.b.c.d, ::a.b.c.d), which would slip past IPv4 rules."""
    if len(dst) == 4:
        return dst[0] in (0, 127)
    return dst[:10] == bytes(10) and (dst[10:12] in (b"\xff\xff", b"\0\0"))


def unroutable_source(src: bytes) -> bool:
    """A source address no device would answer over its tunnel: loopback, unspecified,
    link-local (169.254/16, fe80::/10) or multicast."""
    if len(src) == 4:
        return src[0] in (0, 127) or src[:2] == b"\xa9\xfe" or src[0] >= 224
    return (src == bytes(15) + b"\x01" or src == bytes(16) or src[0] == 0xFF
            or (src[0] == 0xFE and src[1] & 0xC0 == 0x80))


def addr(b: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(b) == 16 else socket.AF_INET, b)


def failure(err: int) -> str:
    """An off-ramp connect's errno as the ``reason`` of ipferry_upstream_failures_total."""
    if err == errno.ECONNREFUSED:
        return "refused"
    if err == errno.ETIMEDOUT:  # the kernel gave up retrying its SYN: the upstream is silent
        return "timeout"
    return "unreachable" if err in UNREACHABLE else "error"


def reset_for(p: Parsed, packet: bytes | memoryview) -> bytes:
    """The RST a TCP stack would answer ``packet`` with (RFC 793 "Reset Generation")."""
    if p.tcp_flags & TCP_ACK:
        ack_at = p.ihl + 8
        return tcp_packet(p.dst, p.dport, p.src, p.sport, int.from_bytes(
            packet[ack_at:ack_at + 4], "big"), 0, TCP_RST)
    # SEG.LEN counts the SYN and the FIN, each one sequence number.
    seg_len = (p.payload_length + (1 if p.tcp_flags & TCP_SYN else 0)
               + (1 if p.tcp_flags & TCP_FIN else 0))
    return tcp_packet(p.dst, p.dport, p.src, p.sport, 0, p.seq + seg_len, TCP_RST | TCP_ACK)


def flow_start(flow: Flow) -> FlowStart:
    """What the hooks see of a flow (built when asked: not kept per flow)."""
    k = flow.key
    return FlowStart(k.tenant, PROTO_NAMES.get(k.protocol, str(k.protocol)), addr(k.src),
                     k.sport, addr(k.dst), k.dport, flow.client.context, flow.host)


def flow_fields(flow: Flow) -> dict[str, Any]:
    """A flow's identity as audit records and logs name it, with its legs: the client's
    (``ip``: packets as they came; ``tcp:upgraded`` ...: terminated in the namespace's kernel;
    ``tcp:accepted``: a TCP on-ramp's connection) and the server's (``ip``: packets into a
    device's tunnel; ``tcp``, ``udp``, ``icmp``: an off-ramp socket; ``tcp:downgraded`` ...: back
    into IP packets for a device's tunnel), and the device's tunnel when there is one."""
    k, client, server = flow.key, flow.client, flow.server
    protocol = PROTO_NAMES.get(k.protocol, str(k.protocol))
    destination = server.tunnel if server is not None else None
    if isinstance(client, AcceptedLeg):
        client_leg = "tcp:accepted"
    elif server is None or (isinstance(server, RoutedLeg) and not server.rebuild):
        client_leg = "ip"
    else:
        client_leg = f"{protocol}:upgraded"
    if server is None:
        server_leg = None
    elif isinstance(server, DowngradedLeg) or (isinstance(server, RoutedLeg) and server.rebuild):
        server_leg = f"{protocol}:downgraded"
    else:
        server_leg = server.layer
    return {"tenant": k.tenant, "protocol": protocol,
            "src": addr(k.src), "sport": k.sport, "dst": addr(k.dst), "dport": k.dport,
            "tunnel": client.id or None, "tunnel_worker": client.origin,
            "host": flow.host, "client_leg": client_leg, "server_leg": server_leg,
            "destination_tunnel": destination.id if destination is not None else None,
            "destination_worker": destination.origin if destination is not None else None}


# The actions of every packet are made with tuple.__new__: a NamedTuple's own __new__ is a Python
# function, and its call was a twentieth of a packet's cost (bench/hotpath.py).
_tuple = tuple.__new__


def _fmt(hp: tuple[str, int] | None) -> str | None:
    return f"{hp[0]}:{hp[1]}" if hp else None


class FlowEngine:
    """One worker's flows: the decisions about packets, none of the I/O.

    ``pools`` are the NAT slots by IP version, ``local`` the upgrade listeners' addresses, ``mtu``
    the worker TUN's (larger client packets are answered "too big"). With ``workers`` > 1 a
    flow this worker does not own (by :func:`ipferry.wire.sharding.owner`) is forwarded."""

    def __init__(self, *, flows: FlowTable, pools: dict[int, NatPool], local: dict[int, bytes],
                 connect_timeout: float, index: int = 0, workers: int = 1, mtu: int = 65520,
                 fail_closed: bool = False, routes: RouteTable | None = None,
                 dns_upstreams: list[tuple[str, int]] | None = None,
                 names: NameCache | None = None) -> None:
        self.flows = flows
        # The names the daemon's resolver answered with, per tenant: a new flow carries its
        # destination's (rules with ``host``, the hooks, the audit).
        self.names = names if names is not None else NameCache()
        # Where flows to the daemon's DNS address (wire.dns) go: the host's resolvers.
        self.dns_upstreams = dns_upstreams or []
        self.routes = routes if routes is not None else RouteTable()
        # Flows with a device on their server leg, by the key of the device's packets (its
        # address and port first): its answers find their flow here.
        self.from_device: dict[FlowKey, Flow] = {}
        # The NAT slots of flows cut short, for a few seconds: the kernel's resets of their
        # sockets (aborted by the driver just after) still reach the other end, which would
        # otherwise wait on a connection that is gone. Slot -> (tunnel, addresses), deadline.
        self.cut: dict[tuple[bytes, int], tuple[TunnelLeg, bytes, int, bytes, int, float]] = {}
        self.pools = pools
        self.local = local
        self.connect_timeout = connect_timeout
        self.index = index
        self.workers = workers
        self.mtu = mtu
        self.fail_closed = fail_closed  # audit.on_error = "refuse": no record, no flow
        self.by_key: dict[FlowKey, Flow] = flows.by_key  # (the table's own dict)
        self.by_slot: dict[tuple[bytes, int], Flow] = {}  # upgraded flows by their NAT slot
        # Off-ramps connecting, in deadline order (one timeout for all: a FIFO is a heap).
        self.connecting: deque[Flow] = deque()
        self.tun_vnet = False  # the TUN's packets carry a virtio-net header
        # The daemon's own UDP endpoints (GUE on-ramps): a flow there could speak for any tenant.
        self.own_endpoints: set[tuple[bytes | None, int]] = set()  # None: any address
        # And its TCP on-ramps' (a flow there would come out as the on-ramp's tenant), by the
        # host's addresses: a wildcard's port is the host's only, not every destination's.
        self.own_tcp_endpoints: set[tuple[bytes, int]] = set()
        # Flows' destination addresses and ports, one object each for all flows (an int past 256
        # is an object of its own per flow otherwise).
        self._destinations: dict[bytes | int, bytes | int] = {}
        self._upstreams: dict[tuple[bytes, int], tuple[str, int]] = {}

    def _destination(self, key: FlowKey) -> tuple[str, int]:
        """The flow's own destination as an off-ramp address: one tuple for all its flows."""
        found = self._upstreams.get((key.dst, key.dport))
        if found is None:
            found = (addr(key.dst), key.dport)
            if len(self._upstreams) < MAX_INTERNED:
                self._upstreams[(key.dst, key.dport)] = found
        return found

    # -- a packet from a tunnel ----------------------------------------------------------------

    def tunnel_packet(self, tunnel: TunnelLeg, data: bytes, now: float) -> list[Action]:
        """A datagram of ``tunnel``: the packet (after a virtio-net header on a vnet tunnel)."""
        out: list[Action] = []
        if tunnel.vnet:
            header: bytes | None = data[:HEADER]
            packet: bytes | memoryview = memoryview(data)[HEADER:]
        else:
            header, packet = None, data
        p = parse(packet)
        if isinstance(p, Drop):
            out.append(Count("drop", p.value))
            return out
        if header is not None:
            # The client's header steers the kernel and our software GSO: only the truth passes.
            header = sanitize(header, p.version, p.protocol, p.ihl, p.payload_offset,
                              p.payload_length)
            if header is None:
                out.append(Count("drop", "bad_vnet_header"))
                return out
            if len(packet) > p.total_length:
                packet = packet[:p.total_length]
        key = None
        answer = None  # a device's packet of a flow routed to it
        if p.inner is None:
            key = FlowKey(tunnel.tenant, p.protocol, p.src, p.sport, p.dst, p.dport)
            flow = self.by_key.get(key)
            if flow is None and self.from_device:
                flow = answer = self.from_device.get(key)
        else:
            flow = None  # an ICMP error: its flow is the embedded packet's
        if flow is None and self.workers > 1 and tunnel.local:
            # Only flows we own are here: hash only for the others (and new ones).
            h = p.inner or p
            o = owner(h.protocol, h.src, h.sport, h.dst, h.dport, self.workers)
            if tunnel.lands and p.inner is not None:
                if not self._quoted_here(tunnel, p.inner):
                    # Its flow may be served where its first packet landed: every worker looks.
                    out.extend(Forward(w, tunnel, data) for w in range(self.workers)
                               if w != self.index)
                    return out
            elif o != self.index:
                if tunnel.steered:
                    # The kernel's steering program disagrees with us: serve it where it landed
                    # (every packet of the flow lands here alike), but count it: it should not.
                    out.append(Count("gue_missteered"))
                elif not (tunnel.lands and _opens_flow(p) and not self._in_networks(tunnel, p)):
                    out.append(Forward(o, tunnel, data))
                    return out
                # (else: a TUN queue's new flow, served where the kernel put it: our answers,
                # written to this queue, keep the flow's later packets here)
        if key is None:
            self._tunnel_icmp_error(tunnel, p, packet, now, out)
            return out
        if answer is not None:
            if answer.server is None or not same_device(answer.server.tunnel, tunnel):
                out.append(Count("drop", "tunnel_mismatch"))
            else:
                self._from_device(answer, p, packet, header, now, out)
            return out
        if flow is not None and flow.client is not tunnel:
            # Same tenant and 4-tuple from another tunnel: never let it touch this flow.
            out.append(Count("drop", "tunnel_mismatch"))
            return out
        if p.protocol == IPPROTO_TCP and p.total_length > self.mtu and not (
                header and is_gso(header)):  # (a superframe is many segments)
            self._too_big_for_tun(tunnel, p, packet, out)  # before any flow starts or waits
            return out
        if flow is None:
            if self._starts_flow(tunnel, p, packet, out):
                self._start(tunnel, key, p, packet, header, now, out)
            return out
        if flow.pending is not None:
            self._hold(flow, p, packet, header, now, out)
            return out
        self._to_server(flow, p, packet, header, now, out)
        return out

    def _hold(self, flow: Flow, p: Parsed, packet: bytes | memoryview, header: bytes | None,
              now: float, out: list[Action]) -> None:
        """Held while the application decides or the off-ramp connects (connect before
        accept: the client's SYN reaches the kernel only once the off-ramp answered)."""
        assert flow.pending is not None
        if p.protocol == IPPROTO_TCP and p.tcp_flags & TCP_RST:
            # The client gave up (its tunnel alone can reach this flow): so do we, now.
            self.flows.observe(flow, Direction.TO_SERVER, p.tcp_flags, p.total_length, now)
            self._end(flow, CloseReason.RST, now, out)
            return
        if len(flow.pending) >= MAX_PENDING:
            out.append(Count("drop", "decision_pending" if flow.decision is None
                             else "connect_pending"))  # the client retransmits
            return
        flow.pending += (bytes(packet) if header is None else (bytes(packet), header),)

    def _starts_flow(self, tunnel: TunnelLeg, p: Parsed, packet: bytes | memoryview,
                     out: list[Action]) -> bool:
        """May this packet of no known flow start one? (Counted and answered when not.)"""
        if forbidden_destination(p.dst) or (p.protocol == IPPROTO_UDP and (
                (p.dst, p.dport) in self.own_endpoints or (None, p.dport) in self.own_endpoints)
        ) or (p.protocol == IPPROTO_TCP and (p.dst, p.dport) in self.own_tcp_endpoints):
            out.append(Count("drop", "forbidden_destination"))
            self._unreachable(tunnel, p, packet, "admin", out)
            return False
        if self.routes.private() and (p.protocol != IPPROTO_TCP or p.tcp_flags & (
                TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN):  # (a stray segment gets its reset)
            verdict = self.routes.lookup(tunnel.tenant, p.dst)
            if verdict is not None and not self._routable(tunnel, verdict, p, packet, out):
                return False
        if p.protocol == IPPROTO_TCP:
            if p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN:
                return True
            # Not the start of a flow we know (e.g. ours died with a worker, or behind ECMP
            # another node's, moved here by a change of nodes): reset it so the client fails
            # fast instead of retransmitting into the void.
            out.append(Count("drop", "not_this_node" if tunnel.anycast else "no_flow"))
            if not p.tcp_flags & TCP_RST:
                out.append(SendToTunnel(tunnel, reset_for(p, packet)))
            return False
        if p.protocol != IPPROTO_UDP and p.icmp_type != ECHO_REQUEST[p.protocol]:
            out.append(Count("drop", "icmp_unsolicited"))  # an echo reply nobody asked for
            return False
        return True

    def _routable(self, tunnel: TunnelLeg, verdict: Route | Unrouted, p: Parsed,
                  packet: bytes | memoryview, out: list[Action]) -> bool:
        """May a packet to a private address go on? Not to another tenant's network
        (administratively prohibited), not to an address of the tenant's networks that no
        device holds (host unreachable), not back into the tunnel it came from."""
        if isinstance(verdict, Route):
            if same_device(verdict.target, tunnel):
                out.append(Count("drop", "route_loop"))
                return False
            # To a device, an address of the tenant's networks speaks only for the device that
            # holds it: another tunnel cannot pose as it (its answers would come back to us).
            if not self._holds_source(tunnel, p.src):
                out.append(Count("drop", "source_not_held"))
                self._unreachable(tunnel, p, packet, "admin", out)
                return False
            return True
        out.append(Count("drop", verdict.value))
        if not (p.protocol == IPPROTO_TCP and p.tcp_flags & TCP_RST):
            self._unreachable(tunnel, p, packet, "admin" if verdict is PROHIBITED else "host", out)
        return False

    def _holds_source(self, tunnel: TunnelLeg, src: bytes) -> bool:
        """May ``tunnel`` send from ``src`` towards a device? Yes from outside its tenant's
        networks (a client of no address of its own); inside them, only from its own."""
        source = self.routes.lookup(tunnel.tenant, src)
        return not (source is NO_ROUTE or (isinstance(source, Route)
                                           and not same_device(source.target, tunnel)))

    def _start(self, tunnel: TunnelLeg, key: FlowKey, p: Parsed, packet: bytes | memoryview,
               header: bytes | None, now: float, out: list[Action]) -> None:
        """A new flow: track it, hold its packet, ask the application."""
        if len(self._destinations) < MAX_INTERNED:  # many flows, few destinations: one copy
            key = FlowKey(key.tenant, key.protocol, key.src, key.sport,
                          self._destinations.setdefault(key.dst, key.dst),  # type: ignore[arg-type]
                          self._destinations.setdefault(key.dport, key.dport))  # type: ignore[arg-type]
        flow = self.flows.start(key, None, now, tunnel)
        if isinstance(flow, LimitReached):
            out.append(Count("drop", flow.value))
            # Summed up per tenant and interval: a flood of refusals must not flood the disk.
            out.append(RefusedPastLimit(key.tenant, flow.value))
            self._refuse(tunnel, p, packet, policy=False, out=out)
            return
        flow.pending = (bytes(packet) if header is None else (bytes(packet), header),)
        flow.host = self.names.lookup(key.tenant, key.dst, now)
        out.append(FlowStarted(flow))
        out.append(DecideFlow(flow))

    # -- the application's answer --------------------------------------------------------------

    def decided(self, flow: Flow, decision: object, now: float) -> list[Action]:
        """The application's decision about ``flow`` (memoised). A flow that goes on claims
        what it needs (a NAT slot first: a flow refused for want of one is summed up, not
        audited alone), then its ``flow_start`` record is written."""
        out: list[Action] = []
        if flow.ended:
            return out
        if not isinstance(decision, Decision):
            return self.hook_failed(flow, repr(TypeError(f"not a Decision: {decision!r}")), now)
        if (decision.action == "upgrade" and flow.key.dst in DNS_ADDRESSES
                and flow.key.dport == DNS_PORT and decision.upstream is None):
            decision = self._to_resolver(flow, decision, now, out)
            if decision is None:
                return out
        flow.decision = decision
        if decision.action == "upgrade":
            key = flow.key
            verdict, dst, port = self._route_of(flow, decision)
            if isinstance(verdict, Unrouted):
                self._unroutable(flow, verdict, now, out)
                return out
            layer3 = isinstance(verdict, Route) and not self._as_stream(flow, decision, dst, port)
            if (key.protocol == IPPROTO_TCP and not layer3
                    and not isinstance(flow.client, AcceptedLeg)):
                pool = self.pools[4 if len(key.src) == 4 else 6]
                try:
                    flow.slot = pool.claim(now)
                except SlotPoolExhausted:
                    self._refuse_past_limit(flow, "nat_exhausted", now, out)
                    return out
                self.by_slot[flow.slot] = flow
            if isinstance(verdict, Route):
                if not self._to_device_leg(flow, decision, verdict, dst, port, layer3, now, out):
                    return out
            else:
                flow.server = self._offramp_leg(flow, decision)
        flow.audited = True  # its flow_end is written (or counted lost) in any case
        out.append(AuditFlowStart(flow, {
            "decision": decision.action, "reason": decision.reason,
            "upstream": _fmt(decision.upstream), **flow_fields(flow)}))
        return out

    # -- private networks: a device's tunnel as the server leg ---------------------------------

    def _route_of(self, flow: Flow, decision: Decision
                  ) -> tuple[Route | Unrouted | None, bytes, int]:
        """Where a flow that goes on is going: its route (None: not a private address), and the
        address and port (its own destination, or a TCP flow's ``upstream``)."""
        key = flow.key
        dst, port = key.dst, key.dport
        if not self.routes.private():
            return None, dst, port
        if decision.upstream is not None:  # the application's upstream, not the packet's
            try:
                up = socket.inet_pton(socket.AF_INET6 if ":" in decision.upstream[0]
                                      else socket.AF_INET, decision.upstream[0])
            except OSError:  # a name: the off-ramp resolves it, on the host's side
                return None, dst, port
            verdict = self.routes.lookup(key.tenant, up)
            if key.protocol == IPPROTO_TCP:
                return verdict, up, decision.upstream[1]
            # A datagram off-ramp leaves by the host: never towards a private network.
            return (PROHIBITED if verdict is not None else None), dst, port
        return self.routes.lookup(key.tenant, dst), dst, port

    def _as_stream(self, flow: Flow, decision: Decision, dst: bytes, port: int) -> bool:
        """Does a TCP flow to a device go as a stream (upgraded, then downgraded into the
        device's tunnel) rather than as IP packets? When asked for, when re-routed to another
        address, and always for an accepted client (it has no packets)."""
        key = flow.key
        return key.protocol == IPPROTO_TCP and (
            decision.layer in ("stream", "http") or isinstance(flow.client, AcceptedLeg)
            or dst != key.dst or port != key.dport)

    def _unroutable(self, flow: Flow, verdict: Unrouted, now: float, out: list[Action]) -> None:
        """A flow the application let go whose destination no device of its tenant holds (any
        more), or that is another tenant's: refused as a router would."""
        out.append(Count("drop", verdict.value))
        self._refuse_decided(flow, verdict.value, "admin" if verdict is PROHIBITED else "host",
                             now, out)

    def _refuse_decided(self, flow: Flow, reason: str, kind: str, now: float,
                        out: list[Action]) -> None:
        """Refuse a flow the application let go but that cannot go (``reason``): its first
        packet is answered with the ICMP unreachable ``kind``, and its records say why."""
        held = self._first_held(flow)
        if held is not None:
            self._unreachable(flow.client, *held, kind, out)
            assert flow.pending is not None
            flow.pending = flow.pending[1:]
        flow.decision = Decision.drop(reason)
        self._end(flow, CloseReason.EVICTED, now, out, audit_start=True, close_reason=reason)

    def _to_device_leg(self, flow: Flow, decision: Decision, route: Route, dst: bytes,
                       port: int, layer3: bool, now: float, out: list[Action]) -> bool:
        """Make the server leg into the device's tunnel: IP packets, or a downgraded stream
        (a NAT slot the kernel's socket connects to, and the address the device sees)."""
        key = flow.key
        if same_device(route.target, flow.client):
            out.append(Count("drop", "route_loop"))
            self._refuse_decided(flow, "route_loop", "admin", now, out)
            return False
        if not isinstance(flow.client, AcceptedLeg) and not self._holds_source(flow.client,
                                                                                key.src):
            # (a re-route: the destination the packet named was no device's, so _starts_flow
            # did not ask; the device must not see a connection from another device's address)
            out.append(Count("drop", "source_not_held"))
            self._refuse_decided(flow, "source_not_held", "admin", now, out)
            return False
        upstream = (addr(dst), port)
        if layer3:
            answers = self._answer_key(key)
            if answers in self.from_device:  # another flow takes the device's answers
                out.append(Count("drop", "duplicate_flow"))
                self._refuse_decided(flow, "duplicate_flow", "admin", now, out)
                return False
            flow.server = RoutedLeg(route.target, upstream, rebuild=key.protocol == IPPROTO_UDP
                                    and decision.layer in ("stream", "http"))
            self.from_device[answers] = flow
            return True
        version = 4 if len(dst) == 4 else 6
        if len(key.src) == len(dst) and not unroutable_source(key.src):
            peer = key.src
        elif isinstance(flow.client, AcceptedLeg):
            # A client the device could not answer (another IP version, a loopback address its
            # kernel would take for a martian): the device sees the proxy's address instead.
            peer = self.local[version]
        else:
            out.append(Count("drop", "address_family_mismatch"))
            self._refuse_decided(flow, "address_family_mismatch", "admin", now, out)
            return False
        peer_port = self._peer_port(flow, peer, dst, port)
        if peer_port is None:
            self._refuse_past_limit(flow, "downgrade_ports_exhausted", now, out)
            return False
        try:
            slot = self.pools[version].claim(now)
        except SlotPoolExhausted:
            self._refuse_past_limit(flow, "nat_exhausted", now, out)
            return False
        flow.server = DowngradedLeg(upstream, route.target, slot, (peer, peer_port), (dst, port))
        self.by_slot[slot] = flow
        self.from_device[FlowKey(key.tenant, IPPROTO_TCP, dst, port, peer, peer_port)] = flow
        out.append(Count("downgraded"))
        return True

    def _peer_port(self, flow: Flow, peer: bytes, dst: bytes, port: int) -> int | None:
        """The port a downgraded connection comes from, as the device sees it: the client's own
        when it is free, else one whose flow hash this worker owns (the device's answers must
        reach this worker, as the client's packets do)."""
        key = flow.key

        def free(candidate: int) -> bool:
            if self.workers > 1 and owner(IPPROTO_TCP, peer, candidate, dst, port,
                                          self.workers) != self.index:
                return False
            if FlowKey(key.tenant, IPPROTO_TCP, dst, port, peer, candidate) in self.from_device:
                return False
            other = self.by_key.get(FlowKey(key.tenant, IPPROTO_TCP, peer, candidate, dst, port))
            return other is None or other is flow

        if free(key.sport):
            return key.sport
        for step in range(1, 8192):
            candidate = 1024 + (key.sport + step) % 64512
            if free(candidate):
                return candidate
        return None

    @staticmethod
    def _answer_key(key: FlowKey) -> FlowKey:
        """The key of a device's answers to a flow routed to it as IP packets (an echo reply
        keeps the identifier where the request had it)."""
        if key.protocol in ECHO_REQUEST:
            return FlowKey(key.tenant, key.protocol, key.dst, key.sport, key.src, 0)
        return key.reply()

    def _to_resolver(self, flow: Flow, decision: Decision, now: float,
                     out: list[Action]) -> Decision | None:
        """A query to the daemon's DNS address, let go by the application: off to the host's
        resolver (a loopback stub too: only this forwarder reaches it, never a flow's own
        destination). None (refused: "port unreachable") when the daemon knows no resolver."""
        if flow.key.protocol not in (IPPROTO_UDP, IPPROTO_TCP) or not self.dns_upstreams:
            out.append(Count("drop", "no_dns_upstream"))
            self._refuse_decided(flow, "no_dns_upstream", "port", now, out)
            return None
        return Decision(decision.action, self.dns_upstreams[0],
                        decision.reason or "the daemon's resolver", decision.layer)

    def hook_failed(self, flow: Flow, error: str, now: float) -> list[Action]:
        """``on_flow_start`` raised (or answered no Decision): the flow is dropped."""
        out: list[Action] = []
        if flow.ended:
            return out
        out.append(Count("drop", "hook_error"))
        flow.decision = Decision.drop(f"hook error: {error}")
        self._refuse_first(flow, policy=False, out=out)
        self._end(flow, CloseReason.EVICTED, now, out, audit_start=True)
        return out

    def audit_written(self, flow: Flow, ok: bool, now: float) -> list[Action]:
        """The flow's ``flow_start`` record was written (``ok``) or not: the flow goes on."""
        out: list[Action] = []
        if flow.ended:
            return out
        decision = flow.decision
        assert isinstance(decision, Decision)
        if not ok and self.fail_closed and decision.action == "upgrade":
            # Fail closed: no flow goes without its record while the sink fails.
            self._refuse_past_limit(flow, "audit_unavailable", now, out)
            return out
        if decision.action != "upgrade":
            out.append(Count("drop", "denied"))
            self._refuse_first(flow, policy=True, out=out)
            self._end(flow, CloseReason.EVICTED, now, out, close_reason="denied")
            return out
        server = flow.server
        if isinstance(server, RoutedLeg):  # IP packets: the device answers for itself
            self._release(flow, now, out)
            return out
        if isinstance(server, StreamLeg):  # (a downgraded one too: connect before accept)
            flow.deadline = now + self.connect_timeout
            self.connecting.append(flow)
            out.append(ConnectOfframp(flow))
            return out
        out.append(OpenDatagram(flow))
        return out

    def _offramp_leg(self, flow: Flow, decision: Decision) -> StreamLeg | DatagramLeg:
        """The server leg of a flow off-ramped by a socket of the daemon's host."""
        key = flow.key
        upstream = decision.upstream or self._destination(key)
        if key.protocol == IPPROTO_TCP:
            return StreamLeg(upstream)
        protocol = "udp" if key.protocol == IPPROTO_UDP else "icmp"
        if protocol == "icmp" and (":" in upstream[0]) != (len(key.src) == 16):
            upstream = (addr(key.dst), 0)  # an echo cannot change IP version on the way
        return DatagramLeg(upstream, protocol)

    def _refuse_past_limit(self, flow: Flow, reason: str, now: float, out: list[Action]) -> None:
        """Refuse a decided flow for want of a resource: counted, answered (a reset for TCP,
        "administratively prohibited" for the rest), summed up in the audit, not per flow."""
        out.append(Count("drop", reason))
        out.append(RefusedPastLimit(flow.key.tenant, reason))
        flow.audited = False  # summed up in a flows_refused record, no flow_end of its own
        self._refuse_first(flow, policy=flow.key.protocol != IPPROTO_TCP, out=out)
        self._end(flow, CloseReason.EVICTED, now, out, close_reason=reason)

    def _first_held(self, flow: Flow) -> tuple[Parsed, bytes] | None:
        """The flow's first packet (held until the flow went on), to answer it."""
        if not flow.pending:
            return None
        first = flow.pending[0]
        packet = first if isinstance(first, bytes) else first[0]
        p = parse(packet)
        return (p, packet) if isinstance(p, Parsed) else None

    def _refuse_first(self, flow: Flow, *, policy: bool, out: list[Action]) -> None:
        """Answer a refused flow's first packet (then it is answered, not dropped at the end)."""
        held = self._first_held(flow)
        if held is not None:
            self._refuse(flow.client, *held, policy=policy, out=out)
            assert flow.pending is not None
            flow.pending = flow.pending[1:]

    def _refuse(self, tunnel: TunnelLeg, p: Parsed, packet: bytes | memoryview, *, policy: bool,
                out: list[Action]) -> None:
        """ICMP "administratively prohibited" for policy (as a firewall's reject does), a TCP
        reset for a limit; datagrams over a limit get nothing."""
        if policy:
            self._unreachable(tunnel, p, packet, "admin", out)
        elif p.protocol == IPPROTO_TCP and not p.tcp_flags & TCP_RST:
            out.append(SendToTunnel(tunnel, reset_for(p, packet)))

    def _unreachable(self, tunnel: TunnelLeg, p: Parsed, packet: bytes | memoryview, kind: str,
                     out: list[Action], mtu: int = 0) -> None:
        answer = unreachable(packet, p, kind, mtu=mtu)
        if answer is not None:
            out.append(Count("icmp_sent", kind))
            out.append(SendToTunnel(tunnel, answer))

    # -- the server leg ------------------------------------------------------------------------

    def offramp_connected(self, flow: Flow, now: float) -> list[Action]:
        """The off-ramp's stream is connected: let the client's SYN (and what else was held)
        through to the kernel, which answers it."""
        out: list[Action] = []
        flow.deadline = 0.0
        if flow.ended:
            return out
        server = flow.server
        assert isinstance(server, StreamLeg)
        server.connected = True
        if isinstance(flow.client, AcceptedLeg):
            if not isinstance(server, DowngradedLeg):
                flow.state = TcpState.RELAYING  # no packet of it to see: it ends with its relay
            out.append(RelayStreams(flow))
            return out
        self._release(flow, now, out)
        return out

    def stream_finished(self, flow: Flow, now: float) -> list[Action]:
        """The stream handler of an accepted client's flow is done. A flow relaying between two
        sockets ends here; one downgraded into a device's tunnel ends once that connection has
        closed too (its packets are followed: see :meth:`_downgraded_packet`)."""
        out: list[Action] = []
        if not flow.ended and flow.state is TcpState.RELAYING:
            self._end(flow, CloseReason.FIN, now, out)
        return out

    def stream_accepted(self, tenant: str, context: TunnelContext, client: tuple[bytes, int],
                        upstream: tuple[bytes, int], handle: object, onramp: str,
                        now: float) -> list[Action]:
        """A ``kind = "tcp"`` on-ramp accepted a connection from ``client`` (its own address, or
        the one its PROXY header carried) for ``upstream``: a flow, decided as any other."""
        out: list[Action] = []
        key = FlowKey(tenant, IPPROTO_TCP, client[0], client[1], upstream[0], upstream[1])
        if key in self.by_key:  # (only a PROXY header can say so twice)
            out.append(Count("drop", "duplicate_flow"))
            out.append(CloseAccepted(handle))
            return out
        leg = AcceptedLeg(tenant, context, handle, onramp, self.index)
        flow = self.flows.start(key, None, now, leg)
        if not isinstance(flow, LimitReached):
            flow.host = self.names.lookup(tenant, upstream[0], now)
        if isinstance(flow, LimitReached):
            out.append(Count("drop", flow.value))
            out.append(RefusedPastLimit(tenant, flow.value))
            out.append(CloseAccepted(handle))
            return out
        out.append(FlowStarted(flow))
        out.append(DecideFlow(flow))
        return out

    def offramp_failed(self, flow: Flow, reason: str, err: int, now: float) -> list[Action]:
        """The client gets what it would get end to end: a reset for a refused connect, the
        matching ICMP unreachable for an unreachable one, nothing for a silent one."""
        out: list[Action] = []
        flow.deadline = 0.0
        if flow.ended:
            return out
        out.append(Count("upstream_failure", reason))
        out.append(Log("info", "upstream_failed", {
            "reason": reason, "error": errno.errorcode.get(err, err), **flow_fields(flow)}))
        held = self._first_held(flow)
        if held is not None and reason != "timeout":
            if reason in ("refused", "error"):
                self._refuse(flow.client, *held, policy=False, out=out)  # a reset
            else:
                self._unreachable(flow.client, *held, UNREACHABLE.get(err, "host"), out)
            assert flow.pending is not None
            flow.pending = flow.pending[1:]  # the first was answered: not dropped
        self._end(flow, CloseReason.EVICTED, now, out, close_reason=f"upstream_{reason}")
        return out

    def datagram_opened(self, flow: Flow, now: float) -> list[Action]:
        """The datagram leg is open: what was held goes out of it."""
        out: list[Action] = []
        if not flow.ended:
            self._release(flow, now, out)
        return out

    def datagram_failed(self, flow: Flow, reason: str, kind: str, now: float) -> list[Action]:
        """The datagram leg could not be opened: ``reason`` "unreachable" (answered with the
        ICMP ``kind``), or a limit of ours ("icmp_not_permitted", "local_ports_exhausted")."""
        out: list[Action] = []
        if flow.ended:
            return out
        if reason == "unreachable":
            out.append(Count("upstream_failure", "unreachable"))
            held = self._first_held(flow)
            if held is not None:
                self._unreachable(flow.client, *held, kind, out)
                assert flow.pending is not None
                flow.pending = flow.pending[1:]
            self._end(flow, CloseReason.EVICTED, now, out, close_reason="upstream_unreachable")
            return out
        out.append(Count("drop", reason))
        if flow.pending:
            flow.pending = flow.pending[1:]  # the first is the drop just counted: not held too
        self._end(flow, CloseReason.EVICTED, now, out, close_reason=reason)
        return out

    def _release(self, flow: Flow, now: float, out: list[Action]) -> None:
        """Send on what was held while the flow was decided and its off-ramp connected."""
        held, flow.pending = flow.pending or (), None
        for item in held:
            packet, header = (item, None) if isinstance(item, bytes) else item
            if flow.ended:
                return
            p = parse(packet)
            if isinstance(p, Parsed):
                self._to_server(flow, p, packet, header, now, out)

    def _to_server(self, flow: Flow, p: Parsed, packet: bytes | memoryview,
                   header: bytes | None, now: float, out: list[Action]) -> None:
        server = flow.server
        if not isinstance(server, DatagramLeg):
            if isinstance(server, RoutedLeg):
                self._to_device(flow, server, p, packet, header, now, out)
            else:
                self._to_kernel(flow, p, packet, header, now, out)
            return
        # A datagram flow: the payload (UDP) or the whole ICMP message leaves by its socket.
        self.flows.observe(flow, Direction.TO_SERVER, 0, p.total_length, now)
        server.last = (p, bytes(packet[:LAST_KEPT]))
        if p.protocol == IPPROTO_UDP:
            # The UDP length says where the datagram ends (the parser checked it fits): bytes
            # after it are padding of the IP packet, not payload, as a kernel would see it.
            start = p.payload_offset
            end = p.ihl + int.from_bytes(packet[p.ihl + 4:p.ihl + 6], "big")
        else:
            start, end = p.ihl, p.total_length
        flow.payload_up += end - p.payload_offset
        out.append(_tuple(SendDatagram, (flow, memoryview(packet)[start:end])))

    # -- layer 3: IP packets between two devices of a tenant ------------------------------------

    def _to_device(self, flow: Flow, server: RoutedLeg, p: Parsed, packet: bytes | memoryview,
                   header: bytes | None, now: float, out: list[Action]) -> None:
        """A client packet into the device's tunnel, as it came (tracked and counted)."""
        self._routed(flow, Direction.TO_SERVER, server.tunnel, p, packet, header, now, out)

    def _from_device(self, flow: Flow, p: Parsed, packet: bytes | memoryview,
                     header: bytes | None, now: float, out: list[Action]) -> None:
        """A device's packet of a flow routed to it: to the client as it came (layer 3), or
        into the namespace's kernel for the downgraded stream's socket."""
        server = flow.server
        if isinstance(server, RoutedLeg):
            self._routed(flow, Direction.TO_CLIENT, flow.client, p, packet, header, now, out)
            return
        assert isinstance(server, DowngradedLeg)
        kernel = server.kernel
        if kernel is None or p.protocol != IPPROTO_TCP:  # nothing of ours was sent to it yet
            out.append(Count("drop", "downgrade_not_connected"))
            return
        if p.total_length > self.mtu and not (header and is_gso(header)):
            assert server.tunnel is not None
            self._too_big_for_tun(server.tunnel, p, packet, out)
            return
        buf = bytearray(packet)
        rewrite_tcp(buf, p, server.slot.address, server.slot.port, kernel[0], kernel[1],
                    partial=header is not None and is_partial(header))
        out.append(_tuple(WriteTun, (buf, header)))
        self._downgraded_packet(flow, server, Direction.TO_CLIENT, p, now, out)

    def _routed(self, flow: Flow, direction: Direction, tunnel: TunnelLeg, p: Parsed,
                packet: bytes | memoryview, header: bytes | None, now: float,
                out: list[Action]) -> None:
        server = flow.server
        assert isinstance(server, RoutedLeg)
        key = flow.key
        if server.rebuild:  # a UDP flow as datagrams: the payload in fresh headers
            end = p.ihl + int.from_bytes(packet[p.ihl + 4:p.ihl + 6], "big")
            payload = bytes(packet[p.payload_offset:end])
            if direction is Direction.TO_SERVER:
                rebuilt = udp_packet(key.src, key.sport, key.dst, key.dport, payload)
                flow.payload_up += len(payload)
            else:
                rebuilt = udp_packet(key.dst, key.dport, key.src, key.sport, payload)
                flow.payload_down += len(payload)
            self.flows.observe(flow, direction, 0, len(rebuilt), now)
            out.append(Count("routed", "to_device" if direction is Direction.TO_SERVER
                             else "to_client"))
            out.append(SendToTunnel(tunnel, rebuilt))
            return
        if p.total_length > tunnel.mtu and not (header and is_gso(header)):
            # More than the other tunnel carries: the sender hears so, as from a router.
            out.append(Count("drop", "too_big"))
            if p.version == 6 or packet[6] & 0x40:
                source = flow.client if direction is Direction.TO_SERVER else server.tunnel
                self._unreachable(source, p, packet, "too_big", out, mtu=tunnel.mtu)
            return
        tcp = p.protocol == IPPROTO_TCP
        blind = tcp and p.tcp_flags & TCP_RST and (p.seq - ((
            flow.next_seq_up if direction is Direction.TO_SERVER else flow.next_seq_down)
            or 0)) & 0xFFFFFFFF > 1
        # A reset off the expected sequence goes on (the device's stack judges it, RFC 5961)
        # but does not end the flow here.
        ended = False if blind else self.flows.observe(flow, direction, p.tcp_flags,
                                                        p.total_length, now)
        if tcp:
            count_payload(flow, int(direction), p)
        elif direction is Direction.TO_SERVER:
            flow.payload_up += p.total_length - p.payload_offset
        else:
            flow.payload_down += p.total_length - p.payload_offset
        out.append(Count("routed", "to_device" if direction is Direction.TO_SERVER
                         else "to_client"))
        out.append(_tuple(SendToTunnel, (tunnel, packet, header)))
        if ended or flow.state is TcpState.TIME_WAIT:
            self._after_packet(flow, ended, now, out)

    def _kernel_to_device(self, flow: Flow, p: Parsed, packet: bytes | memoryview,
                          header: bytes | None, now: float, out: list[Action]) -> None:
        """A packet of the downgraded socket (the kernel's, to the flow's second NAT slot): into
        the device's tunnel as from the client's address."""
        server = flow.server
        assert isinstance(server, DowngradedLeg)
        if server.kernel is None:
            if not p.tcp_flags & TCP_SYN:
                out.append(Count("drop", "kernel_no_flow"))
                return
            server.kernel = (p.src, p.sport)  # the socket's own address: its answers go there
        tunnel = server.tunnel
        assert tunnel is not None
        if p.total_length > tunnel.mtu and not (header and is_gso(header)):
            out.append(Count("drop", "too_big"))
            answer = unreachable(packet, p, "too_big", mtu=tunnel.mtu)
            if answer is not None:
                out.append(WriteTun(answer))
            return
        buf = bytearray(packet)
        (peer, peer_port), (device, device_port) = server.peer, server.device
        rewrite_tcp(buf, p, peer, peer_port, device, device_port,
                    partial=header is not None and is_partial(header))
        out.append(_tuple(SendToTunnel, (tunnel, buf, header)))
        self._downgraded_packet(flow, server, Direction.TO_SERVER, p, now, out)

    def _downgraded_packet(self, flow: Flow, server: DowngradedLeg, direction: Direction,
                           p: Parsed, now: float, out: list[Action]) -> None:
        """Follow the downgraded connection. An accepted client's flow has no other packets:
        they are its accounting and its state. Else the flow's state is its client's, and it
        ends once both connections are done."""
        if not server.connected and p.tcp_flags & TCP_RST:
            # The device refused the socket's connect: the kernel has its reset now, and the
            # connect's failure (a reset for the client, as end to end) comes from the driver.
            return
        done = server.observe(direction is Direction.TO_CLIENT, p.tcp_flags)
        if isinstance(flow.client, AcceptedLeg):
            ended = self.flows.observe(flow, direction, p.tcp_flags, p.total_length, now)
            count_payload(flow, int(direction), p)
            if ended or flow.state is TcpState.TIME_WAIT:
                self._after_packet(flow, ended, now, out)
            return
        flow.last_seen = now
        if done and (p.tcp_flags & TCP_RST or flow.state is TcpState.TIME_WAIT):
            self._end(flow, CloseReason.RST if p.tcp_flags & TCP_RST else CloseReason.FIN, now,
                      out)

    def upstream_reply(self, flow: Flow, data: bytes, now: float) -> list[Action]:
        """A datagram from the off-ramp: wrap it back into IP towards the flow's tunnel."""
        out: list[Action] = []
        if flow.ended:
            return out
        key = flow.key
        if key.protocol == IPPROTO_UDP:
            if len(data) > MAX_UDP_PAYLOAD[4 if len(key.src) == 4 else 6]:
                out.append(Count("drop", "reply_too_big"))  # more than IPv4 carries
                return out
            packet = udp_packet(key.dst, key.dport, key.src, key.sport, data)
            flow.payload_down += len(data)
        elif len(data) >= 8 and data[0] == ECHO_REPLY[len(key.src) == 16]:
            # The kernel put its own identifier in; the client gets back the one it sent.
            seq = int.from_bytes(data[6:8], "big")
            packet = icmp_packet(key.dst, key.src, echo_message(data[0], key.sport, seq, data[8:]))
            flow.payload_down += len(data) - 8
        else:
            out.append(Count("drop", "upstream_unexpected"))
            return out
        self.flows.observe(flow, Direction.TO_CLIENT, 0, len(packet), now)
        out.append(SendToTunnel(flow.client, packet))
        return out

    def upstream_error(self, flow: Flow, kind: str, now: float) -> list[Action]:
        """The off-ramp's kernel reported an ICMP error: the client gets the matching one."""
        out: list[Action] = []
        server = flow.server
        if flow.ended or not isinstance(server, DatagramLeg) or server.last is None:
            return out
        p, packet = server.last
        self._unreachable(flow.client, p, packet, kind, out, mtu=self.mtu)
        return out

    # -- the upgrade: client packets into the kernel -------------------------------------------

    def _to_kernel(self, flow: Flow, p: Parsed, packet: bytes | memoryview, header: bytes | None,
                   now: float, out: list[Action]) -> None:
        """Account a client packet, rewrite it to the upgrade listener, write it to the TUN
        (one larger than the TUN's MTU was answered before: see :meth:`tunnel_packet`)."""
        if p.tcp_flags & TCP_RST and (p.seq - (flow.next_seq_up or 0)) & 0xFFFFFFFF > 1:
            # Not at the sequence we expect (RFC 5961; +1 if a FIN went first): the kernel may
            # answer with a challenge ACK, but a blind reset must not end the flow here.
            self._write_to_kernel(flow, p, packet, header, out)
            return
        ended = self.flows.observe(flow, Direction.TO_SERVER, p.tcp_flags, p.total_length, now)
        count_payload(flow, 0, p)
        self._write_to_kernel(flow, p, packet, header, out)
        if ended or flow.state is TcpState.TIME_WAIT:
            self._after_packet(flow, ended, now, out)

    def _too_big_for_tun(self, tunnel: TunnelLeg, p: Parsed, packet: bytes | memoryview,
                         out: list[Action]) -> None:
        out.append(Count("drop", "too_big"))
        if p.version == 6 or packet[6] & 0x40:  # IPv4 without DF: we don't fragment; dropped
            self._unreachable(tunnel, p, packet, "too_big", out, mtu=self.mtu)

    def _write_to_kernel(self, flow: Flow, p: Parsed, packet: bytes | memoryview,
                         header: bytes | None, out: list[Action]) -> None:
        buf = bytearray(packet)
        slot = flow.slot
        assert slot is not None
        rewrite_tcp(buf, p, slot.address, slot.port, self.local[p.version], UPGRADE_PORT,
                    partial=header is not None and is_partial(header))
        out.append(_tuple(WriteTun, (buf, header)))

    def _in_networks(self, tunnel: TunnelLeg, p: Parsed) -> bool:
        """Is ``p`` for a private network (``[[networks]]``)? Such a flow stays with its hash's owner:
        the device's answers reach whichever worker wrote to it, and are sent on by hash."""
        return bool(self.routes.private()) and self.routes.lookup(tunnel.tenant, p.dst) is not None

    def _quoted_here(self, tunnel: TunnelLeg, q: Parsed) -> bool:
        """Is the flow an ICMP error quotes (``q``: the quoted packet) one of ours, either way
        (see :meth:`_tunnel_icmp_error`)?"""
        return any(key in self.by_key for key in _quoted_keys(tunnel, q))

    def _tunnel_icmp_error(self, tunnel: TunnelLeg, p: Parsed, packet: bytes | memoryview,
                           now: float, out: list[Action]) -> None:
        """An ICMP error from the client's side about one of our packets: match it to its flow.

        A TCP flow's error goes on to the namespace's kernel, translated to the slot (so a
        smaller MTU on the client's path reaches the kernel's PMTU cache); a UDP flow whose
        client says "unreachable" ends, since its replies have nowhere to go.
        """
        q = p.inner
        assert q is not None
        key, mine = _quoted_keys(tunnel, q)
        flow = self.by_key.get(key)
        if flow is not None and flow.client is tunnel and isinstance(flow.server, RoutedLeg):
            # About a device's packet, from the client: to the device, as it came.
            self._routed_icmp_error(flow, flow.server.tunnel, p, packet, now, out)
            return
        if flow is None or flow.client is not tunnel or flow.decision is None:
            # About a client's packet, from the device it was routed to?
            routed = self.by_key.get(mine)
            if (routed is not None and isinstance(routed.server, RoutedLeg)
                    and same_device(routed.server.tunnel, tunnel)):
                self._routed_icmp_error(routed, routed.client, p, packet, now, out)
                return
            out.append(Count("drop", "icmp_error_no_flow"))
            return
        out.append(Count("icmp_received", PROTO_NAMES[key.protocol]))
        self.flows.observe(flow, Direction.TO_SERVER, 0, p.total_length, now)
        if flow.slot is not None:
            out.append(WriteTun(self._error_for_kernel(flow.slot, p, packet)))
        elif (key.protocol == IPPROTO_UDP and p.icmp_type == DEST_UNREACHABLE[p.protocol]
              and not (p.version == 4 and p.icmp_code == 4)):  # "frag needed" is no goodbye
            self._end(flow, CloseReason.EVICTED, now, out, close_reason="client_unreachable")

    def _routed_icmp_error(self, flow: Flow, to: TunnelLeg, p: Parsed,
                           packet: bytes | memoryview, now: float, out: list[Action]) -> None:
        """An ICMP error about a packet of a layer-3 flow: on to the other device as it came
        (a "too big" so that PMTU discovery works end to end, an unreachable port ...)."""
        out.append(Count("icmp_received", PROTO_NAMES[flow.key.protocol]))
        direction = Direction.TO_SERVER if to is not flow.client else Direction.TO_CLIENT
        self.flows.observe(flow, direction, 0, p.total_length, now)
        out.append(SendToTunnel(to, bytes(packet[:p.total_length])))

    def _error_for_kernel(self, slot: NatSlot, p: Parsed, packet: bytes | memoryview) -> bytes:
        """The client's ICMP error as if about the kernel's own packet (local:1 -> the slot)."""
        q = p.inner
        assert q is not None
        message = bytearray(packet[p.ihl:p.total_length])
        inner = 8  # the embedded packet's offset in the message
        local = self.local[p.version]
        src_at, dst_at = (8, 24) if p.version == 6 else (12, 16)
        message[inner + src_at:inner + src_at + len(local)] = local
        message[inner + dst_at:inner + dst_at + len(slot.address)] = slot.address
        ports = inner + q.ihl
        message[ports:ports + 4] = struct.pack("!HH", UPGRADE_PORT, slot.port)
        return icmp_packet(slot.address, local, message)

    # -- the upgrade: the kernel's packets back into the tunnel --------------------------------

    def tun_packet(self, data: bytes, now: float) -> list[Action]:
        """A packet the namespace's kernel sent (to a NAT slot): back into its flow's tunnel."""
        out: list[Action] = []
        if self.tun_vnet:
            header: bytes | None = data[:HEADER]
            packet: bytes | memoryview = memoryview(data)[HEADER:]
        else:
            header, packet = None, data
        p = parse(packet)
        if isinstance(p, Drop):
            out.append(Count("drop", f"kernel_{p.value}"))
            return out
        at = (p.dst, p.dport)
        flow = self.by_slot.get(at) if p.protocol == IPPROTO_TCP else None
        if flow is None:
            cut = self.cut.pop(at, None) if p.tcp_flags & TCP_RST else None
            if cut is None:
                out.append(Count("drop", "kernel_no_flow"))
                return out
            buf = bytearray(packet)  # the reset of a socket of a flow cut short: passed on
            rewrite_tcp(buf, p, cut[1], cut[2], cut[3], cut[4],
                        partial=header is not None and is_partial(header))
            out.append(SendToTunnel(cut[0], buf, header))
            return out
        if flow.slot != at:  # the flow's second slot: its downgraded stream's socket
            self._kernel_to_device(flow, p, packet, header, now, out)
            return out
        tunnel = flow.client
        if p.total_length > tunnel.mtu and not (header and is_gso(header)):
            # More than the flow's tunnel carries: tell the kernel, as a router on its path
            # would (the ICMP comes "from" the slot, about the kernel's own packet).
            out.append(Count("drop", "too_big"))
            answer = unreachable(packet, p, "too_big", mtu=tunnel.mtu)
            if answer is not None:
                out.append(WriteTun(answer))
            return out
        key = flow.key
        ended = self.flows.observe(flow, Direction.TO_CLIENT, p.tcp_flags, p.total_length, now)
        count_payload(flow, 1, p)
        buf = bytearray(packet)
        rewrite_tcp(buf, p, key.dst, key.dport, key.src, key.sport,
                    partial=header is not None and is_partial(header))
        out.append(_tuple(SendToTunnel, (tunnel, buf, header)))
        if ended or flow.state is TcpState.TIME_WAIT:
            self._after_packet(flow, ended, now, out)
        return out

    def _after_packet(self, flow: Flow, ended: bool, now: float, out: list[Action]) -> None:
        if ended:
            self._end(flow, CloseReason.RST, now, out)
        elif flow.state is TcpState.TIME_WAIT:
            server = flow.server
            if (isinstance(server, DowngradedLeg) and not server.done
                    and not isinstance(flow.client, AcceptedLeg)):
                return  # the device's connection is still closing: its last packets need us
            # Both FINs acknowledged: the flow is over. Its slot waits out TIME_WAIT in the pool's
            # quarantine, so late retransmissions cannot meet a new flow on the same 4-tuple.
            self._end(flow, CloseReason.FIN, now, out)

    def stream_for(self, address: bytes, port: int) -> Flow | None:
        """The flow whose upgraded stream the kernel accepted from ``address``:``port`` (its NAT
        slot), if it waits for one: decided, its off-ramp connected, no stream yet."""
        flow = self.by_slot.get((address, port))
        if (flow is None or flow.ended or flow.stream is not None
                or not isinstance(flow.server, StreamLeg) or not flow.server.connected):
            return None
        return flow

    def reset(self, tunnel: TunnelLeg, data: bytes) -> list[Action]:
        """Answer a tunnel datagram with a TCP reset (unless it is not TCP or a reset itself)."""
        out: list[Action] = []
        packet = memoryview(data)[HEADER:] if tunnel.vnet else data
        p = parse(packet)
        if isinstance(p, Parsed) and p.protocol == IPPROTO_TCP and not p.tcp_flags & TCP_RST:
            out.append(SendToTunnel(tunnel, reset_for(p, packet)))
        return out

    # -- time and the ends of things -----------------------------------------------------------

    def timer(self, now: float) -> list[Action]:
        """Once a second: give up off-ramps connecting too long, end the flows idle past their
        state's timeout (the table has already let go of them)."""
        out: list[Action] = []
        while self.connecting and self.connecting[0].deadline <= now:
            flow = self.connecting.popleft()
            if flow.connecting and not flow.ended:
                out.extend(self.offramp_failed(flow, "timeout", errno.ETIMEDOUT, now))
        for flow in self.flows.expire(now):
            self._end(flow, flow.close_reason or CloseReason.IDLE, now, out)
        while self.cut:
            slot, cut = next(iter(self.cut.items()))
            if cut[5] > now:
                break
            del self.cut[slot]
        return out

    def close_tunnel(self, tunnel: TunnelLeg, now: float) -> list[Action]:
        """A tunnel closed: its flows end (cleanly if only the last ACK was missing)."""
        out: list[Action] = []
        for flow in [f for f in self.by_key.values() if f.client is tunnel
                     or (f.server is not None and f.server.tunnel is tunnel)]:
            if isinstance(flow.server, RoutedLeg):
                self._reset_survivor(flow, gone=tunnel, out=out)
            if flow.client is not tunnel:  # the device it reaches is gone
                self._end(flow, CloseReason.EVICTED, now, out, close_reason="device_disconnected")
            elif flow.fins == 3 and not isinstance(flow.server, DowngradedLeg):
                self._end(flow, CloseReason.FIN, now, out)
            else:
                self._end(flow, CloseReason.EVICTED, now, out, close_reason="tunnel_closed")
        return out

    def _remember_cut(self, flow: Flow, now: float, close_reason: str | None) -> None:
        """A flow cut short (a reset, an idle timeout, a device or nsd gone, ...): the driver
        aborts its sockets, and their resets, which come out of the TUN after the flow is gone,
        must still reach the tunnels that are left."""
        key, server, until = flow.key, flow.server, now + CUT_KEPT
        if (flow.slot is not None and not isinstance(flow.client, AcceptedLeg)
                and close_reason != "tunnel_closed"):
            self._cut(flow.slot, (flow.client, key.dst, key.dport, key.src, key.sport, until))
        if (isinstance(server, DowngradedLeg) and server.tunnel is not None
                and close_reason != "device_disconnected"):
            self._cut(server.slot, (server.tunnel, *server.peer, *server.device, until))

    def _cut(self, slot: tuple[bytes, int],
             entry: tuple[TunnelLeg, bytes, int, bytes, int, float]) -> None:
        self.cut.pop(slot, None)  # (re-inserted at the end: the dict stays in deadline order)
        if len(self.cut) >= MAX_CUT:
            del self.cut[next(iter(self.cut))]
        self.cut[slot] = entry

    def _reset_survivor(self, flow: Flow, gone: TunnelLeg, out: list[Action]) -> None:
        """A layer-3 TCP flow lost one of its devices: the other gets the reset a firewall
        flushing the flow would send (in its window, from the sequence numbers followed), so
        its connection fails now rather than after minutes of retransmissions."""
        key = flow.key
        if key.protocol != IPPROTO_TCP or flow.next_seq_up is None or flow.next_seq_down is None:
            return
        assert isinstance(flow.server, RoutedLeg)
        if gone is flow.client:  # to the device, as from the client
            out.append(SendToTunnel(flow.server.tunnel, tcp_packet(
                key.src, key.sport, key.dst, key.dport, flow.next_seq_up, flow.next_seq_down,
                TCP_RST | TCP_ACK)))
        else:
            out.append(SendToTunnel(flow.client, tcp_packet(
                key.dst, key.dport, key.src, key.sport, flow.next_seq_down, flow.next_seq_up,
                TCP_RST | TCP_ACK)))

    def end_all(self, close_reason: str, now: float) -> list[Action]:
        """Every flow ends (the worker stops)."""
        out: list[Action] = []
        for flow in list(self.by_key.values()):
            self._end(flow, CloseReason.EVICTED, now, out, close_reason=close_reason)
        return out

    def namespace_lost(self, now: float) -> list[Action]:
        """nsd's namespace is gone: the flows that lived in its kernel end (an upgraded or a
        downgraded stream, "namespace_lost"); IP packets between devices, datagram sockets and a
        TCP on-ramp's relay to the host's network never touched it and go on."""
        out: list[Action] = []
        for flow in list(self.by_key.values()):
            if flow.slot is not None or isinstance(flow.server, DowngradedLeg):
                self._end(flow, CloseReason.EVICTED, now, out, close_reason="namespace_lost")
        return out

    def end(self, flow: Flow, close_reason: str, now: float) -> list[Action]:
        """End one flow (the driver's reason: its stream handler failed, say)."""
        out: list[Action] = []
        self._end(flow, CloseReason.EVICTED, now, out, close_reason=close_reason)
        return out

    def _end(self, flow: Flow, reason: CloseReason, now: float, out: list[Action], *,
             audit_start: bool = False, close_reason: str | None = None) -> None:
        if flow.ended:
            return
        flow.ended = True
        flow.deadline = 0.0
        if flow.pending:  # held (deciding, connecting) and never sent on: counted, not lost
            out.append(Count("drop", "held_at_end", len(flow.pending)))
        flow.pending = None
        self.flows.end(flow, reason)
        if reason is not CloseReason.FIN:
            self._remember_cut(flow, now, close_reason)
        if flow.slot is not None:
            self.by_slot.pop(flow.slot, None)
            self.pools[4 if len(flow.slot.address) == 4 else 6].release(flow.slot, now)
        server = flow.server
        if isinstance(server, DowngradedLeg):
            self.by_slot.pop(server.slot, None)
            self.pools[4 if len(server.slot.address) == 4 else 6].release(server.slot, now)
            answers = FlowKey(flow.key.tenant, IPPROTO_TCP, *server.device, *server.peer)
            if self.from_device.get(answers) is flow:
                del self.from_device[answers]
        elif isinstance(server, RoutedLeg):
            answers = self._answer_key(flow.key)
            if self.from_device.get(answers) is flow:
                del self.from_device[answers]
        why = close_reason or str(flow.close_reason or reason)
        # A flow refused past a limit is in a flows_refused record instead: nothing to build.
        if audit_start or flow.audited:
            fields = flow_fields(flow)
            decision = flow.decision if isinstance(flow.decision, Decision) \
                else Decision.drop("undecided")
            if audit_start:
                flow.audited = True
                out.append(Audit("flow_start", {"decision": "drop", "reason": decision.reason,
                                                "upstream": None, **fields}))
            out.append(Audit("flow_end", {
                "decision": decision.action, "reason": decision.reason, "close_reason": why,
                "packets": flow.packets, "bytes": flow.bytes, "payload_bytes": flow.payload,
                "duration": round(flow.duration(now), 6), **fields}))
        # Both FINs crossed: a stream still relaying may finish what the kernel holds.
        out.append(FlowEnded(flow, why, reason is CloseReason.FIN and close_reason is None))


def count_payload(flow: Flow, direction: int, p: Parsed) -> None:
    """Count the bytes by which this segment advances its direction's sequence space.

    Retransmissions (a tail loss probe the peer already had, say) add nothing, so the audit's
    payload bytes are what the application sent, however often TCP sent it.
    """
    if p.tcp_flags & TCP_SYN:
        if direction:
            flow.next_seq_down = (p.seq + 1) & 0xFFFFFFFF
        else:
            flow.next_seq_up = (p.seq + 1) & 0xFFFFFFFF
        return
    expected = flow.next_seq_down if direction else flow.next_seq_up
    n = p.payload_length
    if expected is None or not n:
        return
    end = (p.seq + n) & 0xFFFFFFFF
    new = (end - expected) & 0xFFFFFFFF
    if 0 < new <= n:
        if direction:
            flow.payload_down += new
            flow.next_seq_down = end
        else:
            flow.payload_up += new
            flow.next_seq_up = end
