"""The fast-path parser against dpkt-built packets, and fuzzed garbage that must never raise."""

import doctest

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipferry.wire import packet as packet_module
from ipferry.wire.packet import TCP_ACK, TCP_SYN, Drop, Parsed, parse
from tests.wire.packets import (
    ADDRS,
    PADN6,
    PORT,
    UNICAST4,
    UNICAST_ADDRS,
    echo,
    icmp,
    tcp,
    udp,
    with_ipv6_ext,
)

C4, S4 = b"\x0a\0\0\x01", b"\xc6\x12\0\x01"  # client, server
C6, S6 = bytes.fromhex("fd000000000000000000000000000001"), bytes.fromhex("20010db8" + "00" * 11 + "01")


def test_docstring_examples():
    assert doctest.testmod(packet_module).failed == 0


@given(ADDRS, PORT, PORT, st.integers(0, 2**32 - 1), st.binary(max_size=300))
def test_tcp_fields_match_dpkt(addrs, sport, dport, seq, payload):
    src, dst = addrs
    raw = tcp(src, dst, sport, dport, dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK, payload, seq=seq)
    ref = (dpkt.ip6.IP6 if len(src) == 16 else dpkt.ip.IP)(raw)
    p = parse(raw)
    assert isinstance(p, Parsed)
    assert (p.version, p.protocol, p.src, p.dst) == (ref.v, 6, ref.src, ref.dst)
    assert (p.sport, p.dport, p.seq) == (ref.data.sport, ref.data.dport, ref.data.seq)
    assert p.tcp_flags == TCP_SYN | TCP_ACK
    assert p.ihl == (40 if len(src) == 16 else 20) and p.total_length == len(raw)
    assert raw[p.payload_offset:p.total_length] == payload
    assert (p.icmp_type, p.icmp_code, p.inner) == (-1, -1, None)


def test_tcp_fast_path_builds_the_same_value_as_the_constructor():
    for p, expected in ((parse(tcp(C4, S4, payload=b"x")),
                         Parsed(6, C4, S4, 40000, 80, 20, 41, TCP_SYN, 40, 12345)),
                        (parse(tcp(C6, S6, payload=b"x")),
                         Parsed(6, C6, S6, 40000, 80, 40, 61, TCP_SYN, 60, 12345, version=6))):
        assert p == expected and hash(p) == hash(expected)
        assert [getattr(p, f) for f in Parsed.__slots__] == [getattr(expected, f) for f in Parsed.__slots__]


def test_udp_fast_path_builds_the_same_value_as_the_constructor():
    for p, expected in ((parse(udp(C4, S4, 5000, 53, b"query")),
                         Parsed(17, C4, S4, 5000, 53, 20, 33, 0, 28, 0)),
                        (parse(udp(C6, S6, 5000, 53, b"query")),
                         Parsed(17, C6, S6, 5000, 53, 40, 53, 0, 48, 0, version=6))):
        assert p == expected and hash(p) == hash(expected)
        assert [getattr(p, f) for f in Parsed.__slots__] == [getattr(expected, f) for f in Parsed.__slots__]


def test_tcp_options_move_the_payload():
    raw = tcp(C4, S4, opts=b"\x02\x04\xff\xd7\x01\x01\x04\x02", payload=b"hello")
    p = parse(raw)
    assert p.payload_offset == 48 and raw[p.payload_offset:] == b"hello"
    assert p.tcp_flags == TCP_SYN and not p.tcp_flags & TCP_ACK


@given(ADDRS, PORT, PORT, st.binary(max_size=300))
def test_udp_fields_match_dpkt(addrs, sport, dport, payload):
    src, dst = addrs
    raw = udp(src, dst, sport, dport, payload)
    ref = (dpkt.ip6.IP6 if len(src) == 16 else dpkt.ip.IP)(raw).data
    p = parse(raw)
    assert isinstance(p, Parsed)
    assert (p.protocol, p.src, p.dst, p.sport, p.dport) == (17, src, dst, ref.sport, ref.dport)
    assert p.payload_offset == p.ihl + 8 and raw[p.payload_offset:p.total_length] == ref.data
    assert p.tcp_flags == 0 and p.inner is None


