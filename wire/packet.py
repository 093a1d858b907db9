"""Reading IP packets at fixed offsets: the fast path's parser (no dpkt, no allocation per field).

``parse`` turns raw bytes into a :class:`Parsed` (protocol, addresses, ports, TCP flags, ICMP type)
or a :class:`Drop` with the reason it is counted under. It never raises on bad input: whatever a
tunnel sends is either a packet we understand or a counted drop.

Understood: IPv4 and IPv6 (after at most 4 hop-by-hop, routing with no segments left, or
destination options headers) carrying TCP, UDP, ICMP echo and ICMP errors (ICMP in IPv4, ICMPv6
in IPv6). An ICMP error's embedded packet is parsed too, leniently (it is usually cut after 8
bytes of its L4 header), into :attr:`Parsed.inner`. IPv4 TCP, the bulk of the traffic, is read
inline; everything else goes through helpers.

    >>> p = parse(bytes.fromhex("4500002800000000400600000a000001c6120001"
    ...                         "9c400050000000010000000050022000" "00000000"))
    >>> p.protocol, p.sport, p.dport, p.tcp_flags == TCP_SYN
    (6, 40000, 80, True)
    >>> parse(b"\\x45")
    <Drop.TRUNCATED: 'truncated'>
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from dataclasses import dataclass

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6_PLEN_NXT = struct.Struct("!HB")
_PORTS_SEQ = struct.Struct("!HHI")
_UDP = struct.Struct("!HHH")
_ICMP_ID = struct.Struct("!H")
_BROADCAST = b"\xff\xff\xff\xff"

_IPV6_WALKED = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options
_IPV6_MAX_EXT = 4
# IANA's "IPv6 Extension Header Types" (fragment aside): a header we do not walk is counted as
# such, not as an unknown transport.
_IPV6_EXT = frozenset({0, 43, 50, 51, 60, 135, 139, 140, 253, 254})

# (protocol, type): the echo messages, whose identifier is the flow's "port", and the errors
# that embed the packet they are about.
_ICMP_ECHO = frozenset({(IPPROTO_ICMP, 0), (IPPROTO_ICMP, 8), (IPPROTO_ICMPV6, 128),
                        (IPPROTO_ICMPV6, 129)})
_ICMP_ERROR = frozenset({(IPPROTO_ICMP, 3), (IPPROTO_ICMP, 11), (IPPROTO_ICMP, 12),
                         (IPPROTO_ICMPV6, 1), (IPPROTO_ICMPV6, 2), (IPPROTO_ICMPV6, 3),
                         (IPPROTO_ICMPV6, 4)})


class Drop(enum.StrEnum):
    """Why a packet was dropped: the ``reason`` label of ``ipferry_drops_total``."""

    TRUNCATED = "truncated"
    BAD_VERSION = "bad_version"
    BAD_HEADER_LENGTH = "bad_header_length"
    BAD_TOTAL_LENGTH = "bad_total_length"
    FRAGMENT = "fragment"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    IPV6_EXT_HEADER = "ipv6_ext_header"
    MULTICAST = "multicast"
    BAD_TCP_HEADER = "bad_tcp_header"
    BAD_UDP_HEADER = "bad_udp_header"
    BAD_ICMP = "bad_icmp"
    ICMP_UNSUPPORTED = "icmp_unsupported"


@dataclass(frozen=True, slots=True)
class Parsed:
    """What flow tracking needs of one IP packet; offsets let the NAT rewrite in place.

    Offsets count from the start of the IP header. For ICMP echo, ``sport`` is the identifier
    and ``dport`` 0; for an ICMP error both are 0 and ``inner`` is the embedded packet (its
    offsets count from its own IP header, its ``total_length`` is what its header claims, and
    ``tcp_flags``/``payload_offset`` are 0 when the copy ends before them).
    """

    protocol: int
    src: bytes  # 4 or 16 bytes, network order
    dst: bytes
    sport: int
    dport: int
    ihl: int  # where the L4 header starts: IPv4 header length, or IPv6 40 + extension headers
    total_length: int  # IPv4 total length; IPv6 40 + payload length
    tcp_flags: int = 0
    payload_offset: int = 0  # where the L4 payload starts
    seq: int = 0  # TCP sequence number
    version: int = 4
    icmp_type: int = -1
    icmp_code: int = -1
    inner: Parsed | None = None  # an ICMP error's embedded packet

    @property
    def payload_length(self) -> int:
        return self.total_length - self.payload_offset


# A frozen dataclass's __init__ calls object.__setattr__ once per field, most of parse's time;
# the TCP and UDP paths set the slots through their descriptors instead (a third cheaper). Unpacking
# fails at import if a field is added; test_packet checks the value equals the constructor's.
(_set_protocol, _set_src, _set_dst, _set_sport, _set_dport, _set_ihl, _set_total_length,
 _set_tcp_flags, _set_payload_offset, _set_seq, _set_version, _set_icmp_type, _set_icmp_code,
 _set_inner) = (getattr(Parsed, f.name).__set__ for f in dataclasses.fields(Parsed))
_new = object.__new__


def _parsed(protocol: int, src: bytes, dst: bytes, sport: int, dport: int, ihl: int,
            total_length: int, tcp_flags: int, payload_offset: int, seq: int,
            version: int) -> Parsed:
    """A TCP or UDP packet's Parsed (no ICMP fields), made through the slots."""
    p = _new(Parsed)
    _set_protocol(p, protocol)
    _set_src(p, src)
    _set_dst(p, dst)
    _set_sport(p, sport)
    _set_dport(p, dport)
    _set_ihl(p, ihl)
    _set_total_length(p, total_length)
    _set_tcp_flags(p, tcp_flags)
    _set_payload_offset(p, payload_offset)
    _set_seq(p, seq)
    _set_version(p, version)
    _set_icmp_type(p, -1)
    _set_icmp_code(p, -1)
    _set_inner(p, None)
    return p


