"""DNS messages as the daemon's resolver reads and writes them: pure functions, no I/O.

The forwarder (see :mod:`ipferry.wire.dns`) hands each query a tunnel sends to
:func:`parse_query`, asks the policy about the :class:`DnsQuery`, and either forwards
:attr:`DnsQuery.raw` upstream untouched or answers itself with :func:`refused`, :func:`nxdomain`,
:func:`servfail` or :func:`answer_address`. What comes back from upstream goes through
:func:`parse_answer` for the audit record and the name cache, and is relayed as it came.
Messages are the DNS message itself: over TCP, without the two-byte length in front.

Neither parser raises on bad input (tunnels and upstreams can both be hostile): whatever is not a
message they understand is a :class:`Malformed` with a short reason, a metrics label (all of them
in :data:`MALFORMED_REASONS`). Trailing bytes after the last record are ignored.

Names are text: labels lowercased (ASCII only, as DNS compares them), joined by dots, no trailing
dot, the root ``""``; IDNA stays in its ``xn--`` form. A label byte outside printable ASCII, and a
backslash, are written ``\\DDD`` (decimal, as in zone files); a label holding a dot is not accepted
(``bad_name``), so a name's dots are exactly its label boundaries and :func:`domain_matches` can
compare suffixes as text.

    >>> q = parse_query(bytes.fromhex("1234 0100 0001 0000 0000 0000"
    ...                               "03 575757 07 4578616d706c65 03 636f6d 00 0001 0001"))
    >>> q.id, q.name, q.qtype_name, q.edns
    (4660, 'www.example.com', 'A', False)
    >>> a = parse_answer(answer_address(q, "192.0.2.7", ttl=30))
    >>> a.rcode_name, a.name, a.addresses
    ('NOERROR', 'www.example.com', (('192.0.2.7', 30),))
    >>> parse_query(b"\\x12\\x34")
    Malformed(reason='truncated')
    >>> domain_matches("*.example.com", "WWW.Example.com."), domain_matches("*.example.com", "example.com")
    (True, False)
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

__all__ = [
    "CLASS_IN",
    "MALFORMED_REASONS",
    "RCODE_NAMES",
    "TYPE_A",
    "TYPE_AAAA",
    "TYPE_NAMES",
    "TYPE_OPT",
    "DnsAnswer",
    "DnsQuery",
    "Malformed",
    "answer_address",
    "domain_matches",
    "nxdomain",
    "parse_answer",
    "parse_query",
    "rcode_name",
    "refused",
    "respond",
    "servfail",
    "type_name",
    "valid_domain_pattern",
]

TYPE_A = 1
TYPE_AAAA = 28
TYPE_OPT = 41
CLASS_IN = 1

RCODE_NOERROR = 0
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_REFUSED = 5

# The UDP payload size our own answers' OPT record advertises (the DNS flag day 2020 value).
EDNS_UDP_SIZE = 1232

# IANA's "Resource Record (RR) TYPEs" (the ones worth a name in an audit record).
TYPE_NAMES: dict[int, str] = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 10: "NULL", 12: "PTR", 13: "HINFO", 15: "MX", 16: "TXT",
    17: "RP", 18: "AFSDB", 24: "SIG", 25: "KEY", 28: "AAAA", 29: "LOC", 33: "SRV", 35: "NAPTR",
    36: "KX", 37: "CERT", 38: "A6", 39: "DNAME", 41: "OPT", 42: "APL", 43: "DS", 44: "SSHFP",
    45: "IPSECKEY", 46: "RRSIG", 47: "NSEC", 48: "DNSKEY", 49: "DHCID", 50: "NSEC3", 51: "NSEC3PARAM",
    52: "TLSA", 53: "SMIMEA", 55: "HIP", 59: "CDS", 60: "CDNSKEY", 61: "OPENPGPKEY", 62: "CSYNC",
    63: "ZONEMD", 64: "SVCB", 65: "HTTPS", 99: "SPF", 108: "EUI48", 109: "EUI64", 249: "TKEY",
    250: "TSIG", 251: "IXFR", 252: "AXFR", 253: "MAILB", 254: "MAILA", 255: "ANY", 256: "URI",
    257: "CAA", 32768: "TA", 32769: "DLV",
}

# IANA's "DNS RCODEs" up to the extended ones an OPT record can carry in a response.
RCODE_NAMES: dict[int, str] = {
    0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
    6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE", 11: "DSOTYPENI",
    16: "BADVERS", 23: "BADCOOKIE",
}

MALFORMED_REASONS = frozenset({
    "truncated",       # a header, name or record runs past the end of the message
    "not_a_query",     # parse_query: QR is set (a response)
    "not_a_response",  # parse_answer: QR is clear (a query)
    "bad_opcode",      # not a standard QUERY (NOTIFY, UPDATE, IQUERY, ...)
    "no_question",     # QDCOUNT 0
    "many_questions",  # QDCOUNT > 1
    "bad_name",        # reserved label type, pointer not back before its name or into the header,
                       # over 255 bytes, dot in label
    "bad_edns",        # more than one OPT record, or one whose owner is not the root
    "bad_rdata",       # parse_answer: an IN A record whose data is not 4 bytes, AAAA not 16
})

_HEADER = struct.Struct("!HHHHHH")
_TYPE_CLASS = struct.Struct("!HH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength

_QR = 0x8000
_OPCODE = 0x7800
_TC = 0x0200
_RD = 0x0100
_RA = 0x0080
_CD = 0x0010
_EDNS_DO = 0x8000  # in the low 16 bits of an OPT record's TTL

_MAX_NAME = 255  # octets on the wire, length bytes and the root's zero included
_MAX_LABEL = 63
_MAX_PATTERN = 253  # characters as text, no trailing dot
_PATTERN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


@dataclass(frozen=True, slots=True)
class Malformed:
    """A message the parsers do not accept, and why: one of :data:`MALFORMED_REASONS`."""

    reason: str


@dataclass(frozen=True, slots=True)
class DnsQuery:
    """A standard query with one question, as :func:`parse_query` read it."""

    id: int
    name: str  # lowercased, no trailing dot (see the module's notes on names)
    qtype: int
    qtype_name: str  # "A", "AAAA", ...; str(qtype) for a type without a name here
    edns: bool  # whether the query carries an OPT record
    raw: bytes  # the message as it came, to forward as is
    qclass: int = CLASS_IN
    rd: bool = True  # recursion desired
    cd: bool = False  # checking disabled
    dnssec_ok: bool = False  # the OPT record's DO bit
    udp_size: int = 512  # the largest UDP answer the client takes (its OPT record's, 512 without)
    question: bytes = b""  # the question section as it came (its case kept), for answers


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """A response, as :func:`parse_answer` read it."""

    id: int
    rcode: int  # extended by the OPT record's upper bits when there is one
    rcode_name: str  # "NOERROR", "NXDOMAIN", ...; str(rcode) for an rcode without a name here
    name: str  # the question's name, as :attr:`DnsQuery.name`
    qtype: int
    # Every IN A and AAAA record of the answer section (whatever its owner: CNAME chains are not
    # followed), in order: (address as text, TTL; a TTL with its top bit set counts as 0, RFC 2181).
    addresses: tuple[tuple[str, int], ...]
    truncated: bool = False  # the TC bit: the client should ask again over TCP
    edns: bool = False


def type_name(qtype: int) -> str:
    return TYPE_NAMES.get(qtype) or str(qtype)


def rcode_name(rcode: int) -> str:
    return RCODE_NAMES.get(rcode) or str(rcode)


# -- reading -------------------------------------------------------------------------------------

class _Bad(Exception):
    """Internal: carries a Malformed reason out of the readers."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _label_text(label: bytes) -> str:
    out = []
    for b in label.lower():
        if b == 0x2E:  # "."
            raise _Bad("bad_name")
        if 0x21 <= b <= 0x7E and b != 0x5C:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    return "".join(out)