def test_udp_length_must_fit():
    raw = bytearray(udp(C4, S4, payload=b"abcd"))
    raw[24:26] = (7).to_bytes(2, "big")
    assert parse(bytes(raw)) is Drop.BAD_UDP_HEADER
    raw[24:26] = (13).to_bytes(2, "big")  # one more than the IP packet holds
    assert parse(bytes(raw)) is Drop.BAD_UDP_HEADER
    raw[24:26] = (10).to_bytes(2, "big")  # shorter than the IP payload: trailing bytes are fine
    assert isinstance(parse(bytes(raw)), Parsed)
    assert parse(udp(C6, S6)[:45]) is Drop.TRUNCATED


@given(ADDRS, PORT, PORT, st.binary(max_size=100), st.booleans())
def test_icmp_echo_matches_dpkt(addrs, ident, seq, data, reply):
    src, dst = addrs
    raw = echo(src, dst, ident, seq, data, reply)
    v6 = len(src) == 16
    ref = dpkt.ip6.IP6(raw).data if v6 else dpkt.ip.IP(raw).data
    p = parse(raw)
    assert isinstance(p, Parsed)
    assert p.protocol == (58 if v6 else 1) and p.version == (6 if v6 else 4)
    assert (p.icmp_type, p.icmp_code) == (ref.type, ref.code)
    assert (p.sport, p.dport) == (ref.data.id, 0)
    assert p.payload_offset == p.ihl + 8 and raw[p.payload_offset:] == data


def embedded(packet: bytes, keep: int | None) -> bytes:
    """What a router quotes: the IP header and ``keep`` bytes of the L4 header (None: all)."""
    l4 = 40 if packet[0] >> 4 == 6 else 20
    return packet if keep is None else packet[:l4 + keep]


@given(UNICAST_ADDRS, PORT, PORT, st.sampled_from(["tcp", "udp", "echo"]),
       st.sampled_from([8, 13, 20, None]))
def test_icmp_error_exposes_the_embedded_flow(addrs, sport, dport, proto, keep):
    client, server = addrs
    v6 = len(client) == 16
    original = {"tcp": tcp(client, server, sport, dport, payload=b"x" * 30),
                "udp": udp(client, server, sport, dport, b"query"),
                "echo": echo(client, server, sport, 1, b"ping")}[proto]
    quote = embedded(original, keep)
    router = bytes.fromhex("20010db8ffff" + "00" * 9 + "01") if v6 else b"\xc0\x00\x02\x01"
    if v6:
        raw = icmp(router, client, 1, 4, dpkt.icmp6.ICMP6.Unreach(data=quote))
    else:
        raw = icmp(router, client, 3, 3, dpkt.icmp.ICMP.Unreach(data=quote))
    p = parse(raw)
    assert isinstance(p, Parsed)
    assert (p.icmp_type, p.icmp_code) == ((1, 4) if v6 else (3, 3))
    assert (p.sport, p.dport, p.src, p.dst) == (0, 0, router, client)
    q = p.inner
    assert q is not None and q.inner is None and q.version == p.version
    expected_port = 0 if proto == "echo" else dport
    assert (q.src, q.sport, q.dst, q.dport) == (client, sport, server, expected_port)
    assert q.total_length == len(original)  # what its header claims, not what was quoted
    assert q.protocol == parse(original).protocol