def parse(packet: bytes | bytearray | memoryview) -> Parsed | Drop:
    n = len(packet)
    if n < 1:
        return Drop.TRUNCATED
    version = packet[0] >> 4
    if version != 4:
        return _parse_ipv6(packet, n, False) if version == 6 else Drop.BAD_VERSION
    if n < 20:
        return Drop.TRUNCATED
    vihl, _tos, total_length, _ident, frag, _ttl, proto, _csum, src, dst = _IPV4.unpack_from(packet)
    ihl = (vihl & 0x0F) * 4
    if ihl < 20:
        return Drop.BAD_HEADER_LENGTH
    if total_length < ihl or total_length > n:
        # Longer than what arrived is truncation in transit; shorter than its own header is a lie.
        return Drop.BAD_TOTAL_LENGTH if total_length < ihl else Drop.TRUNCATED
    if frag & 0x3FFF:  # MF set or a non-zero offset: the design avoids fragments, never reassembles
        return Drop.FRAGMENT
    if dst[0] >= 224 and (dst[0] < 240 or dst == _BROADCAST):  # one compare for unicast
        return Drop.MULTICAST
    if src[0] >= 224 and (src[0] < 240 or src == _BROADCAST):
        # No host sends from a group or broadcast address (RFC 1122 3.2.1.3): never answered.
        return Drop.MULTICAST
    if proto != IPPROTO_TCP:
        return _parse_l4(packet, 4, proto, bytes(src), bytes(dst), ihl, total_length, total_length,
                         False)
    if total_length < ihl + 20:
        return Drop.TRUNCATED
    sport, dport, seq = _PORTS_SEQ.unpack_from(packet, ihl)
    data_offset = (packet[ihl + 12] >> 4) * 4
    if data_offset < 20 or ihl + data_offset > total_length:
        return Drop.BAD_TCP_HEADER
    return _parsed(IPPROTO_TCP, bytes(src), bytes(dst), sport, dport, ihl, total_length,
                   packet[ihl + 13], ihl + data_offset, seq, 4)


def _parse_ipv6(packet: bytes | bytearray | memoryview, n: int, lenient: bool) -> Parsed | Drop:
    """IPv6; ``lenient``: an ICMP error's copy, which may end before its payload length says."""
    if n < 40:
        return Drop.TRUNCATED
    plen, nxt = _IPV6_PLEN_NXT.unpack_from(packet, 4)
    total_length = 40 + plen
    if total_length > n and not lenient:
        return Drop.TRUNCATED
    end = min(total_length, n)
    src = bytes(packet[8:24])
    dst = bytes(packet[24:40])
    # The client kernel's MLD reports and neighbour discovery; never checked in an ICMP error's
    # copy, since packet-too-big is legitimately sent about multicast (RFC 4443 2.4).
    if (dst[0] == 0xFF or src[0] == 0xFF) and not lenient:
        return Drop.MULTICAST
    off = 40
    for _ in range(_IPV6_MAX_EXT):
        if nxt not in _IPV6_WALKED:
            break
        if off + 8 > end:
            return Drop.TRUNCATED
        # Hop-by-hop only directly after the IPv6 header (RFC 8200 4.1); a routing header with
        # segments left means this is not the final destination: its address is not the flow's.
        if (nxt == 0 and off != 40) or (nxt == 43 and packet[off + 3]):
            return Drop.IPV6_EXT_HEADER
        nxt = packet[off]
        off += (packet[off + 1] + 1) * 8
        if off > end:
            return Drop.TRUNCATED
    if nxt == 44:
        return Drop.FRAGMENT
    if nxt in _IPV6_EXT:  # also a 5th walkable header: more than any real stack sends
        return Drop.IPV6_EXT_HEADER
    return _parse_l4(packet, 6, nxt, src, dst, off, total_length, end, lenient)