def _read_name(data: bytes, offset: int) -> tuple[str, int]:
    """The name at ``offset`` as text, and the offset after it (after the first pointer, if any).

    A pointer must point strictly before the start of the labels that lead to it (the name's own
    start, or the previous pointer's target): each jump goes further back, so the walk ends. And
    never into the header, which holds no name: copied into an answer (a question goes back as it
    came), such a pointer would name the answer's header instead.
    """
    labels: list[str] = []
    wire_length = 1  # the root's zero byte
    end = -1
    pos = start = offset
    limit = len(data)
    while True:
        if pos >= limit:
            raise _Bad("truncated")
        length = data[pos]
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 2 > limit:
                raise _Bad("truncated")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if target >= start or target < _HEADER.size:
                raise _Bad("bad_name")
            if end < 0:
                end = pos + 2
            pos = start = target
            continue
        if kind:
            raise _Bad("bad_name")  # 0x40 and 0x80: extended and reserved label types
        if length == 0:
            return ".".join(labels), (end if end >= 0 else pos + 1)
        if pos + 1 + length > limit:
            raise _Bad("truncated")
        wire_length += 1 + length
        if wire_length > _MAX_NAME:
            raise _Bad("bad_name")
        labels.append(_label_text(data[pos + 1:pos + 1 + length]))
        pos += 1 + length


