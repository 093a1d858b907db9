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

Offload (as on connected tunnels, see :mod:`ipferry.wire.vnet`): private data that starts with the
6 bytes ``\0vnet\0`` is ``\0vnet\0`` + context, zero-padded to a word, then the packet's 10-byte
virtio-net header and 2 zero bytes; the inner packet may then be a TCP superframe with a partial
checksum. Replies to such a sender carry ``\0vnet\0\0\0`` and a header the same way (Hlen = 5).
The inner packet stays where Hlen says, so the kernel's steering is the same.

Source port (RFC 8086, 5.1): a sender puts a hash of the inner flow in the outer UDP source
port, so that a router's ECMP hash over the outer addresses and ports spreads flows over the
nodes behind one address and keeps each flow on one (:func:`flow_entropy`; Linux's own GUE
encapsulation does the same with ``encap-sport auto``).
"""

from __future__ import annotations

from .sharding import flow_hash
from .vnet import HEADER_SIZE as VNET_HEADER

PROTO_IPV4 = 4
PROTO_IPV6 = 41
MAX_CONTEXT = 31 * 4
VNET_MAGIC = b"\0vnet\0"
VNET_OPTION = VNET_HEADER + 2  # a virtio-net header and padding, ending the private data
MAX_VNET_CONTEXT = MAX_CONTEXT - len(VNET_MAGIC) - VNET_OPTION - 2
HEADER = 4
# Source ports a sender's flows spread over (each flow on one, by its hash): entropy for a
# router's ECMP hash in front of several nodes.
DEFAULT_SENDER_PORTS = 32
MAX_SENDER_PORTS = 4096
# The largest UDP payload over IPv4 (65535 - 20 - 8); over loopback IPv6 (MTU 65536) a little less.
MAX_DATAGRAM = {4: 65507, 6: 65536 - 40 - 8}

_PROTO_OF_VERSION = {4: PROTO_IPV4, 6: PROTO_IPV6}
_REPLY_HEADER = {4: bytes([0, PROTO_IPV4, 0, 0]), 6: bytes([0, PROTO_IPV6, 0, 0])}


class BadGue(ValueError):
    """A datagram that is not GUE variant 0 carrying an IP packet as this on-ramp speaks it."""


def header(context: bytes, version: int, vnet: bool = False) -> bytes:
    """The GUE header carrying ``context`` in front of an IPv``version`` packet.

    ``vnet``: the header up to the virtio-net option; the sender appends a virtio-net header and
    two zero bytes to it (see :func:`vnet_datagram`).
    """
    limit = MAX_VNET_CONTEXT if vnet else MAX_CONTEXT
    if len(context) > limit:
        raise ValueError(f"the context is {len(context)} bytes; a GUE header carries at most "
                         f"{limit}")
    if vnet:
        context = VNET_MAGIC + context
    padded = context + bytes(-len(context) % 4)
    words = (len(padded) + (VNET_OPTION if vnet else 0)) // 4
    return bytes([words, _PROTO_OF_VERSION[version], 0, 0]) + padded


def room(header: bytes, vnet: bool, ipv6: bool) -> int:
    """The largest inner packet one datagram carries behind ``header`` (and the offload option)."""
    return MAX_DATAGRAM[6 if ipv6 else 4] - len(header) - (VNET_OPTION if vnet else 0)


def vnet_reply_header(version: int) -> bytes:
    """A reply's header up to its virtio-net option (no context)."""
    return _VNET_REPLY_HEADER[version]


_VNET_REPLY_HEADER = {4: header(b"", 4, vnet=True), 6: header(b"", 6, vnet=True)}


def reply_header(version: int) -> bytes:
    return _REPLY_HEADER[version]


def decapsulate(datagram: bytes) -> tuple[bytes, bytes]:
    """(context, inner packet) of a GUE datagram; raises :class:`BadGue` with the reason.

    With the offload option the "inner packet" is the virtio-net header, then the packet, and
    the context starts with :data:`VNET_MAGIC` (so the two framings never share a sender's tunnel).
    """
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
    if datagram[HEADER:HEADER + len(VNET_MAGIC)] == VNET_MAGIC:
        option = start - VNET_OPTION
        if option < HEADER + len(VNET_MAGIC):
            raise BadGue("the offload option does not fit the header length")
        context = VNET_MAGIC + datagram[HEADER + len(VNET_MAGIC):option].rstrip(b"\0")
        return context, datagram[option:option + VNET_HEADER] + datagram[start:]
    return datagram[HEADER:start].rstrip(b"\0"), datagram[start:]


# ICMP errors (by protocol: their types) quote the packet they are about after 8 bytes.
_ICMP_ERRORS = {1: frozenset({3, 4, 5, 11, 12}), 58: frozenset({1, 2, 3, 4})}
_ICMP = {4: 1, 6: 58}


def flow_entropy(packet: bytes | memoryview, offset: int = 0, quoted: bool = False) -> int:
    """The inner flow's symmetric hash (:func:`ipferry.wire.sharding.flow_hash`: both directions
    alike) of the IP packet at ``offset``: what a sender spreads its source ports by. Ports
    count for TCP and UDP (not in fragments); other protocols hash by addresses, but an
    ICMP error hashes as the packet it quotes, so it travels with that packet's flow."""
    if len(packet) < offset + 20:
        return 0
    version = packet[offset] >> 4
    if version == 4:
        ihl = (packet[offset] & 0x0F) * 4
        protocol = packet[offset + 9]
        src, dst = bytes(packet[offset + 12:offset + 16]), bytes(packet[offset + 16:offset + 20])
        at = offset + ihl
        # Any fragment (more to come, or not the first) hashes without ports, as the kernel's
        # flow dissector does: all of a datagram's fragments leave from one port.
        fragment = (packet[offset + 6] & 0x3F) or packet[offset + 7]
    elif version == 6 and len(packet) >= offset + 40:
        protocol = packet[offset + 6]
        src, dst = bytes(packet[offset + 8:offset + 24]), bytes(packet[offset + 24:offset + 40])
        at, fragment = offset + 40, 0  # (a fragment header: protocol 44)
    else:
        return 0
    if protocol == _ICMP[version] and not quoted and not fragment \
            and len(packet) >= at + 8 + 20 and packet[at] in _ICMP_ERRORS[protocol]:
        return flow_entropy(packet, at + 8, quoted=True)  # (one level: an error's error is not)
    sport = dport = 0
    if protocol in (6, 17) and not fragment and len(packet) >= at + 4:
        sport = (packet[at] << 8) | packet[at + 1]
        dport = (packet[at + 2] << 8) | packet[at + 3]
    return flow_hash(protocol, src, sport, dst, dport)
