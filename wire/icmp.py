"""Building IP packets on the slow path: UDP replies, ICMP echo replies and ICMP errors.

Plain ``struct`` and :mod:`.checksum`, not dpkt: a UDP flow's every reply is built here. Addresses
are 4 bytes (IPv4) or 16 bytes (IPv6); their length picks the IP version.

    >>> from .packet import parse
    >>> p = parse(udp_packet(bytes([10, 0, 0, 1]), 53, bytes([10, 0, 0, 2]), 40000, b"answer"))
    >>> p.protocol, p.sport, p.dport, p.payload_length
    (17, 53, 40000, 6)
"""

from __future__ import annotations

import struct

from .checksum import checksum, ones_sum
from .packet import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Parsed

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_UDP = struct.Struct("!HHHH")
_TCP = struct.Struct("!HHIIBBHHH")
_ICMP = struct.Struct("!BBHHH")
_DF = 0x4000

# reason -> (type, code) of the error a router sends, per IP version.
_UNREACHABLE = {
    4: {"net": (3, 0), "host": (3, 1), "port": (3, 3), "admin": (3, 13), "too_big": (3, 4)},
    6: {"net": (1, 0), "admin": (1, 1), "host": (1, 3), "port": (1, 4), "too_big": (2, 0)},
}
# Whole error packet at most: what every IPv4 host must accept (RFC 1812 4.3.2.3), the IPv6
# minimum MTU (RFC 4443 2.4 (c)).
_MAX_ERROR = {4: 576, 6: 1280}


def ip_packet(src: bytes, dst: bytes, protocol: int, payload: bytes, ttl: int = 64) -> bytes:
    """``payload`` (its checksums already right) behind an IPv4 or IPv6 header."""
    if len(src) == 16:
        return _IPV6.pack(0x60000000, len(payload), protocol, ttl, src, dst) + payload
    # DF set: the datagram is atomic, so an identification of 0 is fine (RFC 6864).
    header = bytearray(_IPV4.pack(0x45, 0, 20 + len(payload), 0, _DF, ttl, protocol, 0, src, dst))
    header[10:12] = checksum(header).to_bytes(2, "big")
    return bytes(header) + payload


def _pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    # IPv6's 40-byte layout (RFC 8200 8.1); for IPv4 it sums the same as RFC 768's 12 bytes.
    return ones_sum(src + dst + struct.pack("!IxxxB", length, protocol))


def udp_packet(src: bytes, sport: int, dst: bytes, dport: int, payload: bytes,
               ttl: int = 64) -> bytes:
    """An IP packet carrying one UDP datagram, all checksums computed."""
    length = 8 + len(payload)
    datagram = _UDP.pack(sport, dport, length, 0) + payload
    # 0 means "no checksum" in UDP (forbidden in IPv6): a computed 0 is sent as 0xFFFF.
    csum = checksum(datagram, _pseudo_header_sum(src, dst, IPPROTO_UDP, length)) or 0xFFFF
    return ip_packet(src, dst, IPPROTO_UDP, datagram[:6] + csum.to_bytes(2, "big") + datagram[8:],
                     ttl)


def tcp_packet(src: bytes, sport: int, dst: bytes, dport: int, seq: int, ack: int, flags: int,
               ttl: int = 64) -> bytes:
    """An IP packet carrying a bare TCP header (a reset, say), all checksums computed. Pure
    struct: it must work when the worker is out of fds (no import, no file to open)."""
    segment = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags, 0, 0, 0)
    csum = checksum(segment, _pseudo_header_sum(src, dst, IPPROTO_TCP, len(segment)))
    return ip_packet(src, dst, IPPROTO_TCP, segment[:16] + csum.to_bytes(2, "big") + segment[18:],
                     ttl)


def icmp_packet(src: bytes, dst: bytes, message: bytes | bytearray, ttl: int = 64) -> bytes:
    """An IP packet carrying an ICMP (IPv4) or ICMPv6 (IPv6) message, its checksum recomputed."""
    msg = bytearray(message)
    msg[2:4] = b"\0\0"
    if len(src) == 16:
        protocol = IPPROTO_ICMPV6
        csum = checksum(msg, _pseudo_header_sum(src, dst, protocol, len(msg)))
    else:
        protocol = IPPROTO_ICMP
        csum = checksum(msg)  # ICMPv4 has no pseudo-header
    msg[2:4] = csum.to_bytes(2, "big")
    return ip_packet(src, dst, protocol, bytes(msg), ttl)


def echo_message(type_: int, ident: int, seq: int, data: bytes) -> bytes:
    """An echo request or reply message, checksum left 0 (:func:`icmp_packet` fills it)."""
    return _ICMP.pack(type_, 0, 0, ident, seq) + data


def unreachable(packet: bytes | bytearray | memoryview, p: Parsed, reason: str, *, mtu: int = 0,
                src: bytes | None = None) -> bytes | None:
    """The ICMP error a router would send back to the source of ``packet`` (``p``: its parse).

    ``reason``: "net", "host", "port", "admin" (administratively prohibited) or "too_big" (with
    ``mtu``, the next hop's). The error comes from ``src``, by default the packet's destination,
    and embeds as much of the packet as fits in 576 (IPv4) or 1280 (IPv6) bytes. None when
    ``packet`` is itself an ICMP error: errors are never answered with errors (RFC 1122 3.2.2).
    """
    try:
        type_, code = _UNREACHABLE[p.version][reason]
    except KeyError:
        raise ValueError(f"unknown unreachable reason {reason!r}; expected one of "
                         f"{', '.join(_UNREACHABLE[4])}") from None
    if p.inner is not None:
        return None
    # Bytes 4-7: ICMPv6 packet too big has a 32-bit MTU; IPv4 fragmentation needed has 16 unused
    # bits, then the next-hop MTU (which an IPv4 header's length field caps at 65535).
    rest = 0 if reason != "too_big" else mtu if p.version == 6 else min(mtu, 0xFFFF)
    header_length = 40 if p.version == 6 else 20
    room = _MAX_ERROR[p.version] - header_length - 8
    message = struct.pack("!BBHI", type_, code, 0, rest) + bytes(packet[:min(p.total_length, room)])
    return icmp_packet(p.dst if src is None else src, p.src, message)