def _skip_name(data: bytes, offset: int) -> int:
    """The offset after the name at ``offset``, checking its form but not following pointers."""
    pos = offset
    limit = len(data)
    wire_length = 1
    while True:
        if pos >= limit:
            raise _Bad("truncated")
        length = data[pos]
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 2 > limit:
                raise _Bad("truncated")
            return pos + 2
        if kind:
            raise _Bad("bad_name")
        if length == 0:
            return pos + 1
        wire_length += 1 + length
        if wire_length > _MAX_NAME:
            raise _Bad("bad_name")
        pos += 1 + length


def _read_header(data: bytes) -> tuple[int, int, int, int, int, int]:
    if len(data) < _HEADER.size:
        raise _Bad("truncated")
    return _HEADER.unpack_from(data)


def _read_question(data: bytes, qdcount: int) -> tuple[str, int, int, int]:
    """The question's name, type, class and the offset after it."""
    if qdcount == 0:
        raise _Bad("no_question")
    if qdcount > 1:
        raise _Bad("many_questions")
    name, pos = _read_name(data, _HEADER.size)
    if pos + _TYPE_CLASS.size > len(data):
        raise _Bad("truncated")
    qtype, qclass = _TYPE_CLASS.unpack_from(data, pos)
    return name, qtype, qclass, pos + _TYPE_CLASS.size


def _skip_records(data: bytes, pos: int, count: int) -> int:
    for _ in range(count):
        pos = _skip_name(data, pos)
        if pos + _RR_FIXED.size > len(data):
            raise _Bad("truncated")
        rdlength = _RR_FIXED.unpack_from(data, pos)[3]
        pos += _RR_FIXED.size + rdlength
        if pos > len(data):
            raise _Bad("truncated")
    return pos


def _read_opt(data: bytes, pos: int, count: int) -> tuple[int, int] | None:
    """The additional section's OPT record (its class, the UDP size, and its TTL), if any."""
    opt: tuple[int, int] | None = None
    for _ in range(count):
        start = pos
        pos = _skip_name(data, pos)
        if pos + _RR_FIXED.size > len(data):
            raise _Bad("truncated")
        rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, pos)
        pos += _RR_FIXED.size + rdlength
        if pos > len(data):
            raise _Bad("truncated")
        if rtype == TYPE_OPT:
            if opt is not None or data[start] != 0:
                raise _Bad("bad_edns")
            opt = (rclass, ttl)
    return opt


