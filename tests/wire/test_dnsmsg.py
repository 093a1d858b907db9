"""DNS messages: queries and answers against dpkt- and dnslib-built ones, every Malformed reason,
answers the policy writes as dnslib reads them, fuzzed garbage that must never raise, domain rules."""

import doctest
import ipaddress
import struct

import dnslib
import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipferry.wire import dnsmsg
from ipferry.wire.dnsmsg import (
    MALFORMED_REASONS,
    TYPE_NAMES,
    DnsAnswer,
    DnsQuery,
    Malformed,
    answer_address,
    domain_matches,
    nxdomain,
    parse_answer,
    parse_query,
    refused,
    respond,
    servfail,
    valid_domain_pattern,
)

DNS = dpkt.dns.DNS

LABEL = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1, max_size=20)
NAME = st.lists(LABEL, min_size=1, max_size=5).map(".".join)
QTYPE = st.sampled_from([1, 28, 16, 15, 5, 33, 65, 255, 12, 64, 4242])


def query(name="www.example.com", qtype=dpkt.dns.DNS_A, ident=0x1234, rd=True, edns=False, do=False,
          udp_size=4096, flags=None, an=(), ns=(), ar=()):
    """A query as dpkt writes it (optionally with an OPT record, DO bit set if ``do``)."""
    d = DNS(id=ident, op=(dpkt.dns.DNS_RD if rd else 0) if flags is None else flags,
            qd=[DNS.Q(name=name, type=qtype)], an=list(an), ns=list(ns), ar=list(ar))
    if edns:
        d.ar.append(DNS.RR(name="", type=41, cls=udp_size, ttl=0x8000 if do else 0, rdata=b""))
    return bytes(d)


def header(ident=1, flags=0x0100, qd=1, an=0, ns=0, ar=0):
    return struct.pack("!HHHHHH", ident, flags, qd, an, ns, ar)


QUESTION = b"\x03www\x07example\x03com\x00" + struct.pack("!HH", 1, 1)


def test_docstring_examples():
    assert doctest.testmod(dnsmsg).failed == 0


# -- queries -------------------------------------------------------------------------------------

@given(NAME, QTYPE, st.integers(0, 0xFFFF), st.booleans(), st.booleans(), st.booleans(),
       st.integers(0, 0xFFFF))
def test_query_fields_match_dpkt_and_dnslib(name, qtype, ident, rd, edns, do, udp_size):
    raw = query(name, qtype, ident, rd=rd, edns=edns, do=do, udp_size=udp_size)
    q = parse_query(raw)
    assert isinstance(q, DnsQuery)
    ref = dnslib.DNSRecord.parse(raw)
    assert q.id == ident == ref.header.id
    assert q.name == name.lower() == str(ref.q.qname).rstrip(".").lower()
    assert q.qtype == qtype == ref.q.qtype and q.qclass == 1
    assert q.qtype_name == TYPE_NAMES.get(qtype, str(qtype))
    assert q.edns is edns and q.rd is bool(ref.header.rd) is rd
    assert q.dnssec_ok is (edns and do)
    assert q.udp_size == (max(512, udp_size) if edns else 512)
    assert q.raw == raw and raw[12:12 + len(q.question)] == q.question


def test_queries_dnslib_writes():
    q = parse_query(dnslib.DNSRecord.question("Mail.Example.ORG.", "MX").pack())
    assert isinstance(q, DnsQuery)
    assert (q.name, q.qtype, q.qtype_name, q.edns) == ("mail.example.org", 15, "MX", False)
    rec = dnslib.DNSRecord.question("example.net", "TXT")
    rec.add_ar(dnslib.EDNS0(udp_len=1232, flags="do"))
    q = parse_query(rec.pack())
    assert isinstance(q, DnsQuery)
    assert (q.name, q.qtype_name, q.edns, q.dnssec_ok, q.udp_size) == ("example.net", "TXT", True, True, 1232)


def test_type_names_agree_with_dnslib():
    theirs = {number: name for number, name in dnslib.QTYPE.forward.items() if number != 53}
    assert TYPE_NAMES[53] == "SMIMEA"  # IANA (RFC 8162); dnslib 0.9 calls 53 "HIP" too, which is 55
    assert {n: v for n, v in TYPE_NAMES.items() if n in theirs} == theirs
    assert parse_query(query(qtype=4242)).qtype_name == "4242"


