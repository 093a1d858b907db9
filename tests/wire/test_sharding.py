from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from ipferry.wire.sharding import flow_hash, owner

V4 = st.binary(min_size=4, max_size=4)
V6 = st.binary(min_size=16, max_size=16)
PORT = st.integers(0, 65535)


@given(st.sampled_from([6, 17, 1]), st.one_of(st.tuples(V4, V4), st.tuples(V6, V6)), PORT, PORT)
def test_both_directions_have_one_owner(proto, addrs, sport, dport):
    src, dst = addrs
    h = flow_hash(proto, src, sport, dst, dport)
    assert h == flow_hash(proto, dst, dport, src, sport)
    assert 0 <= h <= 0xFFFFFFFF
    for n in (1, 2, 3, 4):
        assert owner(proto, src, sport, dst, dport, n) == owner(proto, dst, dport, src, sport, n)


def test_client_ports_spread_evenly_over_workers():
    # One client, one server, 4000 source ports: what a busy tunnel looks like.
    counts = Counter(owner(6, b"\x0a\0\0\x02", p, b"\xc6\x12\0\x01", 80, 4)
                     for p in range(40000, 44000))
    assert set(counts) == {0, 1, 2, 3}
    assert max(counts.values()) < 1.15 * min(counts.values()), counts
