"""The route registry of private networks: which device (a tunnel of a worker, or a site) holds
which prefix of its tenant's address space. Pure: no I/O, no clock.

Each tenant is its own address space: its ``[[networks]]`` say which addresses its devices may
claim, and within a tenant no two routes overlap (a destination has at most one device). The
sites of the config (``[[sites]]``) are static routes, there from the start; tunnels claim
prefixes when their context names ``routes`` and lose them when they close (or their worker
exits). A claim is all or nothing, and a tunnel's new claim replaces its previous one.

The supervisor keeps the one registry (``Supervisor.routes``) and tells the workers of every
change (``pool.py``); per tenant, routes are kept in address order, so an overlap check is a
bisection, not a scan.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sortedcontainers import SortedDict

MAX_PREFIXES = 64  # per tunnel, as a context's routes
MAX_ROUTES = 100_000  # tunnel routes held at once, over all workers and tenants

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Key = tuple[int, int]  # (IP version, first address): a route's place in its tenant's order


class RouteRefused(Exception):
    """A claim that cannot be had; ``str()`` is the reason, for the worker and its log."""


@dataclass(frozen=True)
class Route:
    """A prefix of ``tenant``'s address space and the device that holds it: a tunnel (``worker``
    and ``tunnel``: its id in that worker; ``vnet``: it speaks vnet framing) or a site."""

    tenant: str
    prefix: str  # normalised: "10.77.0.2/32"
    worker: int | None  # None for a site
    tunnel: int | None  # None for a site
    vnet: bool = False
    site: str | None = None  # the site's name, None for a tunnel

    def wire(self) -> dict[str, Any]:
        """As the workers are told of it (sites are not: they have them from their settings)."""
        return {"tenant": self.tenant, "prefix": self.prefix, "worker": self.worker,
                "tunnel": self.tunnel, "vnet": self.vnet}

    def row(self) -> dict[str, Any]:
        """As the admin API lists it."""
        return {"tenant": self.tenant, "prefix": self.prefix,
                "kind": "site" if self.site is not None else "tunnel", "worker": self.worker,
                "tunnel": self.tunnel, "vnet": self.vnet, "site": self.site}

    def holder(self) -> str:
        if self.site is not None:
            return f"site {self.site}"
        return f"tunnel {self.tunnel} of worker {self.worker}"


def _key(net: IPNetwork) -> Key:
    return net.version, int(net.network_address)


def _last(net: IPNetwork) -> int:
    return int(net.broadcast_address)


def _networks_text(networks: list[IPNetwork]) -> str:
    shown = ", ".join(map(str, networks[:8]))
    return shown + (f", ... ({len(networks)} in all)" if len(networks) > 8 else "")


class _Space:
    """One tenant's routes, by first address. Pairwise disjoint, so sorted by first address they
    are sorted by last address too: the only route that can overlap a prefix is the last one
    starting at or before the prefix's last address."""

    def __init__(self) -> None:
        self.routes: SortedDict[Key, tuple[IPNetwork, Route]] = SortedDict()

    def clash(self, net: IPNetwork) -> Route | None:
        index = self.routes.bisect_right((net.version, _last(net))) - 1
        if index < 0:
            return None
        key, (other, route) = self.routes.peekitem(index)
        if key[0] != net.version or _last(other) < int(net.network_address):
            return None
        return route

    def add(self, net: IPNetwork, route: Route) -> None:
        self.routes[_key(net)] = (net, route)

    def remove(self, net: IPNetwork) -> None:
        del self.routes[_key(net)]