def test_names_as_text():
    root = header() + b"\x00" + struct.pack("!HH", 2, 1)
    assert parse_query(root).name == ""
    odd = header() + b"\x05a\\b\x00\xff\x03com\x00" + struct.pack("!HH", 1, 1)
    assert parse_query(odd).name == "a\\092b\\000\\255.com"
    # Only ASCII letters are lowered (DNS compares names so); other bytes keep their value.
    upper = header() + b"\x03A\xc9Z\x00" + struct.pack("!HH", 1, 1)
    assert parse_query(upper).name == "a\\201z"


def test_a_query_may_carry_other_records_but_not_point_into_its_header():
    # The question's name points into the header, where the id's first byte, 0, reads as the
    # root: refused, as an answer copying the question would point at the answer's header.
    raw = struct.pack("!H", 0x0000) + header()[2:] + b"\xc0\x00" + struct.pack("!HH", 1, 1)
    assert parse_query(raw) == Malformed("bad_name")
    # Answer and authority records in a query are skipped; records after the OPT too.
    other = DNS.RR(name="x.example", type=1, cls=1, ttl=5, ip=b"\x01\x02\x03\x04")
    raw = query(an=[other], ns=[other], edns=True, do=True)
    after_opt = b"\x01x\x00" + struct.pack("!HHIH", 1, 1, 5, 4) + b"\x01\x02\x03\x04"
    raw = raw[:11] + bytes([raw[11] + 1]) + raw[12:] + after_opt
    q = parse_query(raw)
    assert isinstance(q, DnsQuery) and q.edns and q.dnssec_ok


def test_trailing_bytes_are_ignored():
    raw = query() + b"garbage"
    q = parse_query(raw)
    assert isinstance(q, DnsQuery) and q.raw == raw and q.name == "www.example.com"


LONG_NAME = b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x00"  # 257 bytes on the wire
NAME_253 = b"".join(b"\x3f" + b"a" * 63 for _ in range(3)) + b"\x3d" + b"a" * 61 + b"\x00"  # 255


