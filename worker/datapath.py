"""The worker's data path: the driver that carries out the flow engine's actions.

The decisions about packets are :class:`ipferry.engine.core.FlowEngine`'s (pure, unit-tested);
this class owns what they need from the world: the tunnels' sends, the worker's TUN, the
upgrade listeners, the off-ramp sockets (a non-blocking connect watched by one epoll set, the
:class:`~ipferry.worker.connector.Connector`), the datagram sockets, the stream handlers' tasks,
the application's hooks, the audit log and the metrics. Every input goes to the engine with the
time, and the actions it returns are carried out in order (:meth:`DataPath.carry`).

Nothing a packet does may raise out of here (the rest of a read batch would be lost): a fault of
ours is dropped, counted (``internal_error``) and logged.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import inspect
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ipferry.engine.actions import (
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
    RelayToTunnel,
    SendDatagram,
    SendToTunnel,
    WriteTun,
)
from ipferry.engine.core import (
    PROTO_NAMES,
    UNREACHABLE,
    FlowEngine,
    addr,
    failure,
    flow_fields,
    flow_start,
    forbidden_destination,
)
from ipferry.engine.decisions import Decision, DnsDecision, DnsQueryStart, FlowEnd, TunnelContext
from ipferry.engine.flows import Flow, FlowKey, FlowTable
from ipferry.engine.legs import AcceptedLeg, DatagramLeg, DowngradedLeg, StreamLeg, TunnelLeg
from ipferry.engine.routes import RouteTable
from ipferry.runtime import fdpass
from ipferry.runtime.settings import Http
from ipferry.wire.dns import DNS_ADDRESSES, DNS_PORT
from ipferry.wire.httpmsg import plain_response
from ipferry.wire.nat import NatPool
from ipferry.wire.vnet import HEADER_SIZE as HEADER
from ipferry.wire.vnet import PLAIN, is_gso, is_partial, segment

from . import metrics
from .app import Application, RulesApplication
from .audit import AuditLog, Refusals
from .connector import Connector
from .datagram_flows import DatagramUpstream, PingNotPermitted, open_upstream
from .dns import DnsForwarder, DnsStreamInspector
from .http.pool import Dialed
from .http.session import HttpLayer, Refused
from .inspect import inspect_stream
from .relay import abort
from .streams import StreamHandler, StreamHandlers, UpgradedStream
from .tun import TunDevice
from .tunnels import Tunnel
from .views import FlowIndex, tenant_text

PING_LOG_INTERVAL = 60.0  # how often "ping sockets not permitted" (or an internal error) is logged
_LINGER_RST = struct.pack("ii", 1, 0)  # close() sends RST instead of FIN
HTTP_ONRAMP = "http"  # the on-ramp name of the HTTP layer's own upstream streams
CONNECTED = b"HTTP/1.1 200 Connection established\r\n\r\n"


class Lent:
    """An off-ramp socket lent to the HTTP layer: the flow "relays" until the borrower hands it
    back (:meth:`release`). Whoever is last closes it: the driver when the flow ends after the
    release; else the borrower, woken by a shutdown when the flow is cut under it (so that no
    fd it still waits on is closed, and reused, under it)."""

    __slots__ = ("sock", "done", "returned", "ended")

    def __init__(self, sock: socket.socket, done: asyncio.Future) -> None:
        self.sock, self.done = sock, done
        self.returned = self.ended = False

    def release(self) -> None:
        self.returned = True
        if self.ended:
            self.sock.close()
        elif not self.done.done():
            self.done.set_result(None)

    def end(self) -> None:
        self.ended = True
        if self.returned:
            self.sock.close()
            return
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # the borrower's waits wake, then it closes
        except OSError:
            pass


async def _until(lent: asyncio.Future) -> None:
    """A lent socket's flow relays until its borrower hands it back."""
    await lent


class Watch:
    """What an on-ramp that handed over a socket wants to hear of its flow's start.

    ``started`` gets (status, reason, flow fields, socket, lent): 200 once the flow relays
    (with ``raw``: the off-ramp's socket and a future the borrower resolves when done with it;
    else None, None); else 403 (refused by policy or a limit), 502 (the upstream failed) or
    504 (it did not answer). With a
    ``greeting`` (a CONNECT's 200), the client is sent it just before the relay starts, and a
    refusal is answered in HTTP before the socket is closed. ``first``: bytes for the server
    before the relay (what the client sent past its CONNECT). ``raw``: no relay and no stream
    hooks: the off-ramp's socket is lent to the watcher (the HTTP layer's upstreams: their
    requests were decided already, and it speaks HTTP on them itself)."""

    __slots__ = ("started", "greeting", "first", "raw")

    def __init__(self, started: asyncio.Future, *, greeting: bytes = b"", first: bytes = b"",
                 raw: bool = False) -> None:
        self.started = started
        self.greeting = greeting
        self.first = first
        self.raw = raw

    def refused(self, flow: Flow | None, why: str) -> tuple[int, str]:
        """The flow will not relay (``why``: its close reason): tell the watcher, and say what
        the client is answered."""
        if why.startswith("upstream_timeout"):
            status, reason = 504, "the upstream did not answer"
        elif why.startswith("upstream_"):
            status, reason = 502, f"the upstream failed ({why.removeprefix('upstream_')})"
        else:
            decision = flow.decision if flow is not None else None
            status = 403
            reason = decision.reason if isinstance(decision, Decision) and decision.reason \
                else why
        fields = flow_fields(flow) if flow is not None else {}
        if not self.started.done():
            self.started.set_result((status, reason, fields, None, None))
        return status, reason