def test_icmp_error_types():
    quote = tcp(C4, S4)[:28]
    for type_, code in ((3, 4), (11, 0), (12, 0)):
        p = parse(icmp(S4, C4, type_, code, b"\0\0\x05\xdc" + quote))
        assert p.icmp_type == type_ and p.inner.sport == 40000
    quote6 = tcp(C6, S6)[:48]
    for type_ in (1, 2, 3, 4):
        p = parse(icmp(S6, C6, type_, 0, b"\0\0\x05\x00" + quote6))
        assert p.icmp_type == type_ and p.inner.dport == 80


def test_bad_icmp_errors():
    quote = tcp(C4, S4)
    assert parse(icmp(S4, C4, 3, 1, bytes(4) + quote[:27])) is Drop.BAD_ICMP  # 7 bytes of TCP
    assert parse(icmp(S4, C4, 3, 1, bytes(4) + quote[:19])) is Drop.BAD_ICMP
    assert parse(icmp(S4, C4, 3, 1, bytes(4))) is Drop.BAD_ICMP  # nothing embedded
    assert parse(icmp(S4, C4, 3, 1, bytes(4) + tcp(C6, S6)[:48])) is Drop.BAD_ICMP  # v6 in v4
    error = icmp(C4, S4, 3, 3, bytes(4) + quote[:28])
    assert parse(icmp(S4, C4, 11, 0, bytes(4) + error)) is Drop.BAD_ICMP  # an error about one
    error6 = icmp(C6, S6, 1, 4, bytes(4) + tcp(C6, S6)[:48])
    assert parse(icmp(S6, C6, 2, 0, b"\0\0\x05\0" + error6)) is Drop.BAD_ICMP
    fragment = bytearray(quote[:28])
    fragment[6] = 0x20  # MF
    assert parse(icmp(S4, C4, 3, 1, bytes(4) + bytes(fragment))) is Drop.BAD_ICMP


def test_unsupported_icmp():
    assert parse(icmp(S4, C4, 13, 0, bytes(16))) is Drop.ICMP_UNSUPPORTED  # timestamp
    assert parse(icmp(S4, C4, 5, 0, bytes(4))) is Drop.ICMP_UNSUPPORTED  # redirect
    assert parse(icmp(S6, C6, 135, 0, bytes(20))) is Drop.ICMP_UNSUPPORTED  # neighbour solicitation
    assert parse(icmp(S6, C6, 133, 0, bytes(4))) is Drop.ICMP_UNSUPPORTED  # router solicitation
    assert parse(icmp(S4, C4, 8, 0)[:27]) is Drop.TRUNCATED
    icmp6_in_ipv4 = bytes(dpkt.ip.IP(src=C4, dst=S4, p=58, data=bytes(8)))
    icmp_in_ipv6 = bytes(dpkt.ip6.IP6(src=C6, dst=S6, nxt=1, plen=8, data=bytes(8)))
    assert parse(icmp6_in_ipv4) is Drop.UNSUPPORTED_PROTOCOL
    assert parse(icmp_in_ipv6) is Drop.UNSUPPORTED_PROTOCOL


def test_multicast_and_broadcast():
    mld_report = bytes(dpkt.ip6.IP6(src=C6, dst=bytes.fromhex("ff020000000000000000000000000016"),
                                    nxt=58, plen=8, data=b"\x8f" + bytes(7)))
    assert parse(mld_report) is Drop.MULTICAST
    assert parse(udp(bytes.fromhex("ff05" + "00" * 13 + "01"), S6)) is Drop.MULTICAST
    for dst in (b"\xe0\0\0\x16", b"\xef\xff\xff\xfa", b"\xff\xff\xff\xff"):
        assert parse(udp(C4, dst)) is Drop.MULTICAST
    assert isinstance(parse(udp(C4, b"\xf0\0\0\x01")), Parsed)  # 240/4 is reserved, not multicast
    assert isinstance(parse(udp(C4, b"\xdf\xff\xff\xff")), Parsed)


HBH, ROUTING, FRAGMENT, DSTOPTS = 0, 43, 44, 60
ROUTING_DONE = b"\x04\x00" + bytes(4)  # type 4 (segment routing), segments left 0
ROUTING_PENDING = b"\x04\x01" + bytes(4)