def parse_query(data: bytes) -> DnsQuery | Malformed:
    """``data`` (any bytes-like) as a standard query with exactly one question, or why it is not one."""
    try:
        return _parse_query(bytes(data))
    except _Bad as bad:
        return Malformed(bad.reason)


def _parse_query(data: bytes) -> DnsQuery:
    ident, flags, qdcount, ancount, nscount, arcount = _read_header(data)
    if flags & _QR:
        raise _Bad("not_a_query")
    if flags & _OPCODE:
        raise _Bad("bad_opcode")
    name, qtype, qclass, pos = _read_question(data, qdcount)
    question = data[_HEADER.size:pos]
    pos = _skip_records(data, pos, ancount + nscount)
    opt = _read_opt(data, pos, arcount)
    return DnsQuery(
        id=ident, name=name, qtype=qtype, qtype_name=type_name(qtype), edns=opt is not None,
        raw=bytes(data), qclass=qclass, rd=bool(flags & _RD), cd=bool(flags & _CD),
        dnssec_ok=bool(opt is not None and opt[1] & _EDNS_DO),
        udp_size=max(512, opt[0]) if opt is not None else 512, question=bytes(question))


def parse_answer(data: bytes) -> DnsAnswer | Malformed:
    """``data`` (any bytes-like) as a response to a one-question query, or why it is not one."""
    try:
        return _parse_answer(bytes(data))
    except _Bad as bad:
        return Malformed(bad.reason)


def _parse_answer(data: bytes) -> DnsAnswer:
    ident, flags, qdcount, ancount, nscount, arcount = _read_header(data)
    if not flags & _QR:
        raise _Bad("not_a_response")
    if flags & _OPCODE:
        raise _Bad("bad_opcode")
    name, qtype, _qclass, pos = _read_question(data, qdcount)
    addresses: list[tuple[str, int]] = []
    for _ in range(ancount):
        pos = _skip_name(data, pos)
        if pos + _RR_FIXED.size > len(data):
            raise _Bad("truncated")
        rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, pos)
        pos += _RR_FIXED.size
        if pos + rdlength > len(data):
            raise _Bad("truncated")
        if rclass == CLASS_IN and rtype in (TYPE_A, TYPE_AAAA):
            if rdlength != (4 if rtype == TYPE_A else 16):
                raise _Bad("bad_rdata")
            rdata = data[pos:pos + rdlength]
            address = ipaddress.IPv4Address(rdata) if rtype == TYPE_A else ipaddress.IPv6Address(rdata)
            addresses.append((str(address), 0 if ttl & 0x80000000 else ttl))
        pos += rdlength
    pos = _skip_records(data, pos, nscount)
    opt = _read_opt(data, pos, arcount)
    rcode = flags & 0x000F
    if opt is not None:
        rcode |= (opt[1] >> 24) << 4
    return DnsAnswer(id=ident, rcode=rcode, rcode_name=rcode_name(rcode), name=name, qtype=qtype,
                     addresses=tuple(addresses), truncated=bool(flags & _TC), edns=opt is not None)


# -- writing -------------------------------------------------------------------------------------

def _opt_record(q: DnsQuery) -> bytes:
    # Root owner, type OPT, our UDP size, extended rcode 0 and version 0, the DO bit echoed (RFC
    # 3225), no options (the query's, cookies included, are not echoed).
    return b"\0" + _RR_FIXED.pack(TYPE_OPT, EDNS_UDP_SIZE, _EDNS_DO if q.dnssec_ok else 0, 0)


def _question(q: DnsQuery) -> bytes:
    if q.question:
        return q.question
    # A DnsQuery made by hand: encode its name (text as parse_query writes it, escapes aside).
    wire = b"".join(bytes([len(label)]) + label.encode("ascii")
                    for label in q.name.split(".") if label)
    return wire + b"\0" + _TYPE_CLASS.pack(q.qtype, q.qclass)


