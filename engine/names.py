"""Which name an address was given for, per tenant: the daemon's resolver's answers, remembered.

When the daemon's resolver answers a tenant's query with addresses, each address is remembered
for that tenant with the name and the answer's TTL; a new flow of the tenant to one of them
carries the name (rules with ``host``, the hooks and the audit see it). Bounded per tenant (the
oldest go first) and honouring TTLs (a record is forgotten once expired); time is an input.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

MAX_PER_TENANT = 10_000
MIN_TTL, MAX_TTL = 30.0, 86_400.0  # (a zero TTL still names the flow that follows at once)


class NameCache:
    def __init__(self, max_per_tenant: int = MAX_PER_TENANT) -> None:
        self.max_per_tenant = max_per_tenant
        self._by_tenant: dict[str, OrderedDict[bytes, tuple[str, float]]] = {}

    def add(self, tenant: str, name: str, addresses: Iterable[tuple[bytes, float]],
            now: float) -> None:
        """``name`` answered with ``addresses`` (packed, with their TTLs in seconds)."""
        known = self._by_tenant.get(tenant)
        if known is None:
            known = self._by_tenant[tenant] = OrderedDict()
        for address, ttl in addresses:
            known.pop(address, None)  # (re-inserted last: the newest)
            known[address] = (name, now + min(max(ttl, MIN_TTL), MAX_TTL))
            while len(known) > self.max_per_tenant:
                known.popitem(last=False)

    def lookup(self, tenant: str, address: bytes, now: float) -> str | None:
        known = self._by_tenant.get(tenant)
        if not known:
            return None
        entry = known.get(address)
        if entry is None:
            return None
        if entry[1] <= now:
            del known[address]
            return None
        return entry[0]

    def __len__(self) -> int:
        return sum(len(k) for k in self._by_tenant.values())
