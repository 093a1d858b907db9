"""The names the daemon's resolver gave, per tenant: bounded, honouring TTLs."""

from __future__ import annotations

from ipferry.engine.names import MIN_TTL, NameCache

A, B, C = b"\xc6\x12\x00\x01", b"\xc6\x12\x00\x02", b"\xc6\x12\x00\x03"


def test_an_address_is_named_for_its_tenant_until_its_ttl_ends():
    cache = NameCache()
    cache.add("acme", "app.test", [(A, 300.0)], now=0.0)
    assert cache.lookup("acme", A, 299.0) == "app.test"
    assert cache.lookup("globex", A, 1.0) is None  # another tenant asked for nothing
    assert cache.lookup("acme", A, 300.0) is None and len(cache) == 0  # expired: forgotten
    cache.add("acme", "zero.test", [(B, 0.0)], now=10.0)  # a zero TTL still names what follows
    assert cache.lookup("acme", B, 10.0 + MIN_TTL - 1) == "zero.test"
    cache.add("acme", "other.test", [(B, 60.0)], now=11.0)  # the latest answer wins
    assert cache.lookup("acme", B, 12.0) == "other.test"


def test_the_cache_is_bounded_per_tenant_the_oldest_going_first():
    cache = NameCache(max_per_tenant=2)
    cache.add("acme", "a", [(A, 60.0), (B, 60.0)], now=0.0)
    cache.add("acme", "c", [(C, 60.0)], now=1.0)
    assert cache.lookup("acme", A, 2.0) is None
    assert cache.lookup("acme", B, 2.0) == "a" and cache.lookup("acme", C, 2.0) == "c"
    cache.add("globex", "a", [(A, 60.0)], now=2.0)  # (its own bound)
    assert len(cache) == 3