def respond(q: DnsQuery, rcode: int, answers: bytes = b"", ancount: int = 0) -> bytes:
    """A response to ``q``: its id, question, RD and CD bits, RA set, ``rcode`` (0..15), the
    ``ancount`` records in ``answers`` (names may point at the question's, offset 12), and an OPT
    record if the query had one."""
    if not 0 <= rcode <= 15:
        raise ValueError(f"rcode {rcode} needs an OPT record's extended bits; only 0..15 here")
    flags = _QR | _RA | rcode | (_RD if q.rd else 0) | (_CD if q.cd else 0)
    header = _HEADER.pack(q.id, flags, 1, ancount, 0, 1 if q.edns else 0)
    return header + _question(q) + answers + (_opt_record(q) if q.edns else b"")


def refused(q: DnsQuery) -> bytes:
    return respond(q, RCODE_REFUSED)


def nxdomain(q: DnsQuery) -> bytes:
    return respond(q, RCODE_NXDOMAIN)


def servfail(q: DnsQuery) -> bytes:
    return respond(q, RCODE_SERVFAIL)


def answer_address(q: DnsQuery, address: str, ttl: int = 60) -> bytes:
    """``address`` as the answer to ``q``: an A record to an IN A query for an IPv4 address, AAAA
    to an IN AAAA query for an IPv6 one; any other query gets NOERROR and no answer (NODATA).

    Raises ValueError for an ``address`` that is not an IP address or a TTL outside 0..2**31-1.
    """
    ip = ipaddress.ip_address(address)
    if not 0 <= ttl <= 0x7FFFFFFF:
        raise ValueError(f"a TTL is 0..2147483647 seconds, not {ttl}")
    rtype = TYPE_A if ip.version == 4 else TYPE_AAAA
    if q.qtype != rtype or q.qclass != CLASS_IN:
        return respond(q, RCODE_NOERROR)
    record = b"\xc0\x0c" + _RR_FIXED.pack(rtype, CLASS_IN, ttl, len(ip.packed)) + ip.packed
    return respond(q, RCODE_NOERROR, record, 1)


# -- names in rules ------------------------------------------------------------------------------

def _normal(name: str) -> str:
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def domain_matches(pattern: str, name: str) -> bool:
    """Whether ``name`` is ``pattern`` (``"corp.example"``) or, for ``"*.suffix"``, any name
    strictly under the suffix (not the suffix itself). Case-insensitive, trailing dots ignored.

    ``pattern`` should be valid (:func:`valid_domain_pattern`); ``name`` is text as
    :func:`parse_query` writes it.
    """
    pattern = _normal(pattern)
    name = _normal(name)
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".suffix"
        return len(name) > len(suffix) and name.endswith(suffix)
    return name == pattern


def valid_domain_pattern(pattern: str) -> str | None:
    """None if ``pattern`` is a valid ``domain`` for a rule, else what is wrong with it.

    Valid: a name (``"corp.example"``) or ``"*."`` and one (``"*.corp.example"``); labels of
    letters, digits, ``-`` and ``_``, 1 to 63 of them; at most 253 characters; one trailing dot
    allowed; IDNA names in their ``xn--`` form.
    """
    if not isinstance(pattern, str):
        return "not a string"
    text = pattern[:-1] if pattern.endswith(".") else pattern
    if not text:
        return "empty"
    if text == "*":
        return "'*' needs a suffix after it, as in '*.example.com'"
    if text.startswith("*."):
        text = text[2:]
    if len(text) > _MAX_PATTERN:
        return f"longer than {_MAX_PATTERN} characters"
    if not text.isascii():
        return "not ASCII: write internationalised names in their xn-- (IDNA) form"
    for label in text.lower().split("."):
        if not label:
            return "an empty label (two dots, or a leading dot)"
        if label == "*" or "*" in label:
            return "'*' only as the whole first label, as in '*.example.com'"
        if len(label) > _MAX_LABEL:
            return f"a label longer than {_MAX_LABEL} characters"
        bad = set(label) - _PATTERN_CHARS
        if bad:
            return f"characters other than letters, digits, '-' and '_': {''.join(sorted(bad))!r}"
    return None