@given(PORT, PORT, st.binary(max_size=100))
def test_extension_headers_are_walked(sport, dport, payload):
    plain = tcp(C6, S6, sport, dport, payload=payload)
    raw = with_ipv6_ext(plain, [(HBH, PADN6), (DSTOPTS, PADN6 + bytes(8))])
    ref = dpkt.ip6.IP6(raw)
    p = parse(raw)
    assert isinstance(p, Parsed)
    assert p.ihl == 40 + 8 + 16 and p.total_length == len(raw)
    assert (p.protocol, p.sport, p.dport) == (ref.p, ref.data.sport, ref.data.dport)
    assert raw[p.payload_offset:] == payload


def test_extension_header_drops():
    plain = tcp(C6, S6)
    four = [(HBH, PADN6), (DSTOPTS, PADN6), (ROUTING, ROUTING_DONE), (DSTOPTS, PADN6)]
    assert parse(with_ipv6_ext(plain, four)).sport == 40000
    assert parse(with_ipv6_ext(plain, four + [(DSTOPTS, PADN6)])) is Drop.IPV6_EXT_HEADER
    assert parse(with_ipv6_ext(plain, [(ROUTING, ROUTING_PENDING)])) is Drop.IPV6_EXT_HEADER
    assert parse(with_ipv6_ext(plain, [(FRAGMENT, bytes(6))])) is Drop.FRAGMENT
    assert parse(with_ipv6_ext(plain, [(HBH, PADN6), (FRAGMENT, bytes(6))])) is Drop.FRAGMENT
    assert parse(with_ipv6_ext(plain, [(DSTOPTS, PADN6), (HBH, PADN6)])) is Drop.IPV6_EXT_HEADER
    for nxt in (50, 51, 135, 139, 140, 253, 254):
        assert parse(with_ipv6_ext(plain, [(nxt, PADN6)])) is Drop.IPV6_EXT_HEADER, nxt
    no_next = bytearray(plain[:40])
    no_next[4:7] = b"\0\0\x3b"  # 59: no next header
    assert parse(bytes(no_next)) is Drop.UNSUPPORTED_PROTOCOL
    gre = bytes(dpkt.ip6.IP6(src=C6, dst=S6, nxt=47, plen=4, data=bytes(4)))
    assert parse(gre) is Drop.UNSUPPORTED_PROTOCOL
    # A header whose length runs past the packet, or past the payload length, is never read.
    long_hbh = bytearray(with_ipv6_ext(plain, [(HBH, PADN6)]))
    long_hbh[41] = 200
    assert parse(bytes(long_hbh)) is Drop.TRUNCATED
    assert parse(with_ipv6_ext(plain, [(HBH, PADN6)])[:46]) is Drop.TRUNCATED


def test_drop_reasons():
    syn = tcp(C4, S4)
    assert parse(b"") is Drop.TRUNCATED
    assert parse(syn[:19]) is Drop.TRUNCATED
    assert parse(b"\x60" + bytes(38)) is Drop.TRUNCATED
    assert parse(tcp(C6, S6)[:59]) is Drop.TRUNCATED  # payload length says more than arrived
    assert parse(b"\x50" + syn[1:]) is Drop.BAD_VERSION
    assert parse(b"\x44" + syn[1:]) is Drop.BAD_HEADER_LENGTH
    assert parse(syn[:30]) is Drop.TRUNCATED  # total length says more than arrived
    assert parse(syn[:2] + (10).to_bytes(2, "big") + syn[4:]) is Drop.BAD_TOTAL_LENGTH
    assert parse(syn[:6] + b"\x20\x00" + syn[8:]) is Drop.FRAGMENT  # MF
    assert parse(syn[:6] + b"\x00\x10" + syn[8:]) is Drop.FRAGMENT  # offset
    assert parse(syn[:6] + b"\x40\x00" + syn[8:]) is not Drop.FRAGMENT  # DF alone is fine
    gre = bytes(dpkt.ip.IP(src=C4, dst=S4, p=47, data=bytes(4)))
    assert parse(gre) is Drop.UNSUPPORTED_PROTOCOL
    for raw, l4 in ((bytearray(syn), 20), (bytearray(tcp(C6, S6)), 40)):
        raw[l4 + 12] = 0x40  # data offset 16 bytes < 20
        assert parse(bytes(raw)) is Drop.BAD_TCP_HEADER
        raw[l4 + 12] = 0x60  # 24 bytes: more than the packet
        assert parse(bytes(raw)) is Drop.BAD_TCP_HEADER