@pytest.mark.parametrize(("raw", "reason"), [
    (b"", "truncated"),
    (header()[:11], "truncated"),
    (header(), "truncated"),
    (header() + QUESTION[:-1], "truncated"),
    (header() + b"\x03www\xc0", "truncated"),
    (header(ar=1) + QUESTION, "truncated"),
    (header(ar=1) + QUESTION + b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x05", "truncated"),
    (header(flags=0x8100) + QUESTION, "not_a_query"),
    (header(flags=0x2800) + QUESTION, "bad_opcode"),  # UPDATE
    (header(flags=0x2000) + QUESTION, "bad_opcode"),  # NOTIFY
    (header(qd=0), "no_question"),
    (header(qd=0, ar=1) + b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00", "no_question"),
    (header(qd=2) + QUESTION + QUESTION, "many_questions"),
    (header() + b"\x41" + b"a" * 65 + b"\x00\x00\x01\x00\x01", "bad_name"),  # label type 01
    (header() + b"\x81" + b"a" * 65 + b"\x00\x00\x01\x00\x01", "bad_name"),  # label type 10
    (header() + b"\xc0\x0c\x00\x01\x00\x01", "bad_name"),  # points at itself
    (header() + b"\x01a\xc0\x0e\x00\x01\x00\x01", "bad_name"),  # points forwards
    # Into the header: hypothesis found that an answer copying this question changed its name.
    (header() + b"\xc0\x00\x00\x03ww" + b"\x00\x01\x00\x01", "bad_name"),
    (header() + LONG_NAME + b"\x00\x01\x00\x01", "bad_name"),
    (header() + b"\x03a.b\x03com\x00\x00\x01\x00\x01", "bad_name"),  # a dot inside a label
    (query(edns=True) + b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00", "bad_edns"),
    (header(ar=1) + QUESTION + b"\x01x\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00", "bad_edns"),
])
def test_malformed_queries(raw, reason):
    if reason == "bad_edns" and raw.startswith(query(edns=True)):  # a second OPT record: count it
        raw = raw[:11] + bytes([raw[11] + 1]) + raw[12:]
    assert parse_query(raw) == Malformed(reason)
    assert reason in MALFORMED_REASONS


def test_a_name_of_255_bytes_is_the_longest():
    q = parse_query(header() + NAME_253 + b"\x00\x01\x00\x01")
    assert isinstance(q, DnsQuery) and len(q.name) == 253


def test_pointer_loops_end():
    # Every pointer must point before the labels that led to it, so no loop is followed.
    for name in (b"\xc0\x0e\xc0\x0c",  # a -> b -> a
                 b"\x01a\xc0\x0c",  # back to its own start, after a label
                 b"\x01a\x01b\xc0\x0e"):  # back into its own labels
        assert parse_query(header() + name + b"\x00\x01\x00\x01") == Malformed("bad_name"), name


@given(st.sampled_from([query(), query("a.b.example", 28, edns=True, do=True),
                        dnslib.DNSRecord.question("x.example.com", "HTTPS").pack()]), st.data())
def test_every_strict_prefix_of_a_query_is_truncated(raw, data):
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert parse_query(raw[:cut]) == Malformed("truncated")
    if cut < 12:  # past the header, a query is not an answer
        assert parse_answer(raw[:cut]) == Malformed("truncated")


# -- answers we write ----------------------------------------------------------------------------

@pytest.mark.parametrize(("build", "rcode"), [(refused, 5), (nxdomain, 3), (servfail, 2)])
@pytest.mark.parametrize("edns", [False, True])
@pytest.mark.parametrize("do", [False, True])
@pytest.mark.parametrize("rd", [False, True])
def test_refusals_keep_id_question_rd_and_edns(build, rcode, edns, do, rd):
    q = parse_query(query("Www.Example.COM", 28, ident=0xBEEF, rd=rd, edns=edns, do=do))
    raw = build(q)
    ref = dnslib.DNSRecord.parse(raw)
    assert ref.header.id == 0xBEEF and ref.header.qr == 1 and ref.header.rcode == rcode
    assert bool(ref.header.rd) is rd and ref.header.ra == 1 and ref.header.aa == 0
    assert len(ref.questions) == 1 and str(ref.q.qname) == "Www.Example.COM."  # case kept (0x20)
    assert ref.q.qtype == 28 and ref.q.qclass == 1 and ref.rr == [] and ref.auth == []
    opts = [r for r in ref.ar if r.rtype == 41]
    assert len(opts) == (1 if edns else 0) and len(ref.ar) == len(opts)
    if edns:
        assert opts[0].rclass == dnsmsg.EDNS_UDP_SIZE and opts[0].ttl == (0x8000 if do else 0)
    d = DNS(raw)
    assert (d.id, d.qr, d.rcode, len(d.qd), d.qd[0].name) == (0xBEEF, 1, rcode, 1, "Www.Example.COM")
    a = parse_answer(raw)
    assert a == DnsAnswer(0xBEEF, rcode, dnslib.RCODE.get(rcode), "www.example.com", 28, (), edns=edns)


def test_cd_bit_is_copied():
    q = parse_query(query(flags=dpkt.dns.DNS_RD | 0x0010))
    assert q.cd and dnslib.DNSRecord.parse(servfail(q)).header.cd == 1


@pytest.mark.parametrize(("qtype", "address", "expected"), [
    (1, "192.0.2.7", "192.0.2.7"),
    (28, "2001:db8::7", "2001:db8::7"),
    (28, "::ffff:192.0.2.7", "::ffff:192.0.2.7"),
    (1, "2001:db8::7", None),
    (28, "192.0.2.7", None),
    (15, "192.0.2.7", None),
    (255, "192.0.2.7", None),
])
@pytest.mark.parametrize("edns", [False, True])
def test_answer_address(qtype, address, expected, edns):
    q = parse_query(query("App.Corp.Example", qtype, ident=99, edns=edns))
    raw = answer_address(q, address, ttl=300)
    ref = dnslib.DNSRecord.parse(raw)
    assert ref.header.id == 99 and ref.header.rcode == 0 and ref.header.qr == 1
    assert str(ref.q.qname) == "App.Corp.Example." and ref.q.qtype == qtype
    assert len([r for r in ref.ar if r.rtype == 41]) == (1 if edns else 0)
    a = parse_answer(raw)
    assert isinstance(a, DnsAnswer) and a.rcode_name == "NOERROR" and a.name == "app.corp.example"
    if expected is None:  # NODATA
        assert ref.rr == [] and a.addresses == ()
    else:
        assert len(ref.rr) == 1 and ref.rr[0].ttl == 300
        assert ipaddress.ip_address(str(ref.rr[0].rdata)) == ipaddress.ip_address(expected)
        assert str(ref.rr[0].rname) == "App.Corp.Example." and ref.rr[0].rtype == qtype
        assert a.addresses == ((str(ipaddress.ip_address(expected)), 300),)
        d = DNS(raw)
        assert d.an[0].name == "App.Corp.Example" and d.an[0].ttl == 300


def test_answer_address_outside_class_in_is_nodata():
    raw = header() + b"\x07version\x04bind\x00" + struct.pack("!HH", 1, 3)  # CH
    q = parse_query(raw)
    assert isinstance(q, DnsQuery) and q.qclass == 3
    assert parse_answer(answer_address(q, "192.0.2.1")).addresses == ()


def test_answer_address_rejects_bad_values():
    q = parse_query(query())
    with pytest.raises(ValueError):
        answer_address(q, "not.an.address")
    with pytest.raises(ValueError):
        answer_address(q, "192.0.2.1", ttl=-1)
    with pytest.raises(ValueError):
        answer_address(q, "192.0.2.1", ttl=2**31)
    with pytest.raises(ValueError):
        respond(q, 16)


def test_a_query_made_by_hand_is_answered_too():
    q = DnsQuery(id=5, name="host.example", qtype=1, qtype_name="A", edns=False, raw=b"")
    ref = dnslib.DNSRecord.parse(answer_address(q, "198.51.100.1"))
    assert str(ref.q.qname) == "host.example." and str(ref.rr[0].rdata) == "198.51.100.1"


# -- answers upstreams write ---------------------------------------------------------------------

def dnslib_reply(name="www.example.com", qtype="A", rcode=0, edns=False):
    reply = dnslib.DNSRecord.question(name, qtype).reply()
    reply.header.rcode = rcode
    if edns:
        reply.add_ar(dnslib.EDNS0(udp_len=1232))
    return reply


def test_answer_with_cname_chain_glue_and_authority():
    reply = dnslib_reply("www.Example.com", "A", edns=True)
    reply.add_answer(dnslib.RR("www.example.com", dnslib.QTYPE.CNAME, rdata=dnslib.CNAME("cdn.example.net"),
                               ttl=600))
    reply.add_answer(dnslib.RR("cdn.example.net", dnslib.QTYPE.A, rdata=dnslib.A("203.0.113.1"), ttl=30))
    reply.add_answer(dnslib.RR("cdn.example.net", dnslib.QTYPE.A, rdata=dnslib.A("203.0.113.2"), ttl=20))
    reply.add_answer(dnslib.RR("cdn.example.net", dnslib.QTYPE.AAAA, rdata=dnslib.AAAA("2001:db8::1"),
                               ttl=10))
    reply.add_answer(dnslib.RR("cdn.example.net", dnslib.QTYPE.TXT, rdata=dnslib.TXT("hello"), ttl=10))
    reply.add_auth(dnslib.RR("example.net", dnslib.QTYPE.NS, rdata=dnslib.NS("ns.example.net")))
    reply.add_ar(dnslib.RR("ns.example.net", dnslib.QTYPE.A, rdata=dnslib.A("198.51.100.53")))  # glue
    raw = reply.pack()
    assert b"\xc0" in raw[12:]  # dnslib compresses names: they are followed through pointers
    a = parse_answer(raw)
    assert a == DnsAnswer(reply.header.id, 0, "NOERROR", "www.example.com", 1,
                          (("203.0.113.1", 30), ("203.0.113.2", 20), ("2001:db8::1", 10)), edns=True)


@pytest.mark.parametrize(("rcode", "name"), [(0, "NOERROR"), (1, "FORMERR"), (2, "SERVFAIL"),
                                             (3, "NXDOMAIN"), (4, "NOTIMP"), (5, "REFUSED"), (12, "12")])
def test_answer_rcodes(rcode, name):
    a = parse_answer(dnslib_reply(rcode=rcode).pack())
    assert isinstance(a, DnsAnswer) and (a.rcode, a.rcode_name, a.addresses) == (rcode, name, ())


def test_extended_rcode_from_the_opt_record():
    reply = dnslib_reply()
    reply.add_ar(dnslib.EDNS0(ext_rcode=1))  # 1 << 4 | 0: BADVERS
    a = parse_answer(reply.pack())
    assert (a.rcode, a.rcode_name, a.edns) == (16, "BADVERS", True)


def test_answer_from_dpkt_with_tc_and_ttls():
    d = DNS(id=3, op=dpkt.dns.DNS_RD, qr=dpkt.dns.DNS_R, qd=[DNS.Q(name="t.example", type=1)],
            an=[DNS.RR(name="t.example", type=1, cls=1, ttl=0x80000001, ip=b"\x0a\x00\x00\x01"),
                DNS.RR(name="t.example", type=1, cls=3, ttl=5, ip=b"\x0a\x00\x00\x02"),  # class CH
                DNS.RR(name="t.example", type=28, cls=1, ttl=0x7FFFFFFF, ip6=bytes(15) + b"\x01")])
    d.qr = 1
    d.op |= 0x0200  # TC
    a = parse_answer(bytes(d))
    assert isinstance(a, DnsAnswer) and a.truncated and a.id == 3
    assert a.addresses == (("10.0.0.1", 0), ("::1", 0x7FFFFFFF))


@pytest.mark.parametrize(("raw", "reason"), [
    (b"\x00", "truncated"),
    (header(flags=0x0100) + QUESTION, "not_a_response"),
    (header(flags=0xA100) + QUESTION, "bad_opcode"),
    (header(flags=0x8183, qd=0), "no_question"),
    (header(flags=0x8180, qd=2) + QUESTION * 2, "many_questions"),
    (header(flags=0x8180) + b"\xc0\x20" + QUESTION[-4:], "bad_name"),
    (header(flags=0x8180, an=1) + QUESTION + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 5) + bytes(5),
     "bad_rdata"),
    (header(flags=0x8180, an=1) + QUESTION + b"\xc0\x0c" + struct.pack("!HHIH", 28, 1, 5, 4) + bytes(4),
     "bad_rdata"),
    (header(flags=0x8180, an=1) + QUESTION + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + bytes(3),
     "truncated"),
    (header(flags=0x8180, an=1) + QUESTION + b"\xc0", "truncated"),
    (header(flags=0x8180, an=1) + QUESTION + b"\x80\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + bytes(4),
     "bad_name"),
    (header(flags=0x8180, ns=1) + QUESTION + b"\xc0\x0c" + struct.pack("!HHIH", 2, 1, 5, 9), "truncated"),
    (header(flags=0x8180, ar=2) + QUESTION + (b"\x00" + struct.pack("!HHIH", 41, 512, 0, 0)) * 2,
     "bad_edns"),
])
def test_malformed_answers(raw, reason):
    assert parse_answer(raw) == Malformed(reason)
    assert reason in MALFORMED_REASONS


def test_every_reason_is_tested():
    reasons = {"truncated", "not_a_query", "not_a_response", "bad_opcode", "no_question", "many_questions",
               "bad_name", "bad_edns", "bad_rdata"}
    assert reasons == MALFORMED_REASONS


def test_every_strict_prefix_of_an_answer_is_truncated():
    raw = parse_query(query(edns=True))
    raw = answer_address(raw, "192.0.2.1")
    for cut in range(len(raw)):
        assert parse_answer(raw[:cut]) == Malformed("truncated"), cut


# -- garbage never raises ------------------------------------------------------------------------

SEEDS = [
    query(),
    query("deep.sub.example.org", 28, edns=True, do=True),
    answer_address(parse_query(query(edns=True)), "192.0.2.1"),
    answer_address(parse_query(query(qtype=28)), "2001:db8::1"),
    nxdomain(parse_query(query(edns=True))),
    dnslib.DNSRecord.parse(dnslib_reply(edns=True).pack()).pack(),
]


@settings(max_examples=500)
@given(st.binary(max_size=600))
def test_garbage_never_raises(data):
    for parse in (parse_query, parse_answer):
        result = parse(data)
        assert isinstance(result, (DnsQuery, DnsAnswer, Malformed))
        if isinstance(result, Malformed):
            assert result.reason in MALFORMED_REASONS


@settings(max_examples=500)
@given(st.binary(max_size=40), st.binary(max_size=300))
def test_garbage_behind_a_plausible_header_never_raises(flags, body):
    for qr in (0, 0x8000):
        data = header(flags=qr, qd=1, an=3, ns=2, ar=2)[:2] + flags[:2].ljust(2, b"\0") + header()[4:] + body
        for parse in (parse_query, parse_answer):
            result = parse(data)
            assert isinstance(result, (DnsQuery, DnsAnswer, Malformed))


@settings(max_examples=1000)
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1,
                                        max_size=8),
       st.integers(0, 3))
