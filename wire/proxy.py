"""The PROXY protocol, version 2 (HAProxy's ``proxy-protocol.txt``, section 2.2): who the client is
when a load balancer connects on its behalf.

A TCP on-ramp with ``proxy_protocol = true`` reads this header first on every connection; what
follows it is the client's own stream. The binary header::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  signature: \\r \\n \\r \\n \\0 \\r \\n Q U I T \\n (12 bytes)        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |ver=2|  cmd  |  fam  | trans |   len (bytes after these 16)  |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    | addresses: TCP over IPv4 (0x11): src, dst (4 each), sport, dport (2 each) = 12 bytes;  |
    |            TCP over IPv6 (0x21): src, dst (16 each), sport, dport          = 36 bytes   |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    | TLVs to the end of len: type (1), length (2), value            |

Command LOCAL (0): the balancer's own connection (a health check); the addresses, whatever the
family, are ignored and the connection's own endpoints stand. PROXY (1): the addresses are the
client's. Only TCP is proxied here: a PROXY header for UDP, a unix socket or an unspecified family
is refused, as are families the spec does not define. TLVs are skipped (their framing checked, not
their content: no CRC32C is verified) and the whole header is bounded by :data:`MAX_HEADER`.

:func:`parse_v2` works on what has arrived so far: :class:`NeedMore` says how many bytes it needs
in all before it can say more, so a reader never takes more than the header from the socket (the
client's first bytes stay there). A header that cannot become valid is refused as soon as that is
certain, without waiting for the rest.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
FIXED = 16  # the signature, version and command, family and transport, length
MAX_LENGTH = 2048  # the most ``len`` may say: addresses and TLVs
MAX_HEADER = FIXED + MAX_LENGTH
VERSION = 2

TCP_IPV4 = 0x11
TCP_IPV6 = 0x21
UNSPEC = 0x00
# Every family/transport byte the spec defines (UDP and unix ones too); others are invalid.
_DEFINED = frozenset({0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32})
_ADDRESSES = {TCP_IPV4: struct.Struct("!4s4sHH"), TCP_IPV6: struct.Struct("!16s16sHH")}
_FIXED = struct.Struct("!12sBBH")
_TLV = struct.Struct("!BH")

Address = tuple[str, int]


class Command(enum.IntEnum):
    LOCAL = 0
    PROXY = 1


class BadProxyHeader(ValueError):
    """Bytes that are not (and cannot become) a PROXY v2 header this on-ramp accepts; ``str()``
    is the reason."""


@dataclass(frozen=True, slots=True)
class NeedMore:
    """Not enough bytes yet: ``total`` is how many, in all, it needs before it can say more (never
    more than the header's own length)."""

    total: int


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A whole header: ``length`` bytes, after which the client's stream begins. ``src`` and
    ``dst`` are the client's and the address it connected to (PROXY), or None (LOCAL: use the
    connection's own)."""

    command: Command
    src: Address | None
    dst: Address | None
    length: int


def parse_v2(data: bytes | bytearray | memoryview) -> ProxyHeader | NeedMore:
    """The PROXY v2 header at the start of ``data``; :class:`NeedMore` if it is not all there
    yet; :class:`BadProxyHeader` (with the reason) if it is not one this on-ramp accepts."""
    data = memoryview(data)
    have = len(data)
    seen = min(have, len(SIGNATURE))
    if data[:seen] != SIGNATURE[:seen]:
        if data[:min(have, 5)] == b"PROXY"[:min(have, 5)]:
            raise BadProxyHeader("a PROXY v1 (text) header: only version 2 (binary) is spoken here")
        raise BadProxyHeader("not a PROXY v2 header (its signature is wrong)")
    if have < FIXED:
        return NeedMore(FIXED)
    _, ver_cmd, family, length = _FIXED.unpack_from(data)
    if ver_cmd >> 4 != VERSION:
        raise BadProxyHeader(f"PROXY protocol version {ver_cmd >> 4}: only version 2 is spoken here")
    command = ver_cmd & 0x0F
    if command not in (Command.LOCAL, Command.PROXY):
        raise BadProxyHeader(f"unknown PROXY v2 command {command} (LOCAL 0 and PROXY 1 only)")
    if family not in _DEFINED:
        raise BadProxyHeader(f"undefined PROXY v2 address family and transport 0x{family:02x}")
    if length > MAX_LENGTH:
        raise BadProxyHeader(f"a PROXY v2 header of {FIXED + length} bytes: at most {MAX_HEADER} "
                             f"are read")
    if command == Command.PROXY:
        if family not in _ADDRESSES:
            raise BadProxyHeader(f"a PROXY v2 header for family and transport 0x{family:02x}: "
                                 f"only TCP is proxied here (over IPv4 0x11 or IPv6 0x21)")
        if length < _ADDRESSES[family].size:
            raise BadProxyHeader(f"a PROXY v2 header whose length {length} is shorter than its "
                                 f"addresses ({_ADDRESSES[family].size} bytes)")
    total = FIXED + length
    if have < total:
        return NeedMore(total)
    if command == Command.LOCAL:  # the addresses are ignored, whatever the family
        return ProxyHeader(Command.LOCAL, None, None, total)
    form = _ADDRESSES[family]
    src, dst, sport, dport = form.unpack_from(data, FIXED)
    _check_tlvs(data[FIXED + form.size:total])
    return ProxyHeader(Command.PROXY, (str(ipaddress.ip_address(src)), sport),
                       (str(ipaddress.ip_address(dst)), dport), total)


def _check_tlvs(data: memoryview) -> None:
    """Every TLV fits in the header (their content is not ours to judge)."""
    at = 0
    while at < len(data):
        if len(data) - at < _TLV.size:
            raise BadProxyHeader("a PROXY v2 TLV is cut short by the header's length")
        _, size = _TLV.unpack_from(data, at)
        at += _TLV.size + size
        if at > len(data):
            raise BadProxyHeader("a PROXY v2 TLV runs past the header's length")


def tlv(kind: int, value: bytes) -> bytes:
    """One TLV (type ``kind``) carrying ``value``, for :func:`build_v2`."""
    return _TLV.pack(kind, len(value)) + value


def build_v2(src: Address | None, dst: Address | None, tlvs: bytes = b"") -> bytes:
    """A PROXY v2 header: PROXY for TCP from ``src`` to ``dst`` (both IPv4 or both IPv6), or,
    with both None, LOCAL (family unspecified). ``tlvs``: already encoded (see :func:`tlv`)."""
    if src is None or dst is None:
        if src is not None or dst is not None:
            raise ValueError("a LOCAL header has neither address; a PROXY header has both")
        return _header(Command.LOCAL, UNSPEC, tlvs)
    source, target = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if source.version != target.version:
        raise ValueError(f"{src[0]} and {dst[0]}: both addresses must be IPv4, or both IPv6")
    family = TCP_IPV4 if source.version == 4 else TCP_IPV6
    addresses = _ADDRESSES[family].pack(source.packed, target.packed, src[1], dst[1])
    return _header(Command.PROXY, family, addresses + tlvs)


def _header(command: Command, family: int, body: bytes) -> bytes:
    if len(body) > MAX_LENGTH:
        raise ValueError(f"{len(body)} bytes of addresses and TLVs: at most {MAX_LENGTH}")
    return _FIXED.pack(SIGNATURE, VERSION << 4 | command, family, len(body)) + body
