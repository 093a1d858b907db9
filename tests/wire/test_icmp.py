"""Slow-path packet builders: checksums by full recomputation, fields read back by dpkt and parse."""

import doctest
import struct

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipferry.wire import icmp as icmp_module
from ipferry.wire.icmp import echo_message, icmp_packet, udp_packet, unreachable
from ipferry.wire.packet import Parsed, parse
from tests.wire.packets import PORT, UNICAST_ADDRS, icmp, l4_checksum_ok, pseudo_header, tcp, udp

C4, S4 = b"\x0a\0\0\x01", b"\xc6\x12\0\x01"
C6, S6 = bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("20010db8" + "00" * 11 + "01")


def read(raw: bytes) -> dpkt.Packet:
    """dpkt's view of an IP packet, its own header checksum verified for IPv4."""
    if raw[0] >> 4 == 6:
        ip = dpkt.ip6.IP6(raw)
        assert ip.plen == len(raw) - 40
        return ip
    assert dpkt.in_cksum(raw[:20]) == 0
    ip = dpkt.ip.IP(raw)
    assert ip.len == len(raw) and ip.df and not ip.mf and ip.offset == 0
    return ip


def test_docstring_examples():
    assert doctest.testmod(icmp_module).failed == 0


@given(UNICAST_ADDRS, PORT, PORT, st.binary(max_size=1400), st.integers(1, 255))
def test_udp_packet(addrs, sport, dport, payload, ttl):
    src, dst = addrs
    raw = udp_packet(src, sport, dst, dport, payload, ttl)
    ip = read(raw)
    l4 = 40 if len(src) == 16 else 20
    assert (ip.src, ip.dst, ip.p) == (src, dst, 17)
    assert (ip.hlim if len(src) == 16 else ip.ttl) == ttl
    assert (ip.data.sport, ip.data.dport, ip.data.ulen, ip.data.data) == (sport, dport, 8 + len(payload),
                                                                         payload)
    assert ip.data.sum != 0 and l4_checksum_ok(raw, l4, 17)
    ref = udp(src, dst, sport, dport, payload)[l4:]  # the datagram as dpkt builds it
    assert raw[l4:l4 + 6] + raw[l4 + 8:] == ref[:6] + ref[8:]
    assert int.from_bytes(raw[l4 + 6:l4 + 8], "big") % 0xFFFF == int.from_bytes(ref[6:8], "big") % 0xFFFF
    p = parse(raw)
    assert (p.sport, p.dport, raw[p.payload_offset:]) == (sport, dport, payload)


@pytest.mark.parametrize("src, dst", [(C4, S4), (C6, S6)])
def test_udp_checksum_zero_is_sent_as_ones(src, dst):
    # Choose the payload's one word so that the sum is 0xFFFF: the checksum computes to 0.
    base = pseudo_header(src, dst, 17, 10) + struct.pack("!HHHH", 1, 2, 10, 0)
    word = dpkt.in_cksum(base).to_bytes(2, "big")
    assert dpkt.in_cksum(base + word) == 0
    raw = udp_packet(src, 1, dst, 2, word)
    l4 = len(raw) - 10
    assert raw[l4 + 6:l4 + 8] == b"\xff\xff" and l4_checksum_ok(raw, l4, 17)


@given(UNICAST_ADDRS, PORT, PORT, st.binary(max_size=1000), st.sampled_from(["request", "reply"]))
def test_echo_packet(addrs, ident, seq, data, kind):
    src, dst = addrs
    v6 = len(src) == 16
    type_ = {"request": 128, "reply": 129}[kind] if v6 else {"request": 8, "reply": 0}[kind]
    raw = icmp_packet(src, dst, echo_message(type_, ident, seq, data))
    ip = read(raw)
    assert ip.p == (58 if v6 else 1) and (ip.src, ip.dst) == (src, dst)
    message = ip.data
    assert (message.type, message.code) == (type_, 0)
    assert (message.data.id, message.data.seq, message.data.data) == (ident, seq, data)
    assert l4_checksum_ok(raw, 40 if v6 else 20, ip.p)
    p = parse(raw)
    assert (p.icmp_type, p.sport, p.dport) == (type_, ident, 0)


@given(st.binary(min_size=8, max_size=200))
def test_icmp_packet_recomputes_any_checksum(message):
    for src, dst, proto, l4 in ((C4, S4, 1, 20), (C6, S6, 58, 40)):
        raw = icmp_packet(src, dst, bytearray(message))
        assert raw[l4:l4 + 2] == message[:2] and raw[l4 + 4:] == message[4:]
        assert l4_checksum_ok(raw, l4, proto)


REASONS4 = {"net": (3, 0), "host": (3, 1), "port": (3, 3), "admin": (3, 13), "too_big": (3, 4)}
REASONS6 = {"net": (1, 0), "admin": (1, 1), "host": (1, 3), "port": (1, 4), "too_big": (2, 0)}


@given(UNICAST_ADDRS, PORT, PORT, st.sampled_from(["tcp", "udp"]), st.binary(max_size=1500),
       st.sampled_from(sorted(REASONS4)), st.integers(68, 65535))
def test_unreachable(addrs, sport, dport, proto, payload, reason, mtu):
    client, server = addrs
    v6 = len(client) == 16
    build = tcp if proto == "tcp" else udp
    original = build(client, server, sport, dport, payload=payload)
    p = parse(original)
    raw = unreachable(original + b"\0padding", p, reason, mtu=mtu)  # link padding is not quoted
    ip = read(raw)
    cap = 1280 if v6 else 576
    assert len(raw) == min(cap, len(original) + (48 if v6 else 28))
    assert (ip.src, ip.dst) == (server, client)
    message = ip.data
    assert (message.type, message.code) == (REASONS6 if v6 else REASONS4)[reason]
    header = 40 if v6 else 20
    assert l4_checksum_ok(raw, header, 58 if v6 else 1)
    rest = raw[header + 4:header + 8]
    if reason != "too_big":
        assert rest == bytes(4)
    elif v6:
        assert int.from_bytes(rest, "big") == mtu == message.data.mtu
    else:
        assert rest == b"\0\0" + mtu.to_bytes(2, "big") and message.data.mtu == mtu
    assert raw[header + 8:] == original[:len(raw) - header - 8]
    # Our own parser finds the flow in it, as the client's stack would.
    back = parse(raw)
    assert isinstance(back, Parsed) and back.inner is not None
    assert (back.inner.src, back.inner.sport, back.inner.dst, back.inner.dport) == (client, sport, server,
                                                                                   dport)


def test_unreachable_source_and_refusals():
    original = udp(C4, S4, 40000, 53, b"query")
    p = parse(original)
    router = b"\xc0\0\x02\x01"
    raw = unreachable(original, p, "net", src=router)
    assert read(raw).src == router
    with pytest.raises(ValueError, match="unknown unreachable reason 'nope'"):
        unreachable(original, p, "nope")
    error = icmp(S4, C4, 3, 3, bytes(4) + original[:28])
    assert unreachable(error, parse(error), "admin") is None  # never an error about an error
    echo = icmp_packet(C6, S6, echo_message(128, 7, 1, b"ping"))
    answer = parse(unreachable(echo, parse(echo), "admin"))
    assert answer.icmp_type == 1 and answer.inner.icmp_type == 128 and answer.inner.sport == 7

