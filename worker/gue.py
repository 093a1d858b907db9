"""The GUE codec of the unconnected IP tunnel: one IP packet a UDP datagram, the context in front.

Generic UDP Encapsulation (draft-ietf-intarea-gue, as Linux's fou speaks it), variant 0::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |Ver|C|  Hlen   |  Proto/ctype  |             Flags             |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |     Private data: the tunnel context (Hlen words), zero-padded |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |     the inner IPv4 or IPv6 packet                              |

Ver = 0, C = 0 (data, not control), Flags = 0 (no optional fields, so the Hlen words after the
first four bytes are all private data), Proto = 4 (IPv4) or 41 (IPv6) and must match the inner
packet's version. The private data is the same context a connected tunnel sends first (the
default application wants UTF-8 JSON with a ``tenant``), padded with zero bytes to a word: at
most 31 words, 124 bytes. Replies carry no context (Hlen = 0).
"""

from __future__ import annotations

PROTO_IPV4 = 4
PROTO_IPV6 = 41
MAX_CONTEXT = 31 * 4
HEADER = 4
# The largest UDP payload over IPv4 (65535 - 20 - 8); over loopback IPv6 (MTU 65536) a little less.
MAX_DATAGRAM = {4: 65507, 6: 65536 - 40 - 8}

_PROTO_OF_VERSION = {4: PROTO_IPV4, 6: PROTO_IPV6}
_REPLY_HEADER = {4: bytes([0, PROTO_IPV4, 0, 0]), 6: bytes([0, PROTO_IPV6, 0, 0])}


class BadGue(ValueError):
    """A datagram that is not GUE variant 0 carrying an IP packet as this on-ramp speaks it."""


def header(context: bytes, version: int) -> bytes:
    """The GUE header carrying ``context`` in front of an IPv``version`` packet."""
    if len(context) > MAX_CONTEXT:
        raise ValueError(f"the context is {len(context)} bytes; a GUE header carries at most "
                         f"{MAX_CONTEXT}")
    padded = context + bytes(-len(context) % 4)
    return bytes([len(padded) // 4, _PROTO_OF_VERSION[version], 0, 0]) + padded


def reply_header(version: int) -> bytes:
    return _REPLY_HEADER[version]


def decapsulate(datagram: bytes) -> tuple[bytes, bytes]:
    """(context, inner packet) of a GUE datagram; raises :class:`BadGue` with the reason."""
    if len(datagram) < HEADER + 20:
        raise BadGue("shorter than a GUE header and an IP header")
    first, proto, f1, f2 = datagram[0], datagram[1], datagram[2], datagram[3]
    if first & 0xE0:
        raise BadGue("not GUE variant 0 data (version or C bit set)")
    if f1 or f2:
        raise BadGue("GUE flags (optional fields) are not supported")
    start = HEADER + (first & 0x1F) * 4
    if len(datagram) <= start:
        raise BadGue("the header length runs past the datagram")
    version = datagram[start] >> 4
    if _PROTO_OF_VERSION.get(version) != proto:
        raise BadGue(f"protocol {proto} does not match an IPv{version} inner packet")
    return datagram[HEADER:start].rstrip(b"\0"), datagram[start:]
