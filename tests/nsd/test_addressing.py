import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipferry.nsd.addressing import capacity, worker_block

V4 = ipaddress.IPv4Network("100.64.0.0/10")
V6 = ipaddress.IPv6Network("fd69:7066::/48")


def block(i, v4p=16, v6p=64):
    return worker_block(i, ipv4_pool=V4, ipv4_prefix=v4p, ipv6_pool=V6, ipv6_prefix=v6p)


def test_default_plan():
    b = block(2)
    assert b.tun_name == "ipf2"
    assert b.ipv4 == ipaddress.IPv4Network("100.66.0.0/16")
    assert str(b.ipv4_local) == "100.66.0.1"
    assert b.ipv6 == ipaddress.IPv6Network("fd69:7066:0:2::/64")
    assert capacity(V4, 16) == 64


@given(st.integers(8, 20), st.data())
def test_blocks_are_disjoint_and_inside_the_pool(v4p, data):
    n = capacity(V4, v4p) if v4p >= 10 else 0
    if n == 0:
        with pytest.raises(ValueError):
            block(0, v4p)
        return
    i = data.draw(st.integers(0, min(n, 4096) - 1))
    j = data.draw(st.integers(0, min(n, 4096) - 1))
    a, b = block(i, v4p), block(j, v4p)
    assert a.ipv4.subnet_of(V4) and a.ipv6.subnet_of(V6)
    assert a.ipv4_local in a.ipv4 and a.ipv6_local in a.ipv6
    assert (i == j) == a.ipv4.overlaps(b.ipv4) == a.ipv6.overlaps(b.ipv6)


def test_out_of_pool_index_is_refused():
    with pytest.raises(ValueError):
        block(64)
