"""Reading IP packets at fixed offsets: the fast path's parser (no dpkt, no allocation per field).

``parse`` turns raw bytes into a :class:`Parsed` (protocol, addresses, ports, TCP flags) or a
:class:`Drop` with the reason it is counted under. It never raises on bad input: whatever a tunnel
sends is either a packet we understand or a counted drop.
"""

from __future__ import annotations

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
_PORTS_SEQ = struct.Struct("!HHI")


class Drop(enum.StrEnum):
    """Why a packet was dropped: the ``reason`` label of ``ipferry_drops_total``."""

    TRUNCATED = "truncated"
    BAD_VERSION = "bad_version"
    BAD_HEADER_LENGTH = "bad_header_length"
    BAD_TOTAL_LENGTH = "bad_total_length"
    FRAGMENT = "fragment"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    IPV6_NOT_YET = "ipv6_not_supported"
    BAD_TCP_HEADER = "bad_tcp_header"


@dataclass(frozen=True, slots=True)
class Parsed:
    """What flow tracking needs of one IPv4 packet; offsets let the NAT rewrite in place."""

    protocol: int
    src: bytes  # 4 bytes, network order
    dst: bytes
    sport: int
    dport: int
    ihl: int  # IP header length in bytes: the L4 header starts here
    total_length: int
    tcp_flags: int = 0
    payload_offset: int = 0  # where the L4 payload starts
    seq: int = 0  # TCP sequence number

    @property
    def payload_length(self) -> int:
        return self.total_length - self.payload_offset


def parse(packet: bytes | bytearray | memoryview) -> Parsed | Drop:
    n = len(packet)
    if n < 1:
        return Drop.TRUNCATED
    version = packet[0] >> 4
    if version == 6:
        return Drop.IPV6_NOT_YET
    if version != 4:
        return Drop.BAD_VERSION
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
    if proto != IPPROTO_TCP:
        return Drop.UNSUPPORTED_PROTOCOL
    if total_length < ihl + 20:
        return Drop.TRUNCATED
    sport, dport, seq = _PORTS_SEQ.unpack_from(packet, ihl)
    data_offset = (packet[ihl + 12] >> 4) * 4
    if data_offset < 20 or ihl + data_offset > total_length:
        return Drop.BAD_TCP_HEADER
    return Parsed(proto, bytes(src), bytes(dst), sport, dport, ihl, total_length,
                  packet[ihl + 13], ihl + data_offset, seq)