PKT_IN = metrics.PACKETS.labels("from_tunnel")
PKT_OUT = metrics.PACKETS.labels("to_tunnel")
BYTES_IN = metrics.BYTES.labels("from_tunnel")
BYTES_OUT = metrics.BYTES.labels("to_tunnel")
PKT_TO_MESH = metrics.PACKETS.labels("to_mesh")
PKT_FROM_MESH = metrics.PACKETS.labels("from_mesh")
_FAMILIES: dict[str, Callable[..., Any]] = {
    "drop": metrics.DROPS.labels,
    "icmp_sent": metrics.ICMP_SENT.labels,
    "icmp_received": metrics.ICMP_RECEIVED.labels,
    "upstream_failure": metrics.UPSTREAM_FAILURES.labels,
    "gue_missteered": lambda _label: metrics.GUE_MISSTEERED,
    "routed": metrics.ROUTED.labels,
    "downgraded": lambda _label: metrics.FLOWS_DOWNGRADED,
    "flows_started": metrics.FLOWS_STARTED.labels,
    "flows_ended": metrics.FLOWS_ENDED.labels,
    "flows_active": metrics.FLOWS_ACTIVE.labels,
}
# A metric's child by its labels, looked up once: prometheus_client's labels() takes a lock and
# builds a tuple every call (two of them were a tenth of a new flow's cost, bench/hotpath.py).
# The labels are bounded sets (reasons, protocols, close reasons): so is this.
_CHILDREN: dict[tuple[str, ...], Any] = {}


def _child(family: str, *labels: str) -> Any:
    child = _CHILDREN.get((family, *labels))
    if child is None:
        child = _CHILDREN[(family, *labels)] = _FAMILIES[family](*labels)
    return child


KEEPALIVE = ((socket.SO_KEEPALIVE, socket.SOL_SOCKET, 1),
             (socket.TCP_KEEPIDLE, socket.IPPROTO_TCP, 600),
             (socket.TCP_KEEPINTVL, socket.IPPROTO_TCP, 60),
             (socket.TCP_KEEPCNT, socket.IPPROTO_TCP, 5))


def keepalive(sock: socket.socket) -> None:
    """TCP keepalives after 10 minutes of silence, given up after 5 more (15 minutes)."""
    for option, level, value in KEEPALIVE:
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            pass


def _mutable(packet: bytes | bytearray) -> bytearray:
    return packet if isinstance(packet, bytearray) else bytearray(packet)


