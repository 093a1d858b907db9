"""Private networks, sans I/O: which tenant's devices hold which addresses.

The config declares each tenant's *networks* (the prefixes its devices may hold); a device's tunnel
*claims* routes inside them (the supervisor checks each claim, then every worker is told). For a
flow's destination, :meth:`RouteTable.lookup` answers:

- a :class:`Route`: a device of the flow's own tenant holds it (the longest prefix wins);
- :data:`NO_ROUTE`: inside the tenant's networks, but no device holds it now (host unreachable);
- :data:`PROHIBITED`: inside another tenant's networks only (administratively prohibited: tenants
  never see each other's devices);
- None: not a private address of anyone's: the flow is off-ramped as any other.

Tenants' networks may overlap (each tenant is its own address space): the tenant's own answer
always wins. Lookups index prefixes by length, so a lookup costs one dict probe per distinct
prefix length, not one per route.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .legs import TunnelLeg

_BITS = {4: 32, 16: 128}


class Unrouted(enum.StrEnum):
    NO_ROUTE = "no_route"  # a drop reason too
    PROHIBITED = "other_tenant_network"


NO_ROUTE = Unrouted.NO_ROUTE
PROHIBITED = Unrouted.PROHIBITED


class Route:
    """A live route: ``prefix`` of ``tenant`` is held by the device behind ``target``."""

    __slots__ = ("tenant", "prefix", "target")

    def __init__(self, tenant: str, prefix: str, target: TunnelLeg) -> None:
        self.tenant = tenant
        self.prefix = prefix
        self.target = target

    def __repr__(self) -> str:
        return f"Route({self.tenant!r}, {self.prefix!r}, tunnel {self.target.id})"


def _parse(prefix: str) -> tuple[int, int, int]:
    """(address length in bytes, prefix length, network bits shifted right)."""
    net = ipaddress.ip_network(prefix, strict=False)
    size = 4 if net.version == 4 else 16
    bits = _BITS[size]
    return size, net.prefixlen, int(net.network_address) >> (bits - net.prefixlen)


class _PrefixIndex:
    """Values by prefix, for longest-prefix matches: by address length, then prefix length."""

    def __init__(self) -> None:
        self._by: dict[int, dict[int, dict[int, object]]] = {4: {}, 16: {}}
        self._lengths: dict[int, list[int]] = {4: [], 16: []}  # longest first

    def put(self, prefix: str, value: object) -> None:
        size, length, bits = _parse(prefix)
        table = self._by[size].get(length)
        if table is None:
            table = self._by[size][length] = {}
            self._lengths[size] = sorted(self._by[size], reverse=True)
        table[bits] = value

    def pop(self, prefix: str) -> object | None:
        size, length, bits = _parse(prefix)
        table = self._by[size].get(length)
        if table is None:
            return None
        value = table.pop(bits, None)
        if not table:
            del self._by[size][length]
            self._lengths[size] = sorted(self._by[size], reverse=True)
        return value

    def get(self, prefix: str) -> object | None:
        size, length, bits = _parse(prefix)
        return self._by[size].get(length, {}).get(bits)

    def matches(self, address: bytes) -> Iterable[object]:
        """The values of every prefix holding ``address``, longest first."""
        size = len(address)
        bits = _BITS.get(size)
        if bits is None:
            return
        tables = self._by[size]
        value = int.from_bytes(address, "big")
        for length in self._lengths[size]:
            found = tables[length].get(value >> (bits - length))
            if found is not None:
                yield found

    def __bool__(self) -> bool:
        return bool(self._lengths[4] or self._lengths[16])


class RouteTable:
    """Every tenant's networks and every live route of this daemon (each worker holds a copy)."""

    def __init__(self, networks: Iterable[tuple[str, str]] = ()) -> None:
        self._networks = _PrefixIndex()  # prefix -> the set of tenants declaring it
        self._routes: dict[str, _PrefixIndex] = {}  # by tenant
        self._by_prefix: dict[tuple[str, str], Route] = {}
        for tenant, cidr in networks:
            tenants = self._networks.get(cidr)
            if not isinstance(tenants, set):
                tenants = set()
                self._networks.put(cidr, tenants)
            tenants.add(tenant)

    def __len__(self) -> int:
        return len(self._by_prefix)

    def __iter__(self) -> Iterator[Route]:
        return iter(list(self._by_prefix.values()))

    def add(self, tenant: str, prefix: str, target: TunnelLeg) -> Route:
        """Route ``prefix`` of ``tenant`` to ``target`` (replacing what held it before)."""
        prefix = str(ipaddress.ip_network(prefix, strict=False))
        route = Route(tenant, prefix, target)
        routes = self._routes.get(tenant)
        if routes is None:
            routes = self._routes[tenant] = _PrefixIndex()
        routes.put(prefix, route)
        self._by_prefix[(tenant, prefix)] = route
        return route

    def remove(self, tenant: str, prefix: str) -> Route | None:
        prefix = str(ipaddress.ip_network(prefix, strict=False))
        route = self._by_prefix.pop((tenant, prefix), None)
        routes = self._routes.get(tenant)
        if route is not None and routes is not None:
            routes.pop(prefix)
            if not routes:
                del self._routes[tenant]
        return route

    def remove_target(self, target: TunnelLeg) -> list[Route]:
        """Forget every route to ``target`` (its tunnel closed)."""
        gone = [r for r in self._by_prefix.values() if r.target is target]
        for route in gone:
            self.remove(route.tenant, route.prefix)
        return gone

    def private(self) -> bool:
        """Are there any networks at all (if not, no lookup is needed)?"""
        return bool(self._networks)

    def lookup(self, tenant: str, address: bytes) -> Route | Unrouted | None:
        """Where ``address`` is for a flow of ``tenant`` (see the module's docstring)."""
        own = other = False
        for tenants in self._networks.matches(address):
            assert isinstance(tenants, set)
            if tenant in tenants:
                own = True
                break
            other = True
        if own:
            routes = self._routes.get(tenant)
            if routes is not None:
                for route in routes.matches(address):
                    assert isinstance(route, Route)
                    return route
            return NO_ROUTE
        return PROHIBITED if other else None
