"""A worker: ``python -m ipferry.worker --index I --control-fd N --parent-pid P``.

Protocol with the supervisor on the control channel:

- supervisor -> ``equip`` {onramps, block, settings}: fds ``onramp:<kind>:<name>`` (each on-ramp's:
  a connected tunnel listener, this worker's socket of a GUE on-ramp's group; see
  :mod:`ipferry.worker.onramps`), ``tun``, ``upgrade4``, ``upgrade6``, ``nsd`` and
  ``mesh:<peer>`` for every other live worker. Sent again after nsd was replaced: the worker
  then swaps its TUN, listeners and nsd link, keeping the rest.
- worker -> ``ready`` once equipped and nsd answered a ping on the worker's own link.
- supervisor -> ``mesh_peer`` {peer}: fd ``mesh:<peer>``, a replaced worker's new link.
- supervisor -> ``metrics`` {snapshot, start} -> worker replies with ``metrics`` {families,
  snapshot, next}: a part of at most ``views.REPLY_BUDGET`` bytes; ``next`` (the ``start`` of the
  next part, with the same ``snapshot``) until the last part, where it is null.
- supervisor -> ``mesh_check`` -> worker pings each peer over the mesh, replies ``mesh`` {peers:
  {peer index: the index that answered, or null}}.
- supervisor -> ``prepare`` {settings} -> ``prepared``, or ``error`` {error}: a reload's first
  step; the worker builds the application of the new settings and keeps both aside.
- supervisor -> ``commit`` {log_level}: switch to what was prepared (if anything) and to the log
  level; ``abort``: forget what was prepared (another worker could not build it).
- supervisor -> ``flows`` {tenant, op, ...}: ``op`` = ``count`` {after, epoch} -> {total,
  after: flows after that cursor, epoch}; ``slice`` {start, limit} or ``after`` {after, epoch,
  limit} -> {flows, epoch, cut}: at most ``limit`` rows (200) in flow start order, fewer when
  ``cut`` (out of room: ask again from the last one). See ``views.FlowIndex``.
- supervisor -> ``tunnels`` {snapshot, start} -> ``tunnels`` {tunnels, snapshot, next}, in parts
  as ``metrics``.
- worker -> ``claim_routes`` {tunnel, tenant, prefixes, vnet} -> ``routes_claimed`` or ``error``
  {error}: a tunnel's routes, claimed before it opens; ``release_routes`` {tunnel} once it closed.
- supervisor -> ``routes`` {add, remove}: routes of tenants' private networks, every worker's
  (``equip`` carries every live one as ``routes``). See :mod:`ipferry.worker.routing`.
- supervisor -> ``stop``: drain and exit 0.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import ipaddress
import os
import resource
import socket
import sys

from ipferry.engine.flows import FlowTable, Timeouts
from ipferry.engine.routes import RouteTable
from ipferry.runtime import child, fdnames, fdpass, logs
from ipferry.runtime.settings import WorkerSettings
from ipferry.wire.nat import NatPool

from . import metrics, views
from .app import Application, Rule, TunnelContext, call_hook, load_application
from .attached import AttachedTunnel, check_tun
from .audit import AuditLog
from .datapath import PKT_FROM_MESH, PKT_TO_MESH, DataPath
from .mesh import PACKET, REPLY, MeshLink, RemoteTunnel
from .onramps import Onramp, OnrampClass, OnrampRefused, OnrampUnusable, Wiring, resolve
from .routing import DeviceRoutes
from .tun import TunDevice
from .tunnels import Tunnel

EXPIRE_INTERVAL = 1.0
DEFAULT_MAX_FLOWS = 100_000
TRIM_AFTER = 5_000  # flows gone since the high-water mark before memory is handed back
FDS_PER_FLOW = 6  # a relayed TCP flow: the upgraded and the off-ramp socket, two splice pipes
FD_RESERVE = 256  # listeners, TUN, control and mesh links, tunnels
HOOK_DRAIN = 2.0  # at stop, how long on_flow_end calls may still take


def build_application(settings: WorkerSettings) -> Application:
    rules = [Rule(r.action, r.tenant, r.cidr, r.ports, r.protocol, r.upstream, r.name,
                  layer=r.layer, domain=r.domain, host=r.host, path=r.path, method=r.method,
                  sni=r.sni)
             for r in settings.rules]
    return load_application(settings.app.cls, rules=rules,
                            default_action=settings.app.default_action)


def tcp_endpoints(endpoints) -> set[tuple[bytes, int]]:
    """A TCP on-ramp's (address, port)s, a wildcard address as every address of the host."""
    out: set[tuple[bytes, int]] = set()
    for address, port in endpoints:
        if address is not None:
            out.add((address, port))
            continue
        from pyroute2 import IPRoute  # (only for a wildcard on-ramp)
        with IPRoute() as ipr:
            for msg in ipr.get_addr():
                local = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if local:
                    out.add((ipaddress.ip_address(local.partition("%")[0]).packed, port))
    return out