class DataPath:
    def __init__(self, *, index: int, app: Application, audit: AuditLog, log: Any,
                 flows: FlowTable, pools: dict[int, NatPool], local: dict[int, bytes],
                 connect_timeout: float, workers: int = 1,
                 forward: Callable[[int, Any, bytes], None] | None = None,
                 mtu: int = 65520, audit_on_error: str = "continue",
                 refusals_interval: float = 10.0,
                 stream_handler: StreamHandler | None = None,
                 routes: RouteTable | None = None,
                 dns_upstreams: list[tuple[str, int]] | None = None,
                 http: Http | None = None) -> None:
        self.engine = FlowEngine(flows=flows, pools=pools, local=local,
                                 connect_timeout=connect_timeout, index=index, workers=workers,
                                 mtu=mtu, fail_closed=audit_on_error == "refuse", routes=routes,
                                 dns_upstreams=dns_upstreams)
        self.routes = self.engine.routes
        self.nsd: fdpass.AsyncChannel | None = None  # the worker's link: downgraded sockets
        # (tenant, name, addresses): tell the other workers what the resolver answered
        self.share_names: Callable[[str, str, list[tuple[str, int]]], None] | None = None
        self.index = index
        self.forward = forward  # (owner, tunnel, packet): hands a packet to its flow's owner
        self.app = app
        self.audit = audit
        self.log = log
        self.flows = flows
        # The application's on_stream_start picks splice or an inspector, stream by stream
        # (read at each stream: a reload's new application decides the streams after it).
        http = http if http is not None else Http()
        self.http = HttpLayer(http, get_app=lambda: self.app, audit=audit, log=log,
                              dial=self.dial, hand_connect=self.hand_connect,
                              forbidden=self.forbidden_upstream)
        self.stream_handler = stream_handler if stream_handler is not None \
            else StreamHandlers(lambda: self.app, log, audit=audit, http=self.http,
                                tls_ports=http.tls_ports, hello_timeout=http.client_hello_timeout)
        # Accepted sockets whose on-ramp waits to hear how their flow starts (a CONNECT's
        # answer, the HTTP layer's dialed upstreams), until it relays or ends.
        self._watched: dict[socket.socket, Watch] = {}
        self._dial_serial = 0
        self._lent: dict[Flow, Lent] = {}  # flows whose off-ramp socket the HTTP layer borrows
        self.entries: dict[FlowKey, Flow] = self.engine.by_key
        self.flow_index = FlowIndex()  # live flows in start order: the admin API's pages
        self.connector: Connector[Flow] = Connector(self._offramp_ready)
        self.refusals = Refusals(audit, refusals_interval)
        self.active: dict[str, int] = {}  # flows by protocol, for the gauge
        self.streams: set[asyncio.Task] = set()  # stream handlers, some outliving their flow
        self.hook_tasks: set[asyncio.Task] = set()  # async hooks in progress (kept: drained)
        self.downgrades: set[asyncio.Task] = set()  # sockets asked of nsd, not yet received
        self.tun: TunDevice | None = None
        self._loop = asyncio.get_running_loop()
        self._listeners: list[socket.socket] = []
        self._ping_logged = -PING_LOG_INTERVAL
        self._error_logged = -PING_LOG_INTERVAL
        self._carry: dict[type, Callable[[Any], None]] = {
            RelayToTunnel: self._relay,
            Forward: self._forward, DecideFlow: self._decide, AuditFlowStart: self._audit_start,
            Audit: self._audit, ConnectOfframp: self._connect, OpenDatagram: self._open_datagram,
            RelayStreams: self._relay_streams, CloseAccepted: self._close_accepted,
            SendDatagram: self._send_datagram, FlowStarted: self._started,
            FlowEnded: self._ended, Count: self._count, RefusedPastLimit: self._refused,
            Log: self._log}
        if forward is not None:  # (one call a forwarded packet: every ACK of a mesh download)
            self._carry[Forward] = lambda a: forward(*a)

    @property
    def pools(self) -> dict[int, NatPool]:
        return self.engine.pools

    @pools.setter
    def pools(self, pools: dict[int, NatPool]) -> None:
        self.engine.pools = pools  # a new namespace: nothing of the old one is in use

    @property
    def own_endpoints(self) -> set[tuple[bytes | None, int]]:
        return self.engine.own_endpoints

    # -- carrying out --------------------------------------------------------------------------

    def carry(self, actions: Iterable[Action]) -> None:
        """Carry out the engine's actions in order (an answer may bring more: carried at once)."""
        handlers = self._carry
        tunnel: TunnelLeg
        packet: bytes | bytearray
        header: bytes | None
        for action in actions:
            kind = type(action)
            # The two actions of every packet are carried here, without a call of their own.
            if kind is WriteTun:  # into the namespace's kernel
                tun = self.tun
                packet, header = action  # type: ignore[misc,assignment]
                if tun is None:
                    continue
                if header is None:
                    tun.write(packet, PLAIN)
                elif tun.vnet:
                    tun.write(packet, header)
                else:  # a TUN without offload (namespace.offload = false): plain MTU-sized packets
                    for seg in segment(_mutable(packet), header):
                        tun.write(seg)
            elif kind is SendToTunnel:
                # In the framing the tunnel speaks: header and all on a vnet tunnel, else plain,
                # whole packets.
                tunnel, packet, header = action  # type: ignore[misc,assignment]
                if tunnel.vnet:
                    packet = (header or PLAIN) + packet
                elif header is not None and (is_gso(header) or is_partial(header)):
                    # The slow path: cut the superframe into MSS-sized packets, sum every checksum.
                    for seg in segment(_mutable(packet), header):
                        self.relay_to_tunnel(tunnel, seg)
                    continue
                # (relay_to_tunnel, inlined)
                if tunnel.local:
                    PKT_OUT.inc()
                    BYTES_OUT.inc(len(packet) - (HEADER if tunnel.vnet else 0))
                else:
                    PKT_TO_MESH.inc()
                tunnel.send(packet)
            else:
                handlers[kind](action)

    def _relay(self, a: RelayToTunnel) -> None:
        self.relay_to_tunnel(a.tunnel, a.data)

    def relay_to_tunnel(self, tunnel: TunnelLeg, data: bytes | bytearray) -> None:
        """Send a datagram already in ``tunnel``'s framing (e.g. a reply from the mesh)."""
        if tunnel.local:
            PKT_OUT.inc()
            BYTES_OUT.inc(len(data) - (HEADER if tunnel.vnet else 0))
        else:
            PKT_TO_MESH.inc()  # back to the worker that holds the tunnel
        tunnel.send(data)

    def _forward(self, a: Forward) -> None:
        assert self.forward is not None
        self.forward(a.owner, a.tunnel, a.data)

    def _count(self, a: Count) -> None:
        _child(a.counter, a.label).inc(a.n)

    def _refused(self, a: RefusedPastLimit) -> None:
        self.refusals.add(a.tenant, a.reason)

    def _log(self, a: Log) -> None:
        getattr(self.log, a.level)(a.event, **a.fields)

    def _audit(self, a: Audit) -> None:
        self.audit.record(a.event, **a.fields)

    def _audit_start(self, a: AuditFlowStart) -> None:
        ok = self.audit.record("flow_start", **a.fields)
        self.carry(self.engine.audit_written(a.flow, ok, time.monotonic()))

    def _internal_error(self, where: str) -> None:
        metrics.DROPS.labels("internal_error").inc()
        now = time.monotonic()
        if now - self._error_logged >= PING_LOG_INTERVAL:
            self._error_logged = now
            self.log.error("internal_error", where=where, exc_info=True)

    # -- inputs: packets -----------------------------------------------------------------------

    def on_tunnel_packet(self, tunnel: Tunnel, data: bytes) -> None:
        """A datagram of ``tunnel``: the packet (after a virtio-net header on a vnet tunnel)."""
        try:
            if tunnel.local:
                PKT_IN.inc()
                BYTES_IN.inc(len(data) - (HEADER if tunnel.vnet else 0))
            else:
                PKT_FROM_MESH.inc()
            self.carry(self.engine.tunnel_packet(tunnel, data, time.monotonic()))
        except Exception:
            self._internal_error("tunnel_packet")

    def on_tun_packet(self, data: bytes) -> None:
        try:
            self.carry(self.engine.tun_packet(data, time.monotonic()))
        except Exception:
            self._internal_error("tun_packet")

    def reset_client(self, tunnel: Tunnel, data: bytes) -> None:
        """Answer a tunnel packet with a TCP reset (unless it is not TCP or is a reset itself)."""
        self.carry(self.engine.reset(tunnel, data))

    # -- equipment -----------------------------------------------------------------------------

    def detach(self) -> None:
        """Let go of the TUN and upgrade listeners (nsd is rebuilding the namespace)."""
        self.carry(self.engine.namespace_lost(time.monotonic()))
        for listener in self._listeners:
            self._loop.remove_reader(listener.fileno())
        self._listeners = []
        self.tun = None

    def attach(self, tun: TunDevice, *upgrade: socket.socket) -> None:
        """Use this TUN and these upgrade listeners (again after nsd rebuilt the namespace)."""
        self.tun = tun
        self.engine.tun_vnet = tun.vnet
        tun.on_packet = self.on_tun_packet
        for listener in upgrade:
            listener.setblocking(False)
            self._loop.add_reader(listener.fileno(), self._accept_upgraded, listener)
            self._listeners.append(listener)

    # -- the application -----------------------------------------------------------------------

    def _decide(self, a: DecideFlow) -> None:
        flow = a.flow
        try:
            decision = self.app.on_flow_start(flow_start(flow))
        except Exception as exc:
            self._hook_failed(flow, exc)
            return
        if type(decision) is not Decision and inspect.isawaitable(decision):
            task = self._loop.create_task(self._decide_later(flow, decision))
            self.hook_tasks.add(task)
            task.add_done_callback(self.hook_tasks.discard)
            return
        self._decided(flow, decision)

    def _decided(self, flow: Flow, decision: object) -> None:
        if not isinstance(decision, Decision):
            self._hook_failed(flow, TypeError(f"not a Decision: {decision!r}"))
            return
        self.carry(self.engine.decided(flow, decision, time.monotonic()))

    async def _decide_later(self, flow: Flow, pending: Awaitable[object]) -> None:
        try:
            decision = await pending
        except Exception as exc:
            if not flow.ended:
                self._hook_failed(flow, exc)
            return
        try:
            self._decided(flow, decision)
        except Exception:
            self._internal_error("decided")
            self.carry(self.engine.end(flow, "internal_error", time.monotonic()))

    def _hook_failed(self, flow: Flow, exc: Exception) -> None:
        self.log.warning("flow_hook_failed", error=repr(exc), **flow_fields(flow))
        self.carry(self.engine.hook_failed(flow, repr(exc), time.monotonic()))

    # -- the server leg: a stream (connect before accept) --------------------------------------

    def _connect(self, a: ConnectOfframp) -> None:
        """Start the off-ramp's connect. No task per flow: a non-blocking connect watched by
        :attr:`connector`; the engine gives up at its deadline (see ``FlowEngine.timer``), so a
        SYN flood towards a silent upstream costs a socket and a few bytes per flow."""
        flow = a.flow
        server = flow.server
        assert isinstance(server, StreamLeg)
        self._nat_gauge()
        if isinstance(server, DowngradedLeg):
            task = self._loop.create_task(self._connect_downgraded(flow, server))
            self.downgrades.add(task)
            task.add_done_callback(self.downgrades.discard)
            return
        upstream = server.upstream
        family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
        try:
            up = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:  # EMFILE, ENOBUFS: a limit of ours, not the network's
            self.carry(self.engine.offramp_failed(flow, "error", exc.errno or 0,
                                                  time.monotonic()))
            return
        if family == socket.AF_INET6:  # never reach IPv4 through a mapped address
            up.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        server.handle = up
        try:
            err = up.connect_ex(upstream)
        except OSError as exc:  # an upstream the kernel cannot even try (a bad address)
            err = exc.errno or errno.EINVAL
        if err in (errno.EINPROGRESS, 0):
            self.connector.watch(up.fileno(), flow)
        else:
            self.carry(self.engine.offramp_failed(flow, failure(err), err, time.monotonic()))

    async def _connect_downgraded(self, flow: Flow, server: DowngradedLeg) -> None:
        """Ask nsd for a socket connecting, inside the namespace, to the leg's NAT slot: its SYN
        comes out of our TUN and goes into the device's tunnel (see the engine). Then watch it
        like any off-ramp's connect: connected once the device answered."""
        nsd = self.nsd
        slot = server.slot
        try:
            if nsd is None:
                raise fdpass.ChannelClosed("no link to nsd")
            reply = await nsd.request("connect", {"address": addr(slot.address),
                                                  "port": slot.port}, timeout=5)
        except (fdpass.ChannelClosed, TimeoutError) as exc:
            if not flow.ended:
                self.log.warning("downgrade_failed", error=str(exc) or "nsd did not answer",
                                 **flow_fields(flow))
                self.carry(self.engine.offramp_failed(flow, "error", errno.EIO, time.monotonic()))
            return
        if reply.type != "socket":
            reply.close_fds()
            if not flow.ended:
                self.log.warning("downgrade_failed", error=reply.get("error"), **flow_fields(flow))
                self.carry(self.engine.offramp_failed(flow, "error", errno.EIO, time.monotonic()))
            return
        sock = socket.socket(fileno=reply.take_fd("socket"))
        reply.close_fds()
        if flow.ended:  # given up (its deadline, its client) while nsd made it
            abort(sock)
            sock.close()
            return
        sock.setblocking(False)
        server.handle = sock
        self.connector.watch(sock.fileno(), flow)

    def _offramp_ready(self, flow: Flow) -> None:
        """The off-ramp's connect finished (the connector says): connected, or failed."""
        try:
            server = flow.server
            assert isinstance(server, StreamLeg) and isinstance(server.handle, socket.socket)
            err = server.handle.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            now = time.monotonic()
            if err:
                self.carry(self.engine.offramp_failed(flow, failure(err), err, now))
                return
            server.handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.carry(self.engine.offramp_connected(flow, now))
        except Exception:
            self._internal_error("offramp_connected")
            self.carry(self.engine.end(flow, "internal_error", time.monotonic()))

    def _accept_upgraded(self, listener: socket.socket) -> None:
        for _ in range(64):
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.log.warning("upgrade_accept_failed", error=exc.strerror)
                return
            family = socket.AF_INET6 if ":" in peer[0] else socket.AF_INET  # (.family is slow)
            flow = self.engine.stream_for(socket.inet_pton(family, peer[0]), peer[1])
            if flow is None:
                metrics.DROPS.labels("upgrade_no_flow").inc()
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                conn.close()
                continue
            conn.setblocking(False)
            server = flow.server
            assert isinstance(server, StreamLeg) and isinstance(server.handle, socket.socket)
            task = self._loop.create_task(self._run_stream(flow, conn, server.handle))
            flow.stream = UpgradedStream(conn, task)
            self.streams.add(task)
            task.add_done_callback(self.streams.discard)
            # Sockets close only once the handler is done: a pump being cancelled still
            # unregisters its fds, which must not have been closed (and reused) under it.
            task.add_done_callback(functools.partial(self._close_sockets, flow))

    # -- accepted clients (TCP on-ramps) -------------------------------------------------------

    def on_stream(self, tenant: str, sock: socket.socket, client: tuple[str, int],
                  upstream: tuple[str, int], onramp: str, watch: Watch | None = None) -> None:
        """A ``kind = "tcp"`` on-ramp accepted ``sock`` (ours from now on) from ``client``, for
        ``upstream``: a flow, decided, audited and off-ramped like a tunnel's. ``watch`` hears
        how the flow starts (see :class:`Watch`)."""
        if watch is not None:
            self._watched[sock] = watch
        try:
            src = socket.inet_pton(socket.AF_INET6 if ":" in client[0] else socket.AF_INET,
                                   client[0])
            dst = socket.inet_pton(socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET,
                                   upstream[0])
            sock.setblocking(False)
            self.carry(self.engine.stream_accepted(
                tenant, TunnelContext(tenant, {"onramp": onramp}), (src, client[1]),
                (dst, upstream[1]), sock, onramp, time.monotonic()))
        except Exception:
            self._internal_error("stream_accepted")
            self._refuse_accepted(sock, None, "internal_error")

    def _close_accepted(self, a: CloseAccepted) -> None:
        if isinstance(a.handle, socket.socket):
            self._refuse_accepted(a.handle, None, "refused")

    def _refuse_accepted(self, sock: socket.socket, flow: Flow | None, why: str) -> None:
        """An accepted client whose flow will not relay: reset, or, when its on-ramp watches
        (a CONNECT), answered in HTTP (403, 502, 504) and closed."""
        watch = self._watched.pop(sock, None)
        if watch is None:
            abort(sock)
            sock.close()
            return
        status, reason = watch.refused(flow, why)
        if watch.greeting:
            try:
                sock.send(plain_response(status, reason))  # short: a fresh socket takes it
            except OSError:
                pass
        sock.close()

    def forbidden_upstream(self, upstream: tuple[str, int]) -> bool:
        """An address a client may not name as a proxy's destination, as no tunnel's flow may
        go there: the daemon's host by loopback (its admin API), "this host", IPv6 spellings of
        IPv4 addresses, and the daemon's own TCP on-ramps on any address."""
        try:
            dst = socket.inet_pton(socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET,
                                   upstream[0])
        except OSError:
            return True
        return forbidden_destination(dst) or (dst, upstream[1]) in self.engine.own_tcp_endpoints

    async def dial(self, tenant: str, client: tuple[str, int],
                   upstream: tuple[str, int]) -> Dialed:
        """A stream to ``upstream`` as a flow of ``tenant`` from ``client``'s address: decided
        by the flow rules and hooks, audited, downgraded into a device's tunnel when the address
        is one. Once the off-ramp is connected, its socket is lent to the caller (no relay in
        between: the HTTP layer speaks on it) until ``release`` is called, when the flow ends
        as a relayed one does (a flow cut short resets it under the caller). Raises
        :class:`~ipferry.worker.http.session.Refused` (403: refused by policy or a limit;
        502/504: the upstream failed)."""
        # The flow's client leg is a socket nobody speaks on: an accepted flow has one.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.close()
        theirs.setblocking(False)
        started: asyncio.Future[tuple] = self._loop.create_future()
        port = self._dial_port(tenant, client[0], upstream)
        self.on_stream(tenant, theirs, (client[0], port), upstream, HTTP_ONRAMP,
                       Watch(started, raw=True))
        status, reason, fields, sock, lent = await started
        if status != 200:
            raise Refused(status, reason)
        return Dialed(sock, fields, lent.release)

    def _dial_port(self, tenant: str, client: str, upstream: tuple[str, int]) -> int:
        """A source port no flow of the tenant from ``client`` to ``upstream`` has: dialed
        streams are flows keyed like any other, and several may go from one client."""
        family = socket.AF_INET6 if ":" in client else socket.AF_INET
        src = socket.inet_pton(family, client)
        dst = socket.inet_pton(socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET,
                               upstream[0])
        for _ in range(64):
            self._dial_serial = self._dial_serial % 64511 + 1
            port = 1024 + self._dial_serial
            if FlowKey(tenant, 6, src, port, dst, upstream[1]) not in self.entries:
                return port
        return port  # a duplicate is refused by the engine: the request gets its 403

    async def hand_connect(self, served: Any, tenant: str, sock: socket.socket,
                           upstream: tuple[str, int], first: bytes) -> tuple[int, dict | None]:
        """An HTTP on-ramp's CONNECT: ``sock`` (the client's, ours from now on) goes on as a TCP
        flow to ``upstream``, decided and relayed as any on-ramp's stream, its 200 sent once
        the off-ramp is connected (a refusal is answered 403, a failed upstream 502/504). The
        status the client got, and the flow's fields."""
        started: asyncio.Future[tuple] = self._loop.create_future()
        self.on_stream(tenant, sock, served.client, upstream, served.onramp,
                       Watch(started, greeting=CONNECTED, first=first))
        status, _reason, fields, _sock, _lent = await started
        return status, fields

    def _relay_streams(self, a: RelayStreams) -> None:
        flow = a.flow
        client, server = flow.client, flow.server
        assert isinstance(client, AcceptedLeg) and isinstance(client.handle, socket.socket)
        assert isinstance(server, StreamLeg) and isinstance(server.handle, socket.socket)
        conn, client.handle = client.handle, None
        watch = self._watched.pop(conn, None)
        raw = False
        if watch is not None:
            raw = watch.raw
            try:
                if watch.greeting:
                    conn.send(watch.greeting)  # a fresh socket's buffer takes these few bytes
                if watch.first:
                    server.handle.send(watch.first)  # what the client sent past its request
            except OSError:
                pass  # the peer is gone already: the relay finds out and ends
        lent: Lent | None = None
        if raw:  # the HTTP layer's upstream: its socket is lent, not relayed
            lent = self._lent[flow] = Lent(server.handle, self._loop.create_future())
        if watch is not None and not watch.started.done():
            watch.started.set_result((200, "", flow_fields(flow), server.handle, lent))
        for sock in (conn, server.handle):
            # No packet of this flow is seen (it never idles out): a peer that vanishes without
            # a word is found by the kernel's keepalives, which end the relay.
            keepalive(sock)
        task = self._loop.create_task(self._run_stream(flow, conn, server.handle)
                                      if lent is None else _until(lent.done))
        flow.stream = UpgradedStream(conn, task)
        self.streams.add(task)
        task.add_done_callback(self.streams.discard)
        task.add_done_callback(functools.partial(self._close_sockets, flow))
        task.add_done_callback(functools.partial(self._stream_finished, flow))

    def _stream_finished(self, flow: Flow, _done: object = None) -> None:
        if not flow.ended:
            self.carry(self.engine.stream_finished(flow, time.monotonic()))

    async def _run_stream(self, flow: Flow, conn: socket.socket, up: socket.socket) -> None:
        key = flow.key
        if key.dst in DNS_ADDRESSES and key.dport == DNS_PORT:
            # DNS over TCP to the daemon's resolver: the same per-query policy and audit.
            src = addr(key.src)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await inspect_stream(conn, up, DnsStreamInspector(
                start=lambda q: DnsQueryStart(key.tenant, src, key.sport, q.name, q.qtype_name,
                                              flow.client.context),
                decide=lambda q: self._dns_hook()(q), record=self.audit.record,
                learned=self.learned), log=self.log)
        else:
            await self.stream_handler(flow, conn, up)
        self._close_sockets(flow)

    def _close_sockets(self, flow: Flow, _done: object = None) -> None:
        """(``_done``: the task, when called as its done callback.)"""
        server = flow.server
        lent = self._lent.pop(flow, None)
        if lent is not None and isinstance(server, StreamLeg):
            server.handle = None  # the borrower's until it hands it back (see Lent)
            lent.end()
        if isinstance(server, StreamLeg) and isinstance(server.handle, socket.socket):
            if not server.connected:
                self.connector.forget(server.handle.fileno())
            server.handle.close()
            server.handle = None
        stream = flow.stream
        if isinstance(stream, UpgradedStream) and stream.conn is not None:
            stream.conn.close()
            stream.conn = None

    # -- the server leg: datagrams -------------------------------------------------------------

    def _open_datagram(self, a: OpenDatagram) -> None:
        flow = a.flow
        server = flow.server
        assert isinstance(server, DatagramLeg)
        now = time.monotonic()
        try:
            sock = open_upstream(server.protocol, server.upstream)
        except PingNotPermitted as exc:
            if now - self._ping_logged >= PING_LOG_INTERVAL:
                self._ping_logged = now
                self.log.error("ping_not_permitted", error=exc.strerror,
                               fix="allow the daemon's group to open ICMP datagram sockets: "
                                   "sysctl -w net.ipv4.ping_group_range='0 2147483647' in the "
                                   "daemon's network namespace")
            self.carry(self.engine.datagram_failed(flow, "icmp_not_permitted", "", now))
            return
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EADDRNOTAVAIL):
                # No local port left for one more connected socket: a limit, not the network.
                self.carry(self.engine.datagram_failed(flow, "local_ports_exhausted", "", now))
                return
            kind = UNREACHABLE.get(exc.errno or 0, "host")
            self.carry(self.engine.datagram_failed(flow, "unreachable", kind, now))
            return
        on_reply = functools.partial(self._upstream_reply, flow)
        on_error = functools.partial(self._upstream_error, flow)
        key = flow.key
        if key.dst in DNS_ADDRESSES and key.dport == DNS_PORT and server.protocol == "udp":
            # The daemon's resolver: each query decided, forwarded and audited on its own.
            src = addr(key.src)
            server.handle = DnsForwarder(
                sock, start=lambda q: DnsQueryStart(key.tenant, src, key.sport, q.name,
                                                    q.qtype_name, flow.client.context),
                decide=lambda q: self._dns_hook()(q), record=self.audit.record,
                on_reply=on_reply, on_error=on_error, log=self.log, learned=self.learned,
                done=lambda: self._dns_answered(flow))
        else:
            server.handle = DatagramUpstream(sock, on_reply, on_error)
        self.carry(self.engine.datagram_opened(flow, now))

    def _dns_answered(self, flow: Flow) -> None:
        """Every query of a flow to the resolver is answered: the flow ends (a stub sends its
        next lookup from a new port anyway), so lookups do not hold the tenant's datagram
        flows for the two minutes of a replied UDP flow."""
        if not flow.ended:
            self.carry(self.engine.end(flow, "dns_answered", time.monotonic()))

    def learned(self, tenant: str, name: str, addresses: list[tuple[str, int]]) -> None:
        """The resolver answered ``name`` with ``addresses`` (and TTLs) for ``tenant``: flows
        to them carry the name, here and (told over the mesh) in every other worker."""
        self.remember_names(tenant, name, addresses)
        if self.share_names is not None:
            self.share_names(tenant, name, addresses)

    def remember_names(self, tenant: str, name: str, addresses: list[tuple[str, int]]) -> None:
        packed = []
        for address, ttl in addresses[:64]:
            try:
                packed.append((socket.inet_pton(socket.AF_INET6 if ":" in address
                                                else socket.AF_INET, address), float(ttl)))
            except (OSError, TypeError, ValueError, OverflowError):
                continue
        self.engine.names.add(tenant, name, packed, time.monotonic())

    def _dns_hook(self) -> Callable[[DnsQueryStart], Any]:
        """The application's on_dns_query (read at each query: a reload's new one decides);
        an application without one lets every query go."""
        hook = getattr(self.app, "on_dns_query", None)
        return hook if hook is not None else (lambda _q: DnsDecision.allow("no on_dns_query"))

    def _send_datagram(self, a: SendDatagram) -> None:
        handle = a.flow.server.handle  # type: ignore[union-attr]
        assert isinstance(handle, DatagramUpstream | DnsForwarder)
        handle.send(a.payload)

    def _upstream_reply(self, flow: Flow, data: bytes) -> None:
        try:
            self.carry(self.engine.upstream_reply(flow, data, time.monotonic()))
        except Exception:
            self._internal_error("upstream_reply")

    def _upstream_error(self, flow: Flow, kind: str) -> None:
        try:
            self.carry(self.engine.upstream_error(flow, kind, time.monotonic()))
        except Exception:
            self._internal_error("upstream_error")

    # -- flows start and end -------------------------------------------------------------------

    def _started(self, a: FlowStarted) -> None:
        self.flow_index.add(a.flow)
        protocol = PROTO_NAMES.get(a.flow.key.protocol, "other")
        _child("flows_started", protocol).inc()
        self._active(protocol, +1)

    def _ended(self, a: FlowEnded) -> None:
        flow = a.flow
        self.flow_index.discard(flow)
        client = flow.client
        if isinstance(client, AcceptedLeg) and isinstance(client.handle, socket.socket):
            # Refused before its relay started: the client sees a reset (or its watcher's
            # answer: a CONNECT's 403 or 502).
            self._refuse_accepted(client.handle, flow, a.why)
            client.handle = None
        server = flow.server
        if isinstance(server, DatagramLeg):
            if isinstance(server.handle, DatagramUpstream | DnsForwarder):
                server.handle.close()
        elif isinstance(server, StreamLeg):
            self._nat_gauge()
            stream = flow.stream
            if isinstance(stream, UpgradedStream) and not stream.task.done():
                if not a.graceful:
                    # Cut short: both ends see a reset, never a clean FIN.
                    abort(*(s for s in (stream.conn, server.handle)
                            if isinstance(s, socket.socket)))
                    stream.task.cancel()
                # else both FINs crossed, but the kernel may still hold data the off-ramp has
                # not read: the handler finishes on its own (its done-callback closes them).
            else:
                self._close_sockets(flow)
        elif flow.slot is not None:
            self._nat_gauge()
        protocol = PROTO_NAMES.get(flow.key.protocol, "other")
        _child("flows_ended", protocol, a.why).inc()
        self._active(protocol, -1)
        hook = self.app.on_flow_end
        if getattr(hook, "__func__", None) is RulesApplication.on_flow_end:
            return  # the default application does nothing with it: build nothing
        decision = flow.decision if isinstance(flow.decision, Decision) \
            else Decision.drop("undecided")
        now = time.monotonic()
        end = FlowEnd(flow_start(flow), decision, (flow.packets_up, flow.packets_down),
                      (flow.bytes_up, flow.bytes_down), (flow.payload_up, flow.payload_down),
                      flow.duration(now), a.why)
        try:
            result = hook(end)
        except Exception as exc:
            self.log.warning("flow_end_hook_failed", error=repr(exc))
            return
        # A task only for an async hook (a mass end of flows is many).
        if result is not None and inspect.isawaitable(result):
            task = self._loop.create_task(self._flow_end_hook(result))
            self.hook_tasks.add(task)
            task.add_done_callback(self.hook_tasks.discard)

    async def _flow_end_hook(self, pending: Awaitable[object]) -> None:
        try:
            await pending
        except Exception as exc:
            self.log.warning("flow_end_hook_failed", error=repr(exc))

    def _active(self, protocol: str, delta: int) -> None:
        self.active[protocol] = n = self.active.get(protocol, 0) + delta
        _child("flows_active", protocol).set(n)

    def _nat_gauge(self) -> None:
        metrics.NAT_SLOTS.set(sum(pool.in_use for pool in self.engine.pools.values()))

    # -- time, tunnels, shutdown ---------------------------------------------------------------

    def expire(self) -> None:
        """Once a second: the engine's timer (connects given up, idle flows ended), and the
        refusals' summary when due."""
        self.carry(self.engine.timer(time.monotonic()))
        self.http.sweep()
        if self.refusals.due(time.time()):
            self.refusals.flush()

    def close_tunnel(self, tunnel: Tunnel) -> None:
        self.carry(self.engine.close_tunnel(tunnel, time.monotonic()))

    async def shutdown(self, drain: float) -> None:
        """End every flow (the application hears of each), wait up to ``drain`` seconds for the
        hooks in progress, then cancel what is left (an undecided flow is already ended)."""
        self.carry(self.engine.end_all("shutdown", time.monotonic()))
        self.http.close()  # the idle upstream connections (their flows ended just now)
        if self.hook_tasks:
            await asyncio.wait(self.hook_tasks, timeout=drain)
        for task in list(self.hook_tasks):
            task.cancel()
        self.refusals.flush()

    # -- views ---------------------------------------------------------------------------------

    def flow_row(self, flow: Flow) -> dict:
        """A flow as ``/api/flows`` shows it: bounded (a tenant is short, see views.tenant_text),
        so that a page of 200 fits one control message."""
        return {**flow_fields(flow), "tenant": tenant_text(flow.key.tenant),
                "state": str(flow.state),
                "decision": flow.decision.action if isinstance(flow.decision, Decision) else None,
                "slot": str(flow.slot) if flow.slot else None, "packets": flow.packets,
                "payload_bytes": flow.payload,
                "age": round(flow.duration(time.monotonic()), 3),
                "worker": self.index, "seq": flow.seq}