@pytest.mark.parametrize("make", [bytes, bytearray, memoryview])
def test_buffer_types(make):
    for raw in (tcp(C4, S4), tcp(C6, S6), udp(C6, S6), echo(C4, S4, 1, 2, b"")):
        p = parse(make(raw))
        assert p == parse(raw) and type(p.src) is bytes


@given(st.binary(max_size=120))
def test_garbage_never_raises(data):
    assert isinstance(parse(data), Parsed | Drop)


@given(st.sampled_from([b"\x45", b"\x46", b"\x60", b"\x6f"]), st.binary(max_size=120))
def test_ip_looking_garbage_never_raises(first, data):
    assert isinstance(parse(first + data), Parsed | Drop)


def sample_packets() -> list[bytes]:
    quote4, quote6 = tcp(C4, S4, payload=b"data")[:28], udp(C6, S6, payload=b"q")[:48]
    return [
        tcp(C4, S4, payload=b"x" * 40),
        udp(C4, S4, payload=b"x" * 40),
        echo(C4, S4, 7, 1, b"x" * 40),
        icmp(S4, C4, 3, 3, bytes(4) + quote4),
        tcp(C6, S6, payload=b"x" * 40),
        udp(C6, S6, payload=b"x" * 40),
        echo(C6, S6, 7, 1, b"x" * 40),
        icmp(S6, C6, 1, 4, bytes(4) + quote6),
        with_ipv6_ext(tcp(C6, S6, payload=b"x" * 40), [(HBH, PADN6), (ROUTING, ROUTING_DONE)]),
    ]


@given(st.sampled_from(sample_packets()), st.integers(0, 200), st.integers(0, 255),
       st.integers(0, 200))
def test_truncations_and_byte_changes_never_raise(raw, at, value, cut):
    mutated = bytearray(raw)
    mutated[at % len(raw)] = value
    for n in (cut, len(raw)):
        assert isinstance(parse(bytes(mutated[:n])), Parsed | Drop)
    assert isinstance(parse(raw[:cut]), Parsed | Drop)


@given(UNICAST4, UNICAST4, st.integers(0, 65535), st.binary(max_size=60))
def test_ipv4_addresses_round_trip(src, dst, sport, payload):
    p = parse(udp(src, dst, sport, 9, payload))
    assert (p.src, p.dst, p.version) == (src, dst, 4)


# (drawn, not filtered: few of all addresses are multicast)
MULTICAST_OR_BROADCAST4 = st.one_of(
    st.builds(lambda first, rest: bytes([first]) + rest, st.integers(224, 239),
              st.binary(min_size=3, max_size=3)),
    st.just(b"\xff" * 4))


@given(MULTICAST_OR_BROADCAST4, UNICAST4)
def test_ipv4_multicast_or_broadcast_source_is_dropped(src, dst):
    """No host sends from a group or the broadcast address (RFC 1122 3.2.1.3): such a packet
    is dropped before anything is answered."""
    assert parse(udp(src, dst, 1, 9, b"x")) is Drop.MULTICAST
    assert parse(tcp(src, dst)) is Drop.MULTICAST