def test_mutated_messages_never_raise(seed, edits, how):
    data = bytearray(seed)
    for where, value in edits:
        i = where % (len(data) + 1)
        if how == 0 or i == len(data):
            data.insert(i, value)
        elif how == 1:
            data[i] = value
        elif how == 2:
            del data[i]
        else:
            data[i] ^= 1 << (value % 8)
    for parse in (parse_query, parse_answer):
        result = parse(bytes(data))
        assert isinstance(result, (DnsQuery, DnsAnswer, Malformed))
        if isinstance(result, DnsQuery):  # what parses can be answered
            for build in (refused, nxdomain, servfail):
                assert isinstance(parse_answer(build(result)), DnsAnswer)
            assert isinstance(parse_answer(answer_address(result, "192.0.2.1")), DnsAnswer)


# -- domain rules --------------------------------------------------------------------------------

@pytest.mark.parametrize(("pattern", "name", "expected"), [
    ("corp.example", "corp.example", True),
    ("corp.example", "CORP.Example.", True),
    ("Corp.Example.", "corp.example", True),
    ("corp.example", "www.corp.example", False),
    ("corp.example", "corp.example.com", False),
    ("corp.example", "xcorp.example", False),
    ("*.corp.example", "www.corp.example", True),
    ("*.corp.example", "a.b.c.corp.example", True),
    ("*.corp.example", "WWW.CORP.EXAMPLE.", True),
    ("*.Corp.Example.", "www.corp.example", True),
    ("*.corp.example", "corp.example", False),
    ("*.corp.example", "corp.example.", False),
    ("*.corp.example", "xcorp.example", False),
    ("*.corp.example", "www.corp.example.evil", False),
    ("*.corp.example", "", False),
    ("*.corp.example", ".corp.example", False),
    ("*.example", "a\\046b.example", True),  # an escaped byte is part of one label
    ("*.b.example", "a\\046b.example", False),
])
def test_domain_matches(pattern, name, expected):
    assert valid_domain_pattern(pattern) is None
    assert domain_matches(pattern, name) is expected


