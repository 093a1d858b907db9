"""The fast-path parser against dpkt-built packets, and fuzzed garbage that must never raise."""


import dpkt
from hypothesis import given
from hypothesis import strategies as st

from ipferry.worker.packet import TCP_ACK, TCP_SYN, Drop, Parsed, parse

ADDR = st.binary(min_size=4, max_size=4)
PORT = st.integers(0, 65535)


def tcp_packet(src=b"\x0a\0\0\x01", dst=b"\xc6\x12\0\x01", sport=40000, dport=80,
               flags=dpkt.tcp.TH_SYN, payload=b"", opts=b"") -> bytes:
    tcp = dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags, data=payload, opts=opts)
    tcp.off = (20 + len(opts)) // 4
    ip = dpkt.ip.IP(src=src, dst=dst, p=dpkt.ip.IP_PROTO_TCP, data=tcp, ttl=64)
    ip.len = 20 + len(bytes(tcp))
    return bytes(ip)


@given(ADDR, ADDR, PORT, PORT, st.binary(max_size=300))
def test_tcp_fields_match_dpkt(src, dst, sport, dport, payload):
    raw = tcp_packet(src, dst, sport, dport, dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK, payload)
    p = parse(raw)
    assert isinstance(p, Parsed)
    assert (p.src, p.dst, p.sport, p.dport) == (src, dst, sport, dport)
    assert p.tcp_flags == TCP_SYN | TCP_ACK
    assert raw[p.payload_offset:p.total_length] == payload


def test_tcp_options_move_the_payload():
    raw = tcp_packet(opts=b"\x02\x04\xff\xd7\x01\x01\x04\x02", payload=b"hello")
    p = parse(raw)
    assert p.payload_offset == 48 and raw[p.payload_offset:] == b"hello"
    assert p.tcp_flags == TCP_SYN and not p.tcp_flags & TCP_ACK


def test_drop_reasons():
    syn = tcp_packet()
    assert parse(b"") is Drop.TRUNCATED
    assert parse(syn[:19]) is Drop.TRUNCATED
    assert parse(b"\x60" + bytes(39)) is Drop.IPV6_NOT_YET
    assert parse(b"\x50" + syn[1:]) is Drop.BAD_VERSION
    assert parse(b"\x44" + syn[1:]) is Drop.BAD_HEADER_LENGTH
    assert parse(syn[:30]) is Drop.TRUNCATED  # total length says more than arrived
    assert parse(syn[:2] + (10).to_bytes(2, "big") + syn[4:]) is Drop.BAD_TOTAL_LENGTH
    assert parse(syn[:6] + b"\x20\x00" + syn[8:]) is Drop.FRAGMENT  # MF
    assert parse(syn[:6] + b"\x00\x10" + syn[8:]) is Drop.FRAGMENT  # offset
    assert parse(syn[:6] + b"\x40\x00" + syn[8:]) is not Drop.FRAGMENT  # DF alone is fine
    udp = bytes(dpkt.ip.IP(src=b"\x01" * 4, dst=b"\x02" * 4, p=17,
                           data=dpkt.udp.UDP(sport=1, dport=2, data=b"x")))
    assert parse(udp) is Drop.UNSUPPORTED_PROTOCOL
    bad_off = bytearray(syn)
    bad_off[20 + 12] = 0x40  # data offset 16 bytes < 20
    assert parse(bytes(bad_off)) is Drop.BAD_TCP_HEADER


@given(st.binary(max_size=120))
def test_garbage_never_raises(data):
    assert isinstance(parse(data), Parsed | Drop)


@given(st.binary(min_size=40, max_size=80), st.integers(0, 79))
def test_truncations_and_bit_flips_never_raise(tail, cut):
    raw = bytearray(tcp_packet(payload=tail))
    raw[cut % len(raw)] ^= 0xFF
    for n in (cut, len(raw)):
        assert isinstance(parse(bytes(raw[:n])), Parsed | Drop)
