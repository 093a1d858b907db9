"""Reference packets built by dpkt (it computes every checksum), and hypothesis strategies."""

from __future__ import annotations

import struct

import dpkt
from hypothesis import strategies as st

PORT = st.integers(0, 65535)
# Unicast addresses: a multicast or broadcast source or destination is dropped before anything
# else is read.
ADDR4 = st.binary(min_size=4, max_size=4)
UNICAST4 = ADDR4.filter(lambda a: a[0] < 224)
ADDR6 = st.binary(min_size=16, max_size=16).filter(lambda a: a[0] != 0xFF)
# (src, dst) of either version.
ADDRS = st.one_of(st.tuples(UNICAST4, UNICAST4), st.tuples(ADDR6, ADDR6))
UNICAST_ADDRS = st.one_of(st.tuples(UNICAST4, UNICAST4), st.tuples(ADDR6, ADDR6))


def ip(src: bytes, dst: bytes, proto: int, l4: dpkt.Packet | bytes) -> bytes:
    """An IPv4 or IPv6 packet (by address length) around ``l4``, checksums filled by dpkt."""
    if len(src) == 16:
        return bytes(dpkt.ip6.IP6(src=src, dst=dst, nxt=proto, hlim=64, plen=len(bytes(l4)), data=l4))
    return bytes(dpkt.ip.IP(src=src, dst=dst, p=proto, ttl=64, data=l4))


def tcp(src: bytes, dst: bytes, sport: int = 40000, dport: int = 80, flags: int = dpkt.tcp.TH_SYN,
        payload: bytes = b"", opts: bytes = b"", seq: int = 12345) -> bytes:
    segment = dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags, data=payload, opts=opts, seq=seq,
                           ack=678)
    segment.off = (20 + len(opts)) // 4
    return ip(src, dst, dpkt.ip.IP_PROTO_TCP, segment)


def udp(src: bytes, dst: bytes, sport: int = 40000, dport: int = 53, payload: bytes = b"") -> bytes:
    datagram = dpkt.udp.UDP(sport=sport, dport=dport, data=payload, ulen=8 + len(payload))
    return ip(src, dst, dpkt.ip.IP_PROTO_UDP, datagram)


def icmp(src: bytes, dst: bytes, type_: int, code: int = 0, body: dpkt.Packet | bytes = b"") -> bytes:
    """An ICMP (IPv4) or ICMPv6 (IPv6) message; ``body``: what follows type, code and checksum."""
    if len(src) == 16:
        return ip(src, dst, dpkt.ip.IP_PROTO_ICMP6, dpkt.icmp6.ICMP6(type=type_, code=code, data=body))
    return ip(src, dst, dpkt.ip.IP_PROTO_ICMP, dpkt.icmp.ICMP(type=type_, code=code, data=body))


def echo(src: bytes, dst: bytes, ident: int, seq: int, data: bytes, reply: bool = False) -> bytes:
    v6 = len(src) == 16
    type_ = (129 if reply else 128) if v6 else (0 if reply else 8)
    body = (dpkt.icmp6.ICMP6.Echo if v6 else dpkt.icmp.ICMP.Echo)(id=ident, seq=seq, data=data)
    return icmp(src, dst, type_, 0, body)


def with_ipv6_ext(packet: bytes, headers: list[tuple[int, bytes]]) -> bytes:
    """``packet`` (IPv6, no extension header) with ``headers`` [(type, body)] inserted before its L4.

    Each body fills its header to a multiple of 8 bytes after the next-header and length bytes.
    The L4 checksum stays right: extension headers are not in the pseudo-header.
    """
    first_nxt = packet[6]
    chain = b""
    types = [t for t, _ in headers] + [first_nxt]
    for (_, body), nxt in zip(headers, types[1:], strict=True):
        assert (2 + len(body)) % 8 == 0
        chain += bytes([nxt, (2 + len(body)) // 8 - 1]) + body
    plen = struct.unpack_from("!H", packet, 4)[0] + len(chain)
    return (packet[:4] + struct.pack("!HB", plen, types[0]) + packet[7:40] + chain + packet[40:])


PADN6 = b"\x01\x04\0\0\0\0"  # an options header's body of one PadN option: an 8-byte header


def pseudo_header(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    """Written out per RFC 768 and RFC 8200 8.1, independently of the code under test."""
    if len(src) == 16:
        return src + dst + struct.pack("!I3xB", length, proto)
    return src + dst + struct.pack("!xBH", proto, length)


def addresses(packet: bytes) -> tuple[bytes, bytes]:
    if packet[0] >> 4 == 6:
        return packet[8:24], packet[24:40]
    return packet[12:16], packet[16:20]


def l4_checksum_ok(packet: bytes, l4: int, proto: int) -> bool:
    """Does the L4 checksum at ``l4`` verify? (dpkt's RFC 1071 sum, not ours, is the judge.)"""
    segment = bytes(packet[l4:])
    covered = segment if proto == dpkt.ip.IP_PROTO_ICMP else pseudo_header(
        *addresses(packet), proto, len(segment)) + segment
    return dpkt.in_cksum(covered) == 0
