"""A TLS ClientHello's server name (SNI, RFC 6066) and ALPN protocols (RFC 7301), read from the
first bytes a client sends: pure functions, no I/O, nothing decrypted.

A TCP on-ramp that routes by name reads the client's first flight with :func:`parse_client_hello`
and, once it has a :class:`ClientHello`, picks a route by its :attr:`ClientHello.server_name` and
forwards every byte it read, untouched: the TLS session stays the client's and the server's.

The ClientHello is one handshake message (type 1) carried in handshake records (content type 22)::

    record:     type 0x16 | version 3.x (2) | length (2, at most 2^14) | fragment ...
    handshake:  type 0x01 | length (3) | body: version (2), random (32), session id <0..32>,
                cipher suites <2..2^16-2>, compression methods <1..2^8-1>, [extensions <0..2^16-1>]

The message is usually one record, but may span several (large post-quantum key shares), cut
anywhere, its own 4-byte header included: up to :data:`MAX_RECORDS` records and a message of at
most :data:`MAX_MESSAGE` bytes are accepted, so a reader buffers at most :data:`MAX_HELLO_BYTES`.
The last record must end where the ClientHello does (RFC 8446, section 5.1: it precedes a key
change), so :attr:`ClientHello.length` is exactly what the records took; what follows them is the
client's next flight and is not looked at.

:func:`parse_client_hello` works on what has arrived so far: :class:`NeedMore` says how many bytes
it needs in all before it can say more, the end of the record being read (or of the next record's
header), so a reader never takes more than the ClientHello's records from the socket. Bytes that
cannot become a ClientHello raise :class:`NotTls` (a short reason) as soon as that is certain:
whatever the input, nothing else is raised. Both are hostile-input parsers in the same spirit as
:mod:`ipferry.wire.proxy` and :mod:`ipferry.wire.dnsmsg`.

    >>> parse_client_hello(b"\\x16\\x03\\x01")
    NeedMore(total=5)
    >>> parse_client_hello(b"\\x16\\x03\\x01\\x02\\x00\\x01")
    NeedMore(total=517)
    >>> parse_client_hello(b"GET / HTTP/1.1\\r\\n")
    Traceback (most recent call last):
    ...
    ipferry.wire.tls.NotTls: not a TLS handshake record (first byte 0x47)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "MAX_FRAGMENT",
    "MAX_HELLO_BYTES",
    "MAX_MESSAGE",
    "MAX_RECORDS",
    "RECORD_HEADER",
    "ClientHello",
    "NeedMore",
    "NotTls",
    "parse_client_hello",
]

CONTENT_HANDSHAKE = 0x16
HANDSHAKE_CLIENT_HELLO = 0x01
EXT_SERVER_NAME = 0
EXT_ALPN = 16
NAME_TYPE_HOST_NAME = 0

RECORD_HEADER = 5  # content type, version (2), length (2)
MAX_FRAGMENT = 1 << 14  # the most a TLSPlaintext record may carry (RFC 8446, section 5.1)
MAX_RECORDS = 4  # the most records one ClientHello may span here
MAX_MESSAGE = 64 * 1024  # the most bytes the handshake message may have, its 4-byte header included
# The most bytes a caller should ever buffer for one ClientHello: MAX_RECORDS full records.
MAX_HELLO_BYTES = MAX_RECORDS * (RECORD_HEADER + MAX_FRAGMENT)

_HANDSHAKE = 4  # message type (1), length (3)
_FIXED_BODY = 2 + 32  # legacy_version, random
_EXTENSION = struct.Struct("!HH")  # type, length
_MAX_NAME = 253  # characters, no trailing dot
_MAX_LABEL = 63
_LDH = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-")


class NotTls(ValueError):
    """Bytes that are not (and cannot become) a TLS ClientHello this parser accepts; ``str()`` is
    the reason, short."""


class NeedMore(NamedTuple):
    """A valid prefix, not all there yet: ``total`` is how many bytes, from the start, it needs
    before it can say more (always more than it has; never past the end of the record it reads)."""

    total: int


@dataclass(frozen=True, slots=True)
class ClientHello:
    """A whole ClientHello, in ``length`` bytes of records (what follows is not the hello's).

    ``server_name`` is the first host_name of the SNI extension, lowercased, without a trailing
    dot (IDNA stays in its ``xn--`` form), None without one; ``alpn`` the protocols the client
    offers, in its order (latin-1, so any byte reads as one character), empty without the
    extension."""

    server_name: str | None
    alpn: tuple[str, ...]
    length: int


def parse_client_hello(data: bytes | bytearray | memoryview) -> ClientHello | NeedMore:
    """The ClientHello at the start of ``data``; :class:`NeedMore` if it is not all there yet;
    :class:`NotTls` (with the reason) if it cannot be one."""
    data = memoryview(data)
    if data.format != "B" or data.ndim != 1 or not data.c_contiguous:  # a caller's odd view: as bytes
        data = memoryview(data.tobytes())
    have = len(data)
    message = bytearray()  # the handshake message's bytes, from the records read so far
    at = 0
    for _ in range(MAX_RECORDS):
        if have < at + RECORD_HEADER:
            _check_record_start(data[at:])
            return NeedMore(at + RECORD_HEADER)
        _check_record_start(data[at:at + 2])
        length = int.from_bytes(data[at + 3:at + RECORD_HEADER], "big")
        if length == 0:
            raise NotTls("empty handshake record")
        if length > MAX_FRAGMENT:
            raise NotTls(f"record of {length} bytes (at most {MAX_FRAGMENT})")
        end = at + RECORD_HEADER + length
        message += data[at + RECORD_HEADER:min(end, have)]
        size = _check_message(message)
        if have < end:
            return NeedMore(end)
        if size is not None and len(message) == size:
            return _parse_body(bytes(message[_HANDSHAKE:]), end)
        at = end
    raise NotTls(f"ClientHello spans more than {MAX_RECORDS} records")


def _check_record_start(head: memoryview) -> None:
    """The record's first bytes (as many as there are, up to 2) can start a handshake record."""
    if len(head) >= 1 and head[0] != CONTENT_HANDSHAKE:
        if head[0] & 0x80:
            raise NotTls("SSLv2-compatible hello (not supported)")
        raise NotTls(f"not a TLS handshake record (first byte 0x{head[0]:02x})")
    if len(head) >= 2 and head[1] != 3:
        raise NotTls(f"record version major {head[1]} (not 3)")


def _check_message(message: bytearray) -> int | None:
    """The handshake message's size, header included, once its header is there (None before);
    refuses what is certain to be wrong from what there is."""
    if message and message[0] != HANDSHAKE_CLIENT_HELLO:
        raise NotTls(f"handshake type {message[0]} (not ClientHello)")
    if len(message) < _HANDSHAKE:
        return None
    size = _HANDSHAKE + int.from_bytes(message[1:_HANDSHAKE], "big")
    if size > MAX_MESSAGE:
        raise NotTls(f"ClientHello of {size} bytes (at most {MAX_MESSAGE})")
    if len(message) > size:
        raise NotTls("bytes after the ClientHello in its record")
    return size


def _vector(buf: bytes, at: int, width: int, what: str) -> tuple[bytes, int]:
    """The variable-length vector at ``at`` (its length in ``width`` bytes), and the offset after."""
    if at + width > len(buf):
        raise NotTls(f"{what} cut short")
    start = at + width
    end = start + int.from_bytes(buf[at:start], "big")
    if end > len(buf):
        raise NotTls(f"{what} cut short")
    return buf[start:end], end


def _parse_body(body: bytes, length: int) -> ClientHello:
    """The ClientHello's body (after the handshake header): its fields framed, its extensions read."""
    if len(body) < _FIXED_BODY:
        raise NotTls("ClientHello cut short")
    if body[0] != 3:
        raise NotTls(f"ClientHello version major {body[0]} (not 3)")
    session, at = _vector(body, _FIXED_BODY, 1, "session id")
    if len(session) > 32:
        raise NotTls("session id longer than 32 bytes")
    suites, at = _vector(body, at, 2, "cipher suites")
    if not suites or len(suites) % 2:
        raise NotTls("bad cipher suites")
    methods, at = _vector(body, at, 1, "compression methods")
    if not methods:
        raise NotTls("no compression methods")
    if at == len(body):  # no extensions at all (TLS 1.0 and 1.1 allow it)
        return ClientHello(None, (), length)
    extensions, at = _vector(body, at, 2, "extensions")
    if at != len(body):
        raise NotTls("bytes after the extensions")
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    seen: set[int] = set()
    at = 0
    while at < len(extensions):
        if at + _EXTENSION.size > len(extensions):
            raise NotTls("extension cut short")
        kind, size = _EXTENSION.unpack_from(extensions, at)
        at += _EXTENSION.size
        if at + size > len(extensions):
            raise NotTls("extension cut short")
        value = extensions[at:at + size]
        at += size
        # Two of a kind are forbidden (RFC 8446, section 4.2), and two SNIs could route one way
        # here and be served another way by the server.
        if kind in seen:
            raise NotTls(f"extension {kind} twice")
        seen.add(kind)
        if kind == EXT_SERVER_NAME:
            server_name = _server_name(value)
        elif kind == EXT_ALPN:
            alpn = _alpn(value)
    return ClientHello(server_name, alpn, length)


def _server_name(value: bytes) -> str | None:
    """The first host_name of a server_name extension (RFC 6066, section 3), None if it has only
    other name types (their values framed as a host_name's, as every implementation does)."""
    names, end = _vector(value, 0, 2, "server name list")
    if end != len(value) or not names:
        raise NotTls("bad server name list")
    first: bytes | None = None
    at = 0
    while at < len(names):
        kind = names[at]
        name, at = _vector(names, at + 1, 2, "server name")
        if kind == NAME_TYPE_HOST_NAME and first is None:
            first = name
    return None if first is None else _host_name(first)


def _host_name(raw: bytes) -> str:
    """``raw`` as a host name (letters, digits, hyphens; dot-separated labels of 1 to 63, no
    hyphen at either end; at most 253 characters), lowercased, a trailing dot dropped.

    Anything else is refused rather than passed on: a route is picked by this name, so it must
    compare as DNS does. An IP literal is refused too (RFC 6066 forbids them): a name whose last
    label is all digits is one, or no host name."""
    name = raw.lower()  # ASCII only: any other byte is refused below
    if name.endswith(b"."):
        name = name[:-1]
    if not 0 < len(name) <= _MAX_NAME:
        raise NotTls("bad server name")
    labels = name.split(b".")
    for label in labels:
        if (not 0 < len(label) <= _MAX_LABEL or not _LDH.issuperset(label)
                or label.startswith(b"-") or label.endswith(b"-")):
            raise NotTls("bad server name")
    if labels[-1].isdigit():
        raise NotTls("bad server name")
    return name.decode("ascii")


def _alpn(value: bytes) -> tuple[str, ...]:
    """The protocols of an ALPN extension (RFC 7301, section 3.1), in the client's order."""
    protocols, end = _vector(value, 0, 2, "ALPN list")
    if end != len(value) or not protocols:
        raise NotTls("bad ALPN list")
    out = []
    at = 0
    while at < len(protocols):
        protocol, at = _vector(protocols, at, 1, "ALPN protocol")
        if not protocol:
            raise NotTls("empty ALPN protocol")
        out.append(protocol.decode("latin-1"))
    return tuple(out)