def _parse_l4(packet: bytes | bytearray | memoryview, version: int, proto: int, src: bytes,
              dst: bytes, ihl: int, total_length: int, end: int, lenient: bool) -> Parsed | Drop:
    """The L4 header at ``ihl``; ``end``: where the bytes we may read stop."""
    if proto not in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP if version == 4 else IPPROTO_ICMPV6):
        return Drop.UNSUPPORTED_PROTOCOL
    if ihl + 8 > end:  # TCP's ports and seq, UDP's header, ICMP's header: 8 bytes each
        return Drop.TRUNCATED
    if proto == IPPROTO_TCP:
        sport, dport, seq = _PORTS_SEQ.unpack_from(packet, ihl)
        if lenient:  # an ICMP error's copy may stop anywhere after seq: flags only if there
            if ihl + 14 > end:
                return Parsed(proto, src, dst, sport, dport, ihl, total_length, 0, 0, seq, version)
            return Parsed(proto, src, dst, sport, dport, ihl, total_length, packet[ihl + 13],
                          ihl + (packet[ihl + 12] >> 4) * 4, seq, version)
        if ihl + 20 > end:
            return Drop.TRUNCATED
        data_offset = (packet[ihl + 12] >> 4) * 4
        if data_offset < 20 or ihl + data_offset > total_length:
            return Drop.BAD_TCP_HEADER
        return _parsed(proto, src, dst, sport, dport, ihl, total_length, packet[ihl + 13],
                       ihl + data_offset, seq, version)
    if proto == IPPROTO_UDP:
        sport, dport, udp_length = _UDP.unpack_from(packet, ihl)
        if udp_length < 8 or ihl + udp_length > total_length:
            return Drop.BAD_UDP_HEADER
        return _parsed(proto, src, dst, sport, dport, ihl, total_length, 0, ihl + 8, 0, version)
    icmp_type = packet[ihl]
    icmp_code = packet[ihl + 1]
    if (proto, icmp_type) in _ICMP_ECHO:
        (ident,) = _ICMP_ID.unpack_from(packet, ihl + 4)
        return Parsed(proto, src, dst, ident, 0, ihl, total_length, 0, ihl + 8, 0, version,
                      icmp_type, icmp_code)
    if (proto, icmp_type) not in _ICMP_ERROR:
        return Drop.ICMP_UNSUPPORTED
    if lenient:  # an error about an error: never sent (RFC 1122 3.2.2, RFC 4443 2.4)
        return Drop.BAD_ICMP
    inner = _parse_embedded(memoryview(packet)[ihl + 8:end], version)
    if isinstance(inner, Drop):
        return Drop.BAD_ICMP
    return Parsed(proto, src, dst, 0, 0, ihl, total_length, 0, ihl + 8, 0, version, icmp_type,
                  icmp_code, inner)


def _parse_embedded(packet: memoryview, version: int) -> Parsed | Drop:
    """The packet inside an ICMP error: its IP header and the first 8 bytes of its L4 header."""
    n = len(packet)
    if n < 1 or packet[0] >> 4 != version:
        return Drop.BAD_VERSION
    if version == 6:
        return _parse_ipv6(packet, n, True)
    if n < 20:
        return Drop.TRUNCATED
    vihl, _tos, total_length, _ident, frag, _ttl, proto, _csum, src, dst = _IPV4.unpack_from(packet)
    ihl = (vihl & 0x0F) * 4
    if ihl < 20 or total_length < ihl or frag & 0x3FFF:
        return Drop.BAD_HEADER_LENGTH
    return _parse_l4(packet, 4, proto, bytes(src), bytes(dst), ihl, total_length,
                     min(total_length, n), True)
