"""Software GSO and checksum completion: superframes cut as the kernel would, sums whole."""

import struct

import dpkt
from hypothesis import given, settings
from hypothesis import strategies as st

from ipferry.wire import vnet
from ipferry.wire.checksum import ones_sum
from ipferry.wire.nat import rewrite_tcp
from ipferry.wire.packet import parse

SRC4, DST4 = b"\x0a\0\0\x01", b"\xc6\x12\0\x01"
SRC6, DST6 = b"\xfd\x98" + bytes(13) + b"\x01", b"\xfd\x18" + bytes(13) + b"\x01"


def superframe(v6: bool, payload: bytes, flags: int) -> tuple[bytearray, int]:
    """A TCP packet whose checksum field holds only the pseudo-header sum, as TSO leaves it."""
    tcp = dpkt.tcp.TCP(sport=9000, dport=40000, seq=4_294_967_000, ack=7, flags=flags,
                       win=500, data=payload)
    raw_tcp = bytearray(bytes(tcp))
    if v6:
        ip = bytearray(bytes(dpkt.ip6.IP6(src=SRC6, dst=DST6, nxt=6, hlim=64, plen=len(raw_tcp))))
        ip = ip[:40]
        pseudo = SRC6 + DST6 + len(raw_tcp).to_bytes(4, "big") + b"\0\0\0\6"
    else:
        ip = bytearray(bytes(dpkt.ip.IP(src=SRC4, dst=DST4, p=6, ttl=64, id=100, df=1)))[:20]
        ip[2:4] = (20 + len(raw_tcp)).to_bytes(2, "big")  # the superframe's whole length
        ip[10:12] = b"\0\0"
        ip[10:12] = (~ones_sum(bytes(ip)) & 0xFFFF).to_bytes(2, "big")
        pseudo = SRC4 + DST4 + b"\0\6" + len(raw_tcp).to_bytes(2, "big")
    raw_tcp[16:18] = (ones_sum(pseudo) % 0xFFFF).to_bytes(2, "big")  # partial: not complemented
    return ip + raw_tcp, len(ip)


@settings(max_examples=60, deadline=None)
@given(st.booleans(), st.binary(min_size=1, max_size=9000), st.integers(500, 3000),
       st.sampled_from([dpkt.tcp.TH_ACK, dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH | dpkt.tcp.TH_FIN]))
def test_segments_carry_the_payload_in_order_with_valid_checksums(v6, payload, mss, flags):
    packet, l4 = superframe(v6, payload, flags)
    header = struct.pack("<BBHHHH", vnet.NEEDS_CSUM, 4 if v6 else 1, l4 + 20, mss, l4, 16)
    segments = vnet.segment(packet, header)
    assert len(segments) == -(-len(payload) // mss)
    joined = b""
    for i, seg in enumerate(segments):
        ip = dpkt.ip6.IP6(bytes(seg)) if v6 else dpkt.ip.IP(bytes(seg))
        tcp = ip.data
        if not v6:
            assert ip.len == len(seg) and ip.id == (100 + i) & 0xFFFF
            assert ones_sum(bytes(seg[:20])) in (0xFFFF, 0)  # header checksum verifies
        pseudo = (bytes(seg[8:40]) + (len(seg) - l4).to_bytes(4, "big") + b"\0\0\0\6" if v6
                  else bytes(seg[12:20]) + b"\0\6" + (len(seg) - l4).to_bytes(2, "big"))
        assert ones_sum(bytes(seg[l4:]), ones_sum(pseudo)) == 0xFFFF  # TCP checksum verifies
        assert tcp.seq == (4_294_967_000 + len(joined)) & 0xFFFFFFFF
        last = i == len(segments) - 1
        assert bool(tcp.flags & dpkt.tcp.TH_FIN) == (last and bool(flags & dpkt.tcp.TH_FIN))
        joined += tcp.data
    assert joined == payload


def test_a_plain_partial_packet_is_completed_alone():
    packet, l4 = superframe(False, b"hello", dpkt.tcp.TH_ACK)
    header = struct.pack("<BBHHHH", vnet.NEEDS_CSUM, 0, 0, 0, l4, 16)
    [seg] = vnet.segment(packet, header)
    pseudo = SRC4 + DST4 + b"\0\6" + (len(seg) - l4).to_bytes(2, "big")
    assert ones_sum(bytes(seg[l4:]), ones_sum(pseudo)) == 0xFFFF


@settings(max_examples=60, deadline=None)
@given(st.booleans(), st.binary(min_size=1, max_size=4000), st.binary(min_size=4, max_size=4),
       st.binary(min_size=16, max_size=16), st.integers(1, 65535))
def test_nat_on_a_partial_checksum_then_segmenting_gives_valid_packets(v6, payload, a4, a6,
                                                                       port):
    packet, l4 = superframe(v6, payload, dpkt.tcp.TH_ACK)
    p = parse(bytes(packet))
    addr = a6 if v6 else a4
    rewrite_tcp(packet, p, addr, port, p.dst, p.dport, partial=True)
    header = struct.pack("<BBHHHH", vnet.NEEDS_CSUM, 4 if v6 else 1, l4 + 20, 1000, l4, 16)
    for seg in vnet.segment(packet, header):
        pseudo = (bytes(seg[8:40]) + (len(seg) - l4).to_bytes(4, "big") + b"\0\0\0\6" if v6
                  else bytes(seg[12:20]) + b"\0\6" + (len(seg) - l4).to_bytes(2, "big"))
        assert bytes(seg[8:24] if v6 else seg[12:16]) == addr
        assert ones_sum(bytes(seg[l4:]), ones_sum(pseudo)) == 0xFFFF


def hdr(flags=0, gso_type=0, hdr_len=0, gso_size=0, start=0, offset=0) -> bytes:
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, start, offset)


