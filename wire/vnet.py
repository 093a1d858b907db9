"""Offload on TUN devices: virtio-net headers, GSO superframes and partial checksums.

With ``IFF_VNET_HDR`` and ``TUNSETOFFLOAD`` a TUN device hands out (and takes) TCP segments of up
to ``GSO_MAX_SIZE`` bytes whatever the MTU, each behind a 10-byte ``struct virtio_net_hdr``, with
the TCP checksum left *partial* (only the pseudo-header summed) for whoever finishes the job. One
Python-level packet then carries what would be ~45 packets at MTU 1500, and no checksum of the
payload is ever computed in Python: the kernel that receives the superframe finishes it.

Inside ipferry a packet with its header travels as ``header + packet``. A connected tunnel speaks
this framing when its first datagram starts with :data:`TUNNEL_MAGIC` (``ipferry connect`` does);
every other tunnel gets plain packets, checksums completed (:func:`complete_checksum`).
"""

from __future__ import annotations

import struct

from .checksum import checksum, ones_sum

HEADER_SIZE = 10
PLAIN = bytes(HEADER_SIZE)  # no GSO, checksum complete: the kernel verifies it
NEEDS_CSUM = 0x01
GSO_NONE = 0x00
# Superframes stay below what one GUE datagram carries and what the worker TUN's MTU allows.
GSO_MAX_SIZE = 65000
TUNNEL_MAGIC = b"\0vnet\0"
# A connected tunnel's first datagram starting with this: the client will pass its TUN's queues
# (SCM_RIGHTS) instead of sending packets (``ipferry connect``; see ipferry.worker.attached).
# Then :data:`TUNNEL_MAGIC` if the TUN has virtio-net headers, then the context.
ATTACH_MAGIC = b"\0attach\0"
_CSUM = struct.Struct("<HH")  # csum_start, csum_offset (little-endian: the host's)


def is_partial(header: bytes | memoryview) -> bool:
    return bool(header[0] & NEEDS_CSUM)


def is_gso(header: bytes | memoryview) -> bool:
    return bool(header[1] & 0x7F)


def complete_checksum(packet: bytearray, header: bytes | memoryview) -> None:
    """Finish a partial checksum in place (the slow path: a sum over the whole segment)."""
    start, offset = _CSUM.unpack_from(header, 6)
    at = start + offset
    # The field holds the pseudo-header's sum: summing it with the segment gives the total.
    value = ~ones_sum(memoryview(packet)[start:]) & 0xFFFF
    if offset == 6 and not value:  # UDP sends a sum of zero as 0xFFFF (0: "no checksum")
        value = 0xFFFF
    packet[at:at + 2] = value.to_bytes(2, "big")


_GSO = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
_TCP_FIN, _TCP_PSH, _TCP_CWR = 0x01, 0x08, 0x80


_UDP_PARTIAL = {start: _GSO.pack(NEEDS_CSUM, 0, 0, 0, start, 6) for start in (20, 40)}


def segment(packet: bytearray, header: bytes | memoryview) -> list[bytearray]:
    """Cut a TCP superframe into the segments the kernel would have sent (software GSO), each a
    whole packet with its checksums: for tunnels that take plain packets. A packet that is no
    superframe comes back alone, its checksum completed if it was partial."""
    flags, gso_type, _, mss, start, _ = _GSO.unpack_from(header)
    if not gso_type & 0x7F or not mss:
        if flags & NEEDS_CSUM:
            complete_checksum(packet, header)
        return [packet]
    v4 = packet[0] >> 4 == 4
    tcp_header = (packet[start + 12] >> 4) * 4
    head = bytes(packet[:start + tcp_header])
    payload = memoryview(packet)[len(head):]
    seq = int.from_bytes(head[start + 4:start + 8], "big")
    ident = int.from_bytes(head[4:6], "big")
    addresses = head[12:20] if v4 else head[8:40]
    segments = []
    for i, offset in enumerate(range(0, len(payload), mss)):
        chunk = payload[offset:offset + mss]
        seg = bytearray(head)
        seg += chunk
        if v4:
            seg[2:4] = len(seg).to_bytes(2, "big")
            seg[4:6] = ((ident + i) & 0xFFFF).to_bytes(2, "big")
            seg[10:12] = b"\0\0"
            seg[10:12] = (~ones_sum(seg[:start]) & 0xFFFF).to_bytes(2, "big")
        else:
            seg[4:6] = (len(seg) - 40).to_bytes(2, "big")
        seg[start + 4:start + 8] = ((seq + offset) & 0xFFFFFFFF).to_bytes(4, "big")
        tcp_flags = head[start + 13]
        if offset + mss < len(payload):
            tcp_flags &= ~(_TCP_FIN | _TCP_PSH)  # only the last segment ends or pushes
        if i:
            tcp_flags &= ~_TCP_CWR  # only the first says the window was cut
        seg[start + 13] = tcp_flags
        length = len(seg) - start
        pseudo = addresses + (bytes([0, 6]) + length.to_bytes(2, "big") if v4
                              else length.to_bytes(4, "big") + b"\0\0\0\6")
        seg[start + 16:start + 18] = b"\0\0"
        seg[start + 16:start + 18] = checksum(memoryview(seg)[start:], ones_sum(pseudo)).to_bytes(
            2, "big")
        segments.append(seg)
    return segments


DATA_VALID = 0x02
GSO_TCPV4, GSO_TCPV6, GSO_ECN = 0x01, 0x04, 0x80
MIN_GSO_SIZE = 256  # no real MSS is smaller; a tiny one would make software GSO a stall


def sanitize(header: bytes | memoryview, version: int, protocol: int, l4: int,
             payload_offset: int, payload_length: int) -> bytes | None:
    """The virtio-net header a tunnel sent with its packet, checked against the packet (as parsed:
    IP ``version``, ``protocol``, TCP header at ``l4``) and rebuilt from what it may say; None
    when it lies. Only what our own superframes carry passes: a partial TCP or UDP checksum at its
    place, TCP GSO of the packet's IP version with a sane segment size."""
    flags, gso_type, _, gso_size, start, offset = _GSO.unpack_from(header)
    if flags & ~(NEEDS_CSUM | DATA_VALID) or gso_type & ~(GSO_ECN | 0x7F):
        return None
    gso = gso_type & 0x7F
    if protocol != 6:
        if gso:
            return None
        if protocol == 17 and flags & NEEDS_CSUM and start == l4 and offset == 6:
            # A partial UDP checksum: moot for a datagram that leaves by a socket, but one
            # passed on as a packet (between two devices) must still be completed.
            return _UDP_PARTIAL.get(start) or _GSO.pack(NEEDS_CSUM, 0, 0, 0, start, 6)
        return PLAIN
    if not flags & NEEDS_CSUM:
        return None if gso else PLAIN  # (DATA_VALID is the kernel's to decide, not a client's)
    if start != l4 or offset != 16:
        return None
    if not gso or payload_length <= gso_size:
        return _GSO.pack(NEEDS_CSUM, 0, 0, 0, start, 16)  # one segment: just a partial checksum
    if gso != (GSO_TCPV4 if version == 4 else GSO_TCPV6) or gso_size < MIN_GSO_SIZE:
        return None
    return _GSO.pack(NEEDS_CSUM, gso_type, payload_offset, gso_size, start, 16)
