"""NAT rewrite + incremental checksums against dpkt's full recomputation; the slot pool."""

import ipaddress

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipferry.worker.nat import NatPool, SlotPoolExhausted, rewrite_ipv4_tcp
from ipferry.worker.packet import parse

ADDR = st.binary(min_size=4, max_size=4)
PORT = st.integers(0, 65535)


def build(src, dst, sport, dport, payload, opts=b"") -> bytes:
    tcp = dpkt.tcp.TCP(sport=sport, dport=dport, flags=dpkt.tcp.TH_ACK, data=payload, opts=opts,
                       seq=12345, ack=678)
    tcp.off = (20 + len(opts)) // 4
    ip = dpkt.ip.IP(src=src, dst=dst, p=dpkt.ip.IP_PROTO_TCP, data=tcp, ttl=64)
    ip.len = 20 + len(bytes(tcp))
    return bytes(ip)


@given(ADDR, ADDR, PORT, PORT, ADDR, ADDR, PORT, PORT, st.binary(max_size=1500),
       st.sampled_from([b"", b"\x01\x01\x01\x01", b"\x02\x04\x05\xb4\x01\x03\x03\x07"]))
def test_incremental_rewrite_equals_full_recomputation(s, d, sp, dp, ns, nd, nsp, ndp, payload,
                                                       opts):
    pkt = bytearray(build(s, d, sp, dp, payload, opts))
    rewrite_ipv4_tcp(pkt, 20, ns, nsp, nd, ndp)
    expected = build(ns, nd, nsp, ndp, payload, opts)  # dpkt computes both checksums afresh
    got_ip = (pkt[10] << 8) | pkt[11]
    exp_ip = (expected[10] << 8) | expected[11]
    got_tcp = (pkt[36] << 8) | pkt[37]
    exp_tcp = (expected[36] << 8) | expected[37]
    # Byte-identical but for the checksums, which must be equal as one's-complement numbers.
    assert pkt[:10] + pkt[12:36] + pkt[38:] == expected[:10] + expected[12:36] + expected[38:]
    assert got_ip % 0xFFFF == exp_ip % 0xFFFF
    assert got_tcp % 0xFFFF == exp_tcp % 0xFFFF
    p = parse(bytes(pkt))
    assert (p.src, p.sport, p.dst, p.dport) == (ns, nsp, nd, ndp)


def test_rewrite_then_back_restores_the_packet():
    original = build(b"\x0a\0\0\x02", b"\xc6\x12\0\x01", 40000, 80, b"GET / HTTP/1.0\r\n\r\n")
    pkt = bytearray(original)
    rewrite_ipv4_tcp(pkt, 20, b"\x64\x40\x00\x02", 1024, b"\x64\x40\x00\x01", 1)
    rewrite_ipv4_tcp(pkt, 20, b"\x0a\0\0\x02", 40000, b"\xc6\x12\0\x01", 80)
    assert bytes(pkt)[:10] + bytes(pkt)[12:] == original[:10] + original[12:]


def test_pool_fresh_first_then_quarantined_slots():
    block = ipaddress.IPv4Network("100.64.0.0/30")  # hosts .1 and .2; .1 is the listener's
    pool = NatPool(block, {ipaddress.IPv4Address("100.64.0.1")}, quarantine=60)
    pool._start = 0  # deterministic for the test
    assert pool.capacity == 64512
    a = pool.claim(now=0)
    b = pool.claim(now=0)
    assert str(a) == "100.64.0.2:1024" and str(b) == "100.64.0.2:1025"
    pool.release(a, now=10)
    assert pool.in_use == 1
    assert pool.claim(now=20) != a, "quarantined"
    assert pool.claim(now=71) == a, "out of quarantine"


def test_pool_exhaustion_is_an_error_not_a_reuse():
    block = ipaddress.IPv4Network("100.64.0.0/30")
    pool = NatPool(block, {ipaddress.IPv4Address("100.64.0.1")})
    pool._next_fresh = pool.capacity - 1
    pool.claim(now=0)
    with pytest.raises(SlotPoolExhausted):
        pool.claim(now=0)