# (version, protocol, l4, payload_offset, payload_length) of an IPv4 TCP packet with 3000 bytes
TCP4 = (4, 6, 20, 40, 3000)


def test_sanitize_keeps_what_our_own_superframes_say_and_rebuilds_it():
    good = hdr(vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 999, 1448, 20, 16)
    assert vnet.sanitize(good, *TCP4) == hdr(vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 40, 1448, 20, 16)
    assert vnet.sanitize(hdr(vnet.NEEDS_CSUM, 0, 0, 0, 20, 16), *TCP4) == \
        hdr(vnet.NEEDS_CSUM, 0, 0, 0, 20, 16)
    assert vnet.sanitize(hdr(), *TCP4) == vnet.PLAIN
    assert vnet.sanitize(hdr(vnet.DATA_VALID), *TCP4) == vnet.PLAIN  # not a client's to say
    # GSO over a payload that fits one segment: just a partial checksum.
    assert vnet.sanitize(hdr(vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 40, 4000, 20, 16), *TCP4) == \
        hdr(vnet.NEEDS_CSUM, 0, 0, 0, 20, 16)
    # A UDP packet's partial checksum is kept at its place (a packet passed on between two
    # devices must still get it completed); anywhere else it is moot: plain.
    assert vnet.sanitize(hdr(vnet.NEEDS_CSUM, 0, 0, 0, 20, 6), 4, 17, 20, 28, 100) == \
        hdr(vnet.NEEDS_CSUM, 0, 0, 0, 20, 6)
    assert vnet.sanitize(hdr(vnet.NEEDS_CSUM, 0, 0, 0, 20, 4), 4, 17, 20, 28, 100) == vnet.PLAIN


def test_sanitize_refuses_headers_that_lie():
    lies = [
        hdr(vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 40, 1, 20, 16),  # 3000 segments of one byte
        hdr(vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 40, 1448, 22, 0),  # the sum would skip a port
        hdr(vnet.NEEDS_CSUM, 0, 0, 0, 60000, 16),  # past the packet
        hdr(vnet.NEEDS_CSUM, vnet.GSO_TCPV6, 40, 1448, 20, 16),  # TCPv6 GSO on IPv4
        hdr(0, vnet.GSO_TCPV4, 40, 1448, 20, 16),  # GSO without a partial checksum
        hdr(vnet.NEEDS_CSUM, 3, 40, 1448, 20, 16),  # UDP GSO on TCP
        hdr(0x10),  # an unknown flag
    ]
    for lie in lies:
        assert vnet.sanitize(lie, *TCP4) is None, lie.hex()
    assert vnet.sanitize(hdr(vnet.NEEDS_CSUM, 3, 28, 100, 20, 6), 4, 17, 20, 28, 3000) is None


def test_a_partial_udp_checksum_is_completed_and_zero_is_sent_as_ffff():
    import dpkt
    for payload in (b"hello", b"x" * 999):
        datagram = dpkt.udp.UDP(sport=5, dport=53, ulen=8 + len(payload), data=payload)
        packet = bytearray(bytes(dpkt.ip.IP(src=b"\x0a\0\0\1", dst=b"\x0a\0\0\2", p=17,
                                            ttl=64, data=datagram)))
        want = bytes(packet[26:28])
        # What a kernel with offload hands over: the pseudo-header's sum in the field.
        pseudo = packet[12:20] + bytes([0, 17]) + (len(packet) - 20).to_bytes(2, "big")
        packet[26:28] = b"\0\0"
        from ipferry.wire.checksum import ones_sum
        packet[26:28] = ones_sum(pseudo).to_bytes(2, "big")
        [done] = vnet.segment(packet, hdr(vnet.NEEDS_CSUM, 0, 0, 0, 20, 6))
        assert bytes(done[26:28]) == (want if want != b"\0\0" else b"\xff\xff")