def release_memory() -> None:
    """Collect cycles, then return free heap pages to the system (glibc's malloc_trim)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _send_context(send, type_: str, body: dict, tunnel) -> bool:
    """Send a message carrying ``tunnel``'s context (``body["extra"]``). An application's context
    that is no JSON (a loop, too deep, too large) crosses made strict and bounded, rather than
    the message being lost."""
    try:
        return send(type_, body)
    except (ValueError, RecursionError, fdpass.ProtocolError):
        body["extra"] = views.bounded_context(tunnel.context.extra)[0] or {}
        return send(type_, body)


def _send_fd(link: MeshLink, type_: str, body: dict, *, fd: int) -> bool:
    return link.send_fd(type_, body, "queue", fd)


class Worker:
    def __init__(self, index: int, control: socket.socket, log) -> None:
        self.index = index
        self.log = log
        self.control = fdpass.AsyncChannel(control, "supervisor")
        self.onramp_socks: dict[str, tuple[OnrampClass, socket.socket]] = {}  # by on-ramp name
        self.onramps: dict[str, Onramp] = {}  # those served (made once the data path is)
        self.tun: TunDevice | None = None
        self.upgrade: dict[str, socket.socket] = {}
        self.nsd: fdpass.AsyncChannel | None = None
        self.mesh: dict[int, MeshLink] = {}
        # (origin, id): another worker's tunnel, or our queue of it (a TUN its client passed)
        self.remote_tunnels: dict[tuple[int, int], RemoteTunnel | AttachedTunnel] = {}
        # Queues of TUNs clients passed, ours and the ones other workers gave us, by device
        self.queue_tunnels: dict[tuple[int, int], AttachedTunnel] = {}
        self.datapath: DataPath | None = None
        self.routes: DeviceRoutes | None = None  # made with the data path
        self.app: Application  # made by configure(), at the first equip
        self.prepared: tuple[WorkerSettings, Application] | None = None  # a reload's, till commit
        self.audit: AuditLog | None = None
        self.stopping = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.snapshots = views.Snapshots()  # tunnels and metrics, handed out in parts

    @property
    def dp(self) -> DataPath:
        """The data path, for what runs only once equip has made it (its callbacks, the tasks
        and on-ramps started after it)."""
        assert self.datapath is not None, "no data path before equip"
        return self.datapath

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def run(self) -> None:
        while (msg := await self.control.inbox.get()) is not None:
            handler = getattr(self, f"handle_{msg.type}", None)
            if handler is None:
                self.log.warning("unknown_message", type=msg.type)
                msg.close_fds()
                continue
            try:
                await handler(msg)
            except Exception:
                # A failing request must not take the worker (and its flows) down with it, nor
                # may its error reply: a send that fails (too large, the peer busy) is logged.
                self.log.error("request_failed", type=msg.type, exc_info=True)
                if msg.body.get("id") is not None:
                    try:
                        self.control.reply(msg, "error", {"error": f"{msg.type} failed"})
                    except (fdpass.ChannelClosed, fdpass.ProtocolError) as exc:
                        self.log.warning("reply_failed", type=msg.type, error=str(exc))
            if self.stopping.is_set():
                break
        await self.aclose()

    async def handle_equip(self, msg: fdpass.Message) -> None:
        first = self.tun is None
        if first:
            self.configure(WorkerSettings.model_validate(msg["settings"]))
        for fdname in [n for n in msg.fds if fdnames.is_onramp(n)]:
            self.take_onramp(fdname, msg.take_fd(fdname))
        if self.datapath is not None:
            self.datapath.detach()
        if self.tun is not None:
            self.tun.close()
        self.tun = TunDevice(msg.take_fd("tun"), vnet=self.settings.offload)
        for name in ("upgrade4", "upgrade6"):
            if old := self.upgrade.pop(name, None):
                old.close()
            self.upgrade[name] = socket.socket(fileno=msg.take_fd(name))
        self.start_datapath(msg["block"])
        self.start_onramps()
        if first:
            self.start_sites()
        if self.nsd is not None:
            self.nsd.close()
        self.nsd = self.dp.nsd = fdpass.AsyncChannel(socket.socket(fileno=msg.take_fd("nsd")),
                                                     "nsd")
        for name in [n for n in msg.fds if n.startswith("mesh:")]:
            self.add_mesh_peer(int(name[5:]), msg.take_fd(name))
        assert self.routes is not None
        self.routes.apply({"add": msg.get("routes") or []})  # (after the mesh: they reach it)
        msg.close_fds()
        try:
            pong = await self.nsd.request("ping", timeout=5)
        except (fdpass.ChannelClosed, TimeoutError):
            # Without nsd we cannot serve; exiting makes the supervisor restart us (with backoff)
            # or, if nsd itself died, re-equip every worker once it is back.
            self.log.error("nsd_unreachable")
            if first:
                raise SystemExit(1) from None
            return
        self.log.info("equipped" if first else "re_equipped", tun=msg["block"]["tun"],
                      onramps=sorted(self.onramps), mesh=sorted(self.mesh), nsd_pid=pong["pid"])
        if first:
            # What start-up made (modules, the application, settings) lives as long as we do:
            # out of the collector's sight, so that its full passes walk the flows' objects only.
            gc.freeze()
        self.control.send("ready", {"pid": os.getpid()})

    def configure(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.app = build_application(settings)
        if self.audit is None:
            self.audit = AuditLog(settings.audit.sink, self.index, log=self.log,
                                  on_state=self.audit_state, node=settings.node)

    def start_datapath(self, block: dict) -> None:
        assert self.tun is not None and self.audit is not None  # made by equip and configure()
        f = self.settings.flows
        local4 = ipaddress.IPv4Address(block["ipv4_local"])
        local6 = ipaddress.IPv6Address(block["ipv6_local"])
        pools = {4: NatPool(ipaddress.IPv4Network(block["ipv4"]), {local4}),
                 6: NatPool(ipaddress.IPv6Network(block["ipv6"]), {local6})}
        if self.datapath is None:
            flows = FlowTable(max_flows=self.flow_budget(f.max_per_worker),
                              max_flows_per_tenant=f.max_per_tenant,
                              max_datagram_flows_per_tenant=f.max_datagram_per_tenant,
                              timeouts=Timeouts(f.tcp_syn_sent, f.tcp_established,
                                                f.tcp_fin_wait, f.tcp_closing,
                                                udp_unreplied=f.udp_unreplied,
                                                udp_replied=f.udp_replied, icmp=f.icmp))
            self.datapath = DataPath(index=self.index, app=self.app, audit=self.audit,
                                     log=self.log, flows=flows, pools=pools,
                                     local={4: local4.packed, 6: local6.packed},
                                     connect_timeout=f.upstream_connect_timeout,
                                     workers=self.settings.workers, forward=self.forward,
                                     mtu=self.settings.mtu,
                                     audit_on_error=self.settings.audit.on_error,
                                     refusals_interval=self.settings.audit.refusals_interval,
                                     routes=RouteTable((n.tenant, n.cidr)
                                                       for n in self.settings.networks),
                                     dns_upstreams=list(self.settings.dns_upstreams),
                                     http=self.settings.http)
            self.datapath.share_names = self.share_names
            self.routes = DeviceRoutes(self.datapath.routes, self.index, self.log,
                                       control=self.control, remote=self.remote_tunnel,
                                       forget=self.forget_remote)
            self.spawn(self.expire_flows())
        else:
            self.datapath.pools = pools  # a new namespace: nothing of the old one is in use
        self.datapath.attach(self.tun, self.upgrade["upgrade4"], self.upgrade["upgrade6"])

    def take_onramp(self, fdname: str, fd: int) -> None:
        """Hold the fd of an on-ramp (``onramp:<kind>:<name>``) for the class of its kind; one
        of a kind or name this worker cannot take is logged and closed."""
        try:
            name, cls = resolve(fdname)
        except OnrampRefused as exc:
            self.log.error("onramp_refused", fd=fdname, error=str(exc))
            os.close(fd)
            return
        if name in self.onramp_socks:
            os.close(fd)  # a re-equip repeats the on-ramps we already hold
            return
        self.onramp_socks[name] = (cls, socket.socket(fileno=fd))

    def start_onramps(self) -> None:
        """Serve every on-ramp held and not served yet (the data path takes their packets)."""
        wiring = Wiring(worker=self.index, log=self.log, settings=self.settings,
                        parse_context=self.parse_context,
                        app_parse_context=lambda raw: self.app.parse_context(raw),
                        on_packet=self.dp.on_tunnel_packet, on_close=self.tunnel_closed,
                        on_stream=self.dp.on_stream, claim_routes=self.claim_routes,
                        serve_http=self.dp.http.serve, share_queues=self.share_queues)
        for name, (cls, sock) in self.onramp_socks.items():
            if name in self.onramps:
                continue
            try:
                onramp = cls(name, sock, wiring)
            except OnrampUnusable as exc:
                self.log.error("onramp_unusable", onramp=name, error=str(exc))
                continue
            if onramp.kind == "tcp":
                self.dp.engine.own_tcp_endpoints.update(tcp_endpoints(onramp.endpoints))
            else:
                self.dp.own_endpoints.update(onramp.endpoints)
            self.onramps[name] = onramp
            onramp.start()

    def start_sites(self) -> None:
        """Routes to the configured GUE sites: each worker sends to a site from its own socket of
        the site's on-ramp (the kernel steers the site's answers to the flow's owner)."""
        assert self.routes is not None
        for site in self.settings.sites:
            onramp = self.onramps.get(site.onramp)
            make = getattr(onramp, "site_tunnel", None)
            if make is None:
                self.log.error("site_unusable", site=site.name, onramp=site.onramp,
                               error="no GUE on-ramp of that name in this worker")
                continue
            self.routes.add_site(site.tenant, site.prefixes,
                                 make(site.name, site.tenant, site.sender))

    async def claim_routes(self, tunnel: Tunnel) -> None:
        assert self.routes is not None
        await self.routes.claim(tunnel)

    def remote_tunnel(self, origin: int, tunnel_id: int, tenant: str,
                      vnet: bool) -> RemoteTunnel | AttachedTunnel | None:
        """Another worker's tunnel as this worker's flows reach it (one object per tunnel)."""
        remote = self.remote_tunnels.get((origin, tunnel_id))
        if remote is None:
            link = self.mesh.get(origin)
            if link is None:
                return None
            remote = RemoteTunnel(link, tunnel_id, TunnelContext(tenant), vnet)
            self.remote_tunnels[(origin, tunnel_id)] = remote
        return remote

    def forget_remote(self, target) -> None:
        """No route reaches ``target`` any more (its tunnel closed, its worker went): the flows
        routed to it end."""
        if isinstance(target, RemoteTunnel):
            if self.remote_tunnels.get((target.origin, target.id)) is target:
                del self.remote_tunnels[(target.origin, target.id)]
            target.close()
            self.dp.close_tunnel(target)

    async def handle_routes(self, msg: fdpass.Message) -> None:
        if self.routes is not None:
            self.routes.apply(msg.body)

    def flow_budget(self, configured: int | None) -> int:
        """``flows.max_per_worker``; by default :data:`DEFAULT_MAX_FLOWS` or fewer if the fd
        limit could not hold them (a relayed TCP flow holds :data:`FDS_PER_FLOW` fds, and a
        worker out of fds fails every flow alike). A configured value is the operator's: kept,
        with a warning when the fd limit is short of it."""
        fds = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        budget = max(1, (fds - FD_RESERVE) // FDS_PER_FLOW)
        wanted = DEFAULT_MAX_FLOWS if configured is None else configured
        if wanted <= budget:
            return wanted
        fix = (f"raise the fd limit (LimitNOFILE=) to at least "
               f"{wanted * FDS_PER_FLOW + FD_RESERVE}, or set flows.max_per_worker lower")
        if configured is None:
            self.log.warning("flow_limit_capped", max_per_worker=wanted, capped_to=budget,
                             fd_limit=fds, fix=fix)
            return budget
        self.log.warning("flow_limit_over_fd_limit", max_per_worker=configured, fd_limit=fds,
                         relayed_flows_possible=budget, fix=fix)
        return configured

    def audit_state(self, error: str | None) -> None:
        """The audit sink failed (``error``) or works again (None): the supervisor's readiness
        and status say so."""
        metrics.AUDIT_DEGRADED.set(0 if error is None else 1)
        try:
            self.control.send("audit", {"error": error})
        except fdpass.ChannelClosed:
            pass  # the supervisor is gone; we are stopping anyway

    async def parse_context(self, raw: bytes) -> TunnelContext:
        context = await call_hook(self.app.parse_context, raw)
        if not isinstance(context, TunnelContext):
            raise TypeError(f"parse_context returned {context!r}, not a TunnelContext")
        return context

    async def expire_flows(self) -> None:
        peak = 0  # flows at the last high-water mark
        while True:
            await asyncio.sleep(EXPIRE_INTERVAL)
            self.dp.expire()  # (and writes the refusals counted over the interval)
            flows = len(self.dp.entries)
            peak = max(peak, flows)
            if peak - flows >= TRIM_AFTER and flows < peak // 2:
                # Most of a flood's flows are gone: hand the freed heap back to the system
                # (glibc keeps it otherwise; the flow tables' large blocks live there).
                release_memory()
                peak = flows
            # The tunnels flows use: worked out once a sweep, and only if an on-ramp asks.
            in_use = functools.cache(lambda: {e.client.id for e in self.dp.entries.values()})
            for onramp in self.onramps.values():
                onramp.sweep(in_use)

    async def handle_flows(self, msg: fdpass.Message) -> None:
        """Counts, or a page of flows in start order (see the module's docstring)."""
        index = self.datapath.flow_index if self.datapath else views.FlowIndex()
        tenant = msg.get("tenant")
        tenant = tenant if isinstance(tenant, str) else None
        after = int(msg.get("after") or 0)
        if msg.get("epoch") != index.epoch:
            after = 0  # a cursor of an earlier process of this worker: every flow is new
        if msg.get("op") == "count":
            body = {"total": len(index.flows(tenant)), "after": index.count_after(tenant, after),
                    "epoch": index.epoch}
        else:
            limit = max(1, min(int(msg.get("limit") or views.MAX_PAGE), views.MAX_PAGE))
            entries = (index.after(tenant, after) if msg.get("op") == "after"
                       else index.at(tenant, max(0, int(msg.get("start") or 0))))
            # (no entries without a data path)
            rows, _, cut = views.fit((self.dp.flow_row(e) for e in entries), limit=limit)
            body = {"flows": rows, "epoch": index.epoch, "cut": cut and len(rows) < limit}
        await self.control.reply_when_ready(msg, "flows", body)

    async def handle_tunnels(self, msg: fdpass.Message) -> None:
        def take() -> list:
            # Our queues of other workers' devices too: their packets count into the holder's row.
            return [*(t for o in self.onramps.values() for t in o.tunnels()),
                    *(q for q in self.queue_tunnels.values() if q.control is None)]

        part = self.snapshots.part(msg.body, take, views.tunnel_row)
        await self.control.reply_when_ready(msg, "tunnels", {**part, "tunnels": part.pop("rows")})

    async def handle_mesh_peer(self, msg: fdpass.Message) -> None:
        peer = int(msg["peer"])
        self.add_mesh_peer(peer, msg.take_fd(f"mesh:{peer}"))
        msg.close_fds()

    def add_mesh_peer(self, peer: int, fd: int) -> None:
        if old := self.mesh.pop(peer, None):
            old.close()
        self.mesh[peer] = MeshLink(peer, socket.socket(fileno=fd), on_message=self.on_mesh_message,
                                   on_frame=self.on_mesh_frame, on_close=self.on_mesh_close)
        metrics.MESH_PEERS.set(len(self.mesh))
        if self.routes is not None:
            self.routes.link_up(peer)

    # -- the mesh: flows owned by another worker ----------------------------------------------

    def forward(self, peer: int, tunnel, packet: bytes) -> None:
        """A packet of our tunnel whose flow ``peer`` owns: tell it the tunnel once, then send."""
        link = self.mesh.get(peer)
        if link is None:
            # The owner is restarting: its flows are gone. A reset makes the client fail fast.
            metrics.DROPS.labels("owner_unreachable").inc()
            self.dp.reset_client(tunnel, packet)
            return
        if tunnel.id not in link.opened:
            opening = {"tunnel": tunnel.id, "tenant": tunnel.tenant,
                       "extra": tunnel.context.extra, "vnet": tunnel.vnet}
            if isinstance(tunnel, AttachedTunnel):  # the owner may hold a queue of it
                opening["device"] = list(tunnel.device)
            sent = _send_context(link.send_message, "tunnel_open", opening, tunnel)
            if not sent:
                metrics.DROPS.labels("owner_unreachable").inc()
                return
            link.opened[tunnel.id] = tunnel
        if link.send_frame(PACKET, tunnel.id, packet):
            PKT_TO_MESH.inc()

    def tunnel_closed(self, tunnel, reason: str) -> None:
        self.dp.close_tunnel(tunnel)
        if self.routes is not None:
            self.routes.release(tunnel)
        for link in self.mesh.values():
            if link.opened.pop(tunnel.id, None) is not None:
                link.send_message("tunnel_closed", {"tunnel": tunnel.id})
        if isinstance(tunnel, AttachedTunnel):
            self.queue_tunnels.pop(tunnel.device, None)
            for peer in tunnel.shared_with:
                if (peer_link := self.mesh.get(peer)) is not None:
                    peer_link.send_message("tunnel_detach", {"device": list(tunnel.device)})

    # -- TUN queues: tunnels whose client passed its TUN (ipferry.worker.attached) ------------

    def share_queues(self, tunnel: AttachedTunnel, fds: list[int]) -> list[int]:
        """Give each other worker one of ``fds``, queues of the TUN of our ``tunnel``; returns
        those no worker took (we read them)."""
        self.queue_tunnels[tunnel.device] = tunnel
        left = list(fds)
        body = {"device": list(tunnel.device), "tenant": tunnel.tenant,
                "extra": tunnel.context.extra, "vnet": tunnel.vnet}
        for peer, link in sorted(self.mesh.items()):
            if not left:
                break
            send = functools.partial(_send_fd, link, fd=left[0])
            if _send_context(send, "tunnel_queue", body, tunnel):
                os.close(left.pop(0))
                tunnel.shared_with.append(peer)
        return left

    def take_queue(self, link: MeshLink, msg: fdpass.Message) -> None:
        """A queue of a TUN another worker's client passed: read it, answer its flows on it."""
        fd = msg.fds.pop("queue", -1)
        msg.close_fds()
        try:
            device = (int(msg["device"][0]), int(msg["device"][1]))
            context = TunnelContext(str(msg["tenant"]), msg.get("extra") or {})
            check_tun(fd, bool(msg.get("vnet")))
        except (KeyError, TypeError, ValueError, IndexError):
            if fd >= 0:
                os.close(fd)
            metrics.DROPS.labels("mesh_bad_message").inc()
            return
        if self.datapath is None or device in self.queue_tunnels or device[0] != link.peer:
            os.close(fd)
            metrics.DROPS.labels("mesh_bad_message").inc()
            return
        queue = AttachedTunnel(link.peer, context, bool(msg.get("vnet")),
                               self.dp.on_tunnel_packet, self.queue_gone, device=device)
        queue.attach(fd)
        self.queue_tunnels[device] = queue

    def queue_gone(self, queue: AttachedTunnel) -> None:
        """Our queue of another worker's TUN tunnel ends (detached, or the device is gone)."""
        if self.queue_tunnels.get(queue.device) is queue:
            del self.queue_tunnels[queue.device]
        for key in [k for k, t in self.remote_tunnels.items() if t is queue]:
            del self.remote_tunnels[key]
        queue.close()
        if self.datapath is not None:
            self.datapath.close_tunnel(queue)

    def share_names(self, tenant: str, name: str, addresses: list[tuple[str, int]]) -> None:
        """What the resolver answered, to every other worker: a flow to one of the addresses
        may be any worker's to own."""
        body = {"tenant": tenant, "name": name, "addresses": [list(a) for a in addresses[:64]]}
        for link in self.mesh.values():
            link.send_message("names", body)

    def on_mesh_message(self, link: MeshLink, msg: fdpass.Message) -> None:
        if msg.type == "names":
            if self.datapath is not None and isinstance(msg.get("addresses"), list):
                try:
                    self.datapath.remember_names(str(msg["tenant"]), str(msg["name"]),
                                                 [(str(a), int(t)) for a, t in msg["addresses"]])
                except (KeyError, TypeError, ValueError, OverflowError):
                    metrics.DROPS.labels("mesh_bad_message").inc()
            return
        if msg.type == "ping":
            link.reply(msg, "pong", {"worker": self.index})
        elif msg.type == "tunnel_queue":
            self.take_queue(link, msg)
        elif msg.type == "tunnel_detach":
            queue = self.queue_tunnels.get(tuple(msg.get("device") or ()))
            if queue is not None and queue.control is None and queue.origin == link.peer:
                self.queue_gone(queue)
        elif msg.type == "tunnel_open":
            context = TunnelContext(msg["tenant"], msg.get("extra") or {})
            device = msg.get("device")
            queue = self.queue_tunnels.get(tuple(device)) if isinstance(device, list) else None
            if queue is not None:  # a TUN we hold a queue of: its flows are answered there
                self.remote_tunnels[(link.peer, msg["tunnel"])] = queue
                return
            remote = self.remote_tunnels.get((link.peer, msg["tunnel"]))
            if isinstance(remote, RemoteTunnel) and remote.link is link:  # (a route's target)
                remote.context = context
                remote.vnet = bool(msg.get("vnet"))
                return
            self.remote_tunnels[(link.peer, msg["tunnel"])] = RemoteTunnel(
                link, msg["tunnel"], context, bool(msg.get("vnet")))
        elif msg.type == "tunnel_closed":
            remote = self.remote_tunnels.pop((link.peer, msg["tunnel"]), None)
            if isinstance(remote, RemoteTunnel):  # (our queue of it goes with tunnel_detach)
                remote.close()
                self.dp.close_tunnel(remote)

    def on_mesh_frame(self, link: MeshLink, kind: bytes, tunnel_id: int, packet: bytes) -> None:
        if kind == PACKET:
            remote = self.remote_tunnels.get((link.peer, tunnel_id))
            if remote is None or self.datapath is None:
                metrics.DROPS.labels("mesh_unknown_tunnel").inc()
                return
            self.datapath.on_tunnel_packet(remote, packet)
        elif kind == REPLY:
            PKT_FROM_MESH.inc()
            # A reply can only be for a tunnel we told this peer of (one lookup a frame:
            # every packet of a download crosses here).
            tunnel = link.opened.get(tunnel_id)
            if tunnel is None and self.routes is not None:  # a tunnel of ours routed to
                tunnel = self.routes.claimed.get(tunnel_id)
            if tunnel is None or tunnel.closed:
                metrics.DROPS.labels("mesh_unknown_tunnel").inc()
                return
            self.dp.relay_to_tunnel(tunnel, packet)  # already in the tunnel's framing
        else:
            metrics.DROPS.labels("mesh_bad_frame").inc()

    def on_mesh_close(self, link: MeshLink) -> None:
        if self.mesh.get(link.peer) is link:
            del self.mesh[link.peer]
            metrics.MESH_PEERS.set(len(self.mesh))
        # The peer is gone: the flows we owned for its tunnels go with it.
        for key in [k for k in self.remote_tunnels if k[0] == link.peer]:
            remote = self.remote_tunnels.pop(key)
            if isinstance(remote, RemoteTunnel):
                remote.close()
                if self.datapath is not None:
                    self.datapath.close_tunnel(remote)
        # Its clients' TUN tunnels end with it (their connections were its).
        for queue in [q for q in self.queue_tunnels.values()
                      if q.control is None and q.origin == link.peer]:
            self.queue_gone(queue)

    async def handle_mesh_check(self, msg: fdpass.Message) -> None:
        """Ping every peer over its mesh link; reply which worker answered on each."""
        async def ping(peer: int, link: MeshLink) -> tuple[str, int | None]:
            try:
                return str(peer), (await link.request("ping", timeout=2))["worker"]
            except (fdpass.ChannelClosed, TimeoutError):
                return str(peer), None

        async def check() -> None:
            answers = await asyncio.gather(*(ping(p, link) for p, link in self.mesh.items()))
            self.control.reply(msg, "mesh", {"peers": dict(answers)})

        self.spawn(check())  # the control loop stays free while peers answer

    async def handle_metrics(self, msg: fdpass.Message) -> None:
        part = self.snapshots.part(msg.body, lambda: views.metric_pieces(metrics.snapshot()),
                                   lambda family: family)
        await self.control.reply_when_ready(msg, "metrics", {**part, "families": part.pop("rows")})

    async def handle_prepare(self, msg: fdpass.Message) -> None:
        """A reload's first step: build the new settings' application, keep it for ``commit``."""
        self.prepared = None
        try:
            settings = WorkerSettings.model_validate(msg["settings"])
            app = build_application(settings)
        except Exception as exc:  # whatever the application's constructor raised
            self.log.error("reload_prepare_failed", exc_info=True)
            self.control.reply(msg, "error", {"error": f"cannot build the application: "
                                                       f"{type(exc).__name__}: {exc}"[:500]})
            return
        self.prepared = (settings, app)
        self.control.reply(msg, "prepared")

    async def handle_commit(self, msg: fdpass.Message) -> None:
        logs.set_level(msg["log_level"])
        if self.prepared is not None and self.datapath is not None:
            self.settings, app = self.prepared
            self.app = self.datapath.app = app
            for onramp in self.onramps.values():
                onramp.reset_contexts()
        self.prepared = None
        self.log.info("reconfigured", log_level=msg["log_level"])

    async def handle_abort(self, msg: fdpass.Message) -> None:
        self.prepared = None

    async def handle_stop(self, msg: fdpass.Message) -> None:
        self.request_stop()

    def request_stop(self) -> None:
        self.log.info("stopping")
        self.stopping.set()
        self.control.inbox.put_nowait(None)  # wake run() even when no message is due

    async def aclose(self) -> None:
        # Each cancels its own tasks (context hooks) and waits a bounded time for them.
        await asyncio.gather(*(onramp.stop() for onramp in self.onramps.values()))
        if self.datapath is not None:
            # The application hears of every flow's end; its hooks get HOOK_DRAIN to finish.
            await self.datapath.shutdown(HOOK_DRAIN)
        if self.audit is not None:
            self.audit.close()
        if self.tun:
            self.tun.close()
        for sock in [*(s for _, s in self.onramp_socks.values()), *self.upgrade.values()]:
            sock.close()
        links: list[MeshLink | fdpass.AsyncChannel] = [*self.mesh.values(), *([self.nsd] if self.nsd else [])]
        for link in links:
            link.close()


def main(argv: list[str] | None = None) -> int:
    args, control, log = child.start("worker", argv, __doc__, indexed=True)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        worker = Worker(args.index, control, log)
        # The supervisor stops us with a message, so drains stay ordered; SIGTERM stops us too.
        child.stop_on_sigterm(worker.request_stop)
        loop.set_exception_handler(lambda _loop, ctx: log.error(
            "loop_exception", message=ctx.get("message"), exc_info=ctx.get("exception")))
        await worker.run()

    child.run(run, prefer_uvloop=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
