"""NAT rewrite + incremental checksums against dpkt's full recomputation; the slot pool."""

import doctest
import ipaddress

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipferry.wire import nat
from ipferry.wire.nat import (
    IPV6_MAX_ADDRESSES,
    NatPool,
    NatSlot,
    SlotPoolExhausted,
    rewrite_ipv4_tcp,
    rewrite_ipv6_tcp,
    rewrite_tcp,
)
from ipferry.wire.packet import parse
from tests.wire.packets import ADDR6, PADN6, UNICAST4, l4_checksum_ok, tcp, with_ipv6_ext

ADDR = st.binary(min_size=4, max_size=4)
PORT = st.integers(0, 65535)


def build(src, dst, sport, dport, payload, opts=b"") -> bytes:
    tcp = dpkt.tcp.TCP(sport=sport, dport=dport, flags=dpkt.tcp.TH_ACK, data=payload, opts=opts,
                       seq=12345, ack=678)
    tcp.off = (20 + len(opts)) // 4
    ip = dpkt.ip.IP(src=src, dst=dst, p=dpkt.ip.IP_PROTO_TCP, data=tcp, ttl=64)
    ip.len = 20 + len(bytes(tcp))
    return bytes(ip)


@given(ADDR, ADDR, PORT, PORT, UNICAST4, UNICAST4, PORT, PORT, st.binary(max_size=1500),
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


def build6(src, dst, sport, dport, payload, opts=b"", hop_by_hop=False) -> bytes:
    raw = tcp(src, dst, sport, dport, dpkt.tcp.TH_ACK, payload, opts)
    return with_ipv6_ext(raw, [(0, PADN6)]) if hop_by_hop else raw


def tcp_checksum(packet: bytes | bytearray, l4: int) -> int:
    return (packet[l4 + 16] << 8) | packet[l4 + 17]


@given(ADDR6, ADDR6, PORT, PORT, ADDR6, ADDR6, PORT, PORT, st.binary(max_size=1500),
       st.sampled_from([b"", b"\x02\x04\x05\xa0\x01\x03\x03\x07"]), st.booleans())
def test_ipv6_incremental_rewrite_equals_full_recomputation(s, d, sp, dp, ns, nd, nsp, ndp, payload,
                                                            opts, hop_by_hop):
    pkt = bytearray(build6(s, d, sp, dp, payload, opts, hop_by_hop))
    l4 = 48 if hop_by_hop else 40
    rewrite_ipv6_tcp(pkt, l4, ns, nsp, nd, ndp)
    # The checksum verifies over the new pseudo-header (dpkt's sum judges)...
    assert l4_checksum_ok(bytes(pkt), l4, dpkt.ip.IP_PROTO_TCP)
    # ...and is the one a fresh build computes, as a one's-complement number (0 == 0xFFFF).
    expected = build6(ns, nd, nsp, ndp, payload, opts, hop_by_hop)
    assert tcp_checksum(pkt, l4) % 0xFFFF == tcp_checksum(expected, l4) % 0xFFFF
    assert pkt[:l4 + 16] + pkt[l4 + 18:] == expected[:l4 + 16] + expected[l4 + 18:]
    p = parse(bytes(pkt))
    assert (p.src, p.sport, p.dst, p.dport, p.ihl) == (ns, nsp, nd, ndp, l4)


def test_rewrite_tcp_dispatches_on_the_version():
    for client, server, slot, local in ((b"\x0a\0\0\x02", b"\xc6\x12\0\x01", b"\x64\x40\0\x02",
                                         b"\x64\x40\0\x01"),
                                        (bytes.fromhex("fd00" + "00" * 13 + "02"),
                                         bytes.fromhex("20010db8" + "00" * 11 + "01"),
                                         bytes.fromhex("fd64" + "00" * 13 + "02"),
                                         bytes.fromhex("fd64" + "00" * 13 + "01"))):
        original = tcp(client, server, 40000, 80, dpkt.tcp.TH_ACK, b"GET / HTTP/1.0\r\n\r\n")
        pkt = bytearray(original)
        p = parse(original)
        rewrite_tcp(pkt, p, slot, 1024, local, 1)
        assert l4_checksum_ok(bytes(pkt), p.ihl, dpkt.ip.IP_PROTO_TCP)
        q = parse(bytes(pkt))
        assert (q.src, q.sport, q.dst, q.dport) == (slot, 1024, local, 1)
        rewrite_tcp(pkt, q, client, 40000, server, 80)
        assert tcp_checksum(pkt, p.ihl) % 0xFFFF == tcp_checksum(original, p.ihl) % 0xFFFF


def test_ipv6_pool_over_a_64_takes_its_first_hosts_and_gives_distinct_slots():
    block = ipaddress.IPv6Network("fd64:0:0:7::/64")
    listener = ipaddress.IPv6Address("fd64:0:0:7::1")
    pool = NatPool(block, {listener}, quarantine=60)  # never walks the 2**64 hosts
    assert pool.capacity == IPV6_MAX_ADDRESSES * 64512
    slots = [pool.claim(now=0) for _ in range(5000)]
    assert len(set(slots)) == len(slots)
    addresses = {ipaddress.IPv6Address(s.address) for s in slots}
    assert len(addresses) == IPV6_MAX_ADDRESSES and listener not in addresses
    assert all(a in block for a in addresses)
    assert max(addresses) == block[IPV6_MAX_ADDRESSES + 1]  # the first hosts, the listener's out


def test_pool_address_cap():
    block = ipaddress.IPv6Network("fd64::/64")
    reserved = {ipaddress.IPv6Address("fd64::1"), ipaddress.IPv6Address("fd64::3")}
    pool = NatPool(block, reserved, max_addresses=2)
    assert sorted(pool._addresses) == [ipaddress.IPv6Address(a).packed for a in ("fd64::2", "fd64::4")]
    v4 = NatPool(ipaddress.IPv4Network("100.64.0.0/16"), {ipaddress.IPv4Address("100.64.0.1")})
    assert len(v4._addresses) == 65533, "an IPv4 block is used whole by default"
    capped = NatPool(ipaddress.IPv4Network("100.64.0.0/16"), set(), max_addresses=10)
    assert capped.capacity == 10 * 64512


def test_slot_names():
    assert str(NatSlot(bytes.fromhex("fd64" + "00" * 13 + "02"), 1024)) == "[fd64::2]:1024"
    assert str(NatSlot(b"\x64\x40\0\x02", 1024)) == "100.64.0.2:1024"


def test_docstring_examples():
    assert doctest.testmod(nat).failed == 0