def test_domain_matches_parsed_names():
    q = parse_query(query("Api.Corp.Example"))
    assert domain_matches("*.corp.example", q.name) and domain_matches("api.corp.example", q.name)
    # A label with a dot inside cannot pass for two: such queries are not accepted at all.
    assert parse_query(header() + b"\x08api.corp\x07example\x00\x00\x01\x00\x01") == Malformed("bad_name")


@pytest.mark.parametrize(("pattern", "problem"), [
    ("", "empty"),
    (".", "empty"),
    ("*", "needs a suffix"),
    ("*.", "needs a suffix"),
    ("*.*.example", "'*' only"),
    ("a.*.example", "'*' only"),
    ("*example.com", "'*' only"),
    ("**.example.com", "'*' only"),
    ("a..example", "empty label"),
    (".example", "empty label"),
    ("example..", "empty label"),
    ("bücher.example", "not ASCII"),
    ("a b.example", "characters other"),
    ("a/b.example", "characters other"),
    ("a" * 64 + ".example", "longer than 63"),
    (".".join(["a" * 63] * 4), "longer than 253"),
])
def test_invalid_domain_patterns(pattern, problem):
    reason = valid_domain_pattern(pattern)
    assert reason is not None and problem in reason


@pytest.mark.parametrize("pattern", ["example", "corp.example", "Corp.Example.", "*.corp.example",
                                     "*.example.", "_dmarc.example.com", "xn--bcher-kva.example",
                                     "a-b.c-d.example", ".".join(["a" * 63] * 3 + ["a" * 61])])
def test_valid_domain_patterns(pattern):
    assert valid_domain_pattern(pattern) is None
