"""A worker's part in tenants' private networks: its copy of every live route, its tunnels' claims.

A tunnel whose context names ``routes`` claims them before it opens: the worker asks the
supervisor (``claim_routes``), which checks them against the tenant's networks and every other
claim, answers, and tells every worker (``routes`` {add, remove}); a worker's restart withdraws
its tunnels' routes the same way. Each worker resolves a route to a tunnel leg its flows can
send to: its own tunnel, another worker's (reached over the mesh, a
:class:`~ipferry.worker.mesh.RemoteTunnel`), or a configured GUE site (its own socket of the
site's on-ramp). See :mod:`ipferry.engine.routes` for what a lookup answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ipferry.engine.legs import TunnelLeg
from ipferry.engine.routes import RouteTable
from ipferry.runtime import fdpass

from . import metrics

if TYPE_CHECKING:
    from .tunnels import Tunnel

CLAIM_TIMEOUT = 5.0


class RouteRefused(Exception):
    """A tunnel's claim the supervisor refused (``str()``: its reason)."""


class DeviceRoutes:
    def __init__(self, table: RouteTable, index: int, log: Any, *,
                 control: fdpass.AsyncChannel,
                 remote: Callable[[int, int, str, bool], Tunnel | None],
                 forget: Callable[[TunnelLeg], None]) -> None:
        self.table = table
        self.index = index
        self.log = log
        self.control = control
        self.remote = remote  # (worker, tunnel id, tenant, vnet) -> that worker's tunnel, here
        self.forget = forget  # a tunnel no route reaches any more: its flows to it end
        self.claimed: dict[int, Tunnel] = {}  # our tunnels whose claims were accepted, by id
        # Routes to another worker's tunnels told before our mesh link to that worker exists
        # (at equip, or while it restarts), by worker: made when the link is.
        self.unresolved: dict[int, list[dict]] = {}

    async def claim(self, tunnel: Tunnel) -> None:
        """Claim the routes of ``tunnel``'s context before it opens; raises RouteRefused."""
        prefixes = tunnel.context.extra.get("routes") or []
        # Known before the answer: the supervisor's ``routes`` message, which adds them here
        # too, may be read before this coroutine resumes.
        self.claimed[tunnel.id] = tunnel
        try:
            reply = await self.control.request("claim_routes", {
                "tunnel": tunnel.id, "tenant": tunnel.tenant, "prefixes": prefixes,
                "vnet": tunnel.vnet}, timeout=CLAIM_TIMEOUT)
        except (fdpass.ChannelClosed, TimeoutError):
            # It may yet have accepted it: let go of whatever it holds (here too: its routes
            # may have been told already), or they would outlive the tunnel.
            self.release(tunnel)
            raise RouteRefused("the supervisor did not answer the claim") from None
        if reply.type != "routes_claimed":
            self.claimed.pop(tunnel.id, None)
            raise RouteRefused(str(reply.get("error") or "refused"))

    def release(self, tunnel: Tunnel) -> None:
        """Our tunnel closed: its routes go, here at once and everywhere once told."""
        if self.claimed.pop(tunnel.id, None) is None:
            return
        for route in self.table.remove_target(tunnel):
            self.log.debug("route_removed", tenant=route.tenant, prefix=route.prefix)
        metrics.ROUTES.set(len(self.table))
        try:
            self.control.send("release_routes", {"tunnel": tunnel.id})
        except fdpass.ChannelClosed:
            pass  # the supervisor is gone: so are we, soon

    def apply(self, body: dict) -> None:
        """The supervisor's ``routes`` {add, remove} (or an equip's ``routes`` as ``add``)."""
        for entry in body.get("remove") or ():
            waiting = self.unresolved.get(entry["worker"])
            if waiting:
                waiting[:] = [e for e in waiting if (e["tenant"], e["prefix"])
                              != (entry["tenant"], entry["prefix"])]
            route = self.table.remove(entry["tenant"], entry["prefix"])
            if route is not None and not any(r.target is route.target for r in self.table):
                self.forget(route.target)
        for entry in body.get("add") or ():
            worker, tunnel_id = entry["worker"], entry["tunnel"]
            target: TunnelLeg | None
            if worker == self.index:
                target = self.claimed.get(tunnel_id)
            else:
                target = self.remote(worker, tunnel_id, entry["tenant"], bool(entry.get("vnet")))
                if target is None:  # no mesh link to that worker yet
                    self.unresolved.setdefault(worker, []).append(entry)
                    continue
            if target is None:  # closed since it claimed: its removal follows
                continue
            self.table.add(entry["tenant"], entry["prefix"], target)
        metrics.ROUTES.set(len(self.table))

    def link_up(self, worker: int) -> None:
        """A mesh link to ``worker`` exists now: the routes to its tunnels told before it."""
        waiting = self.unresolved.pop(worker, None)
        if waiting:
            self.apply({"add": waiting})

    def add_site(self, tenant: str, prefixes: list[str], target: TunnelLeg) -> None:
        for prefix in prefixes:
            self.table.add(tenant, prefix, target)
        metrics.ROUTES.set(len(self.table))