class RouteRegistry:
    """``networks``: the config's ``[[networks]]`` (objects with ``tenant`` and ``cidr``, as
    ``NetworkSettings``); ``sites``: ``(name, tenant, prefixes)`` of each ``[[sites]]`` entry
    (the config checked them: inside the tenant's networks, not overlapping)."""

    def __init__(self, networks: Iterable[Any], sites: Iterable[tuple[str, str, list[str]]] = (),
                 *, max_routes: int = MAX_ROUTES) -> None:
        self.max_routes = max_routes
        self.networks: dict[str, list[IPNetwork]] = {}
        for n in networks:
            self.networks.setdefault(n.tenant, []).append(ipaddress.ip_network(n.cidr,
                                                                               strict=False))
        self._spaces: dict[str, _Space] = {}
        self._claims: dict[tuple[int, int], list[Route]] = {}  # (worker, tunnel): its routes
        self._tunnels_of: dict[int, set[int]] = {}  # worker: its tunnels with claims
        self._count = 0  # tunnel routes held (sites not counted)
        for name, tenant, prefixes in sites:
            space = self._spaces.setdefault(tenant, _Space())
            for prefix in prefixes:
                net = ipaddress.ip_network(prefix, strict=False)
                space.add(net, Route(tenant, str(net), None, None, False, name))

    def __len__(self) -> int:
        """Tunnel routes held now."""
        return self._count

    # -- changes ---------------------------------------------------------------------------

    def claim(self, worker: int, tunnel: int, tenant: str, prefixes: list[str],
              vnet: bool) -> list[Route]:
        """The routes of tunnel ``tunnel`` of worker ``worker`` become ``prefixes`` (normalised,
        host bits ignored), replacing what it held: all of them, or RouteRefused and nothing
        changes."""
        if len(prefixes) > MAX_PREFIXES:
            raise RouteRefused(f"{len(prefixes)} prefixes claimed, over {MAX_PREFIXES} a tunnel")
        nets: list[IPNetwork] = []
        for text in prefixes:
            try:
                if not isinstance(text, str) or "%" in text:
                    raise ValueError
                nets.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise RouteRefused(f"{str(text)[:60]!r} is not an IPv4 or IPv6 network") from None
        owned = self.networks.get(tenant, [])
        for net in nets:
            if not any(net.version == n.version and net.subnet_of(n)  # type: ignore[arg-type]
                       for n in owned):
                raise RouteRefused(f"{net} is outside tenant {tenant}'s networks "
                                   f"({_networks_text(owned) or 'none'})")
        old = self._claims.get((worker, tunnel), [])
        if self._count - len(old) + len(nets) > self.max_routes:
            raise RouteRefused(f"the daemon holds {self._count} routes; {len(nets)} more would "
                               f"pass its limit of {self.max_routes}")
        self._drop(old)  # a replacement does not clash with what it replaces
        space = self._spaces.setdefault(tenant, _Space())
        new: list[Route] = []
        try:
            for net in nets:
                clash = space.clash(net)
                if clash is not None:
                    held = ("of the same claim" if clash.worker == worker
                            and clash.tunnel == tunnel and clash.site is None
                            else f"held by {clash.holder()}")
                    raise RouteRefused(f"{net} overlaps {clash.prefix} {held}")
                route = Route(tenant, str(net), worker, tunnel, bool(vnet))
                space.add(net, route)
                new.append(route)
        except RouteRefused:
            for route in new:
                space.remove(ipaddress.ip_network(route.prefix))
            self._prune(tenant)
            self._keep(worker, tunnel, old)
            raise
        self._prune(tenant)
        self._keep(worker, tunnel, new)
        return new

    def withdraw(self, worker: int, tunnel: int) -> list[Route]:
        """The tunnel's routes, now let go of."""
        routes = self._claims.get((worker, tunnel), [])
        self._drop(routes)
        return routes

    def withdraw_worker(self, worker: int) -> list[Route]:
        """Every route of the worker's tunnels (it exited), now let go of."""
        out: list[Route] = []
        for tunnel in sorted(self._tunnels_of.get(worker, ())):
            out += self.withdraw(worker, tunnel)
        return out

    def _drop(self, routes: list[Route]) -> None:
        for route in routes:
            self._spaces[route.tenant].remove(ipaddress.ip_network(route.prefix))
        if routes:
            worker, tunnel = routes[0].worker, routes[0].tunnel
            assert worker is not None and tunnel is not None
            del self._claims[(worker, tunnel)]
            self._tunnels_of[worker].discard(tunnel)
            if not self._tunnels_of[worker]:
                del self._tunnels_of[worker]
            self._count -= len(routes)
            self._prune(routes[0].tenant)

    def _prune(self, tenant: str) -> None:
        space = self._spaces.get(tenant)
        if space is not None and not space.routes:
            del self._spaces[tenant]

    def _keep(self, worker: int, tunnel: int, routes: list[Route]) -> None:
        if not routes:
            return
        self._claims[(worker, tunnel)] = routes
        self._tunnels_of.setdefault(worker, set()).add(tunnel)
        self._count += len(routes)
        space = self._spaces.setdefault(routes[0].tenant, _Space())
        for route in routes:
            net = ipaddress.ip_network(route.prefix)
            if _key(net) not in space.routes:  # a claim refused puts the old routes back
                space.add(net, route)

    # -- reads -------------------------------------------------------------------------------

    def held(self, worker: int, tunnel: int) -> list[Route]:
        """What the tunnel holds now."""
        return list(self._claims.get((worker, tunnel), []))

    def __iter__(self) -> Iterator[Route]:
        """Every route, sites too: by tenant, then address (IPv4 first)."""
        for tenant in sorted(self._spaces):
            for _, route in self._spaces[tenant].routes.values():
                yield route

    def entries(self) -> list[dict[str, Any]]:
        """Every tunnel route as the workers are told of it (``equip``)."""
        return [r.wire() for r in self if r.site is None]

    def rows(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Every route (of ``tenant``), sites too, as the admin API lists them."""
        return [r.row() for r in self.page(tenant)[1]]

    def count(self, tenant: str | None = None) -> int:
        """Routes (of ``tenant``), sites too."""
        if tenant is not None:
            space = self._spaces.get(tenant)
            return len(space.routes) if space else 0
        return sum(len(s.routes) for s in self._spaces.values())

    def page(self, tenant: str | None = None, offset: int = 0, limit: int | None = None,
             after: tuple[str, str] | None = None) -> tuple[int, list[Route]]:
        """(how many routes match, the page): by tenant then address, from ``offset`` or after
        the route ``after`` = (tenant, prefix) (which need not exist any more); ``limit`` at
        most. Costs the tenants skipped and the page, not the routes before it."""
        tenants = [tenant] if tenant is not None else sorted(self._spaces)
        total = sum(self.count(t) for t in tenants)
        out: list[Route] = []
        skip = offset
        for t in tenants:
            space = self._spaces.get(t)
            if space is None:
                continue
            start = 0
            if after is not None:
                if t < after[0]:
                    continue
                if t == after[0]:
                    start = space.routes.bisect_right(_key(ipaddress.ip_network(after[1])))
            n = len(space.routes) - start
            if skip >= n:
                skip -= n
                continue
            start += skip
            skip = 0
            for i in range(start, len(space.routes)):
                if limit is not None and len(out) >= limit:
                    return total, out
                out.append(space.routes.peekitem(i)[1][1])
        return total, out
