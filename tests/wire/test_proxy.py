"""The PROXY v2 codec: the spec's byte layout, every refusal with its reason, and what arrives cut
short (a socket's partial reads) is "need more", never anything else."""

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

# A reference implementation (proxy-protocol, in the test extra: deploy/setup.sh installs it).
from proxyprotocol import result as reference_result
from proxyprotocol import v2 as reference

from ipferry.wire import proxy
from ipferry.wire.proxy import BadProxyHeader, Command, NeedMore, ProxyHeader

SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")  # the spec's 12 bytes, spelled out

# "TCP4 192.168.0.1:56324 -> 192.168.0.11:443", laid out by hand from section 2.2.
TCP4 = SIG + bytes.fromhex("21" "11" "000c" "c0a80001" "c0a8000b" "dc04" "01bb")
# TCP over IPv6 2001:db8::1:40000 -> 2001:db8::2:8443.
TCP6 = (SIG + bytes.fromhex("21" "21" "0024")
        + bytes.fromhex("20010db8000000000000000000000001")
        + bytes.fromhex("20010db8000000000000000000000002") + bytes.fromhex("9c40" "20fb"))
LOCAL = SIG + bytes.fromhex("20" "00" "0000")  # a balancer's health check


def test_the_spec_layouts():
    assert proxy.SIGNATURE == SIG and proxy.MAX_HEADER == 16 + 2048
    assert proxy.parse_v2(TCP4) == ProxyHeader(Command.PROXY, ("192.168.0.1", 56324),
                                               ("192.168.0.11", 443), 28)
    assert proxy.parse_v2(TCP6) == ProxyHeader(Command.PROXY, ("2001:db8::1", 40000),
                                               ("2001:db8::2", 8443), 52)
    assert proxy.parse_v2(LOCAL) == ProxyHeader(Command.LOCAL, None, None, 16)


def test_build_lays_out_what_the_spec_says():
    assert proxy.build_v2(("192.168.0.1", 56324), ("192.168.0.11", 443)) == TCP4
    assert proxy.build_v2(("2001:db8::1", 40000), ("2001:db8::2", 8443)) == TCP6
    assert proxy.build_v2(None, None) == LOCAL


def test_the_stream_after_the_header_is_the_clients():
    data = TCP4 + b"GET / HTTP/1.1\r\n"
    header = proxy.parse_v2(data)
    assert isinstance(header, ProxyHeader) and data[header.length:] == b"GET / HTTP/1.1\r\n"
    # Even bytes that look like another header are the client's.
    header = proxy.parse_v2(bytearray(LOCAL + TCP4))
    assert header == ProxyHeader(Command.LOCAL, None, None, 16)


def test_tlvs_are_skipped_and_counted_in_the_length():
    tlvs = proxy.tlv(0x01, b"h2") + proxy.tlv(0x04, b"") + proxy.tlv(0xEE, bytes(300))
    data = proxy.build_v2(("10.0.0.1", 1), ("10.0.0.2", 2), tlvs)
    assert data[14:16] == (12 + len(tlvs)).to_bytes(2, "big")
    assert proxy.parse_v2(data + b"x") == ProxyHeader(Command.PROXY, ("10.0.0.1", 1),
                                                      ("10.0.0.2", 2), 16 + 12 + len(tlvs))


@pytest.mark.parametrize("family", [0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32])
def test_local_ignores_the_addresses_whatever_the_family(family):
    body = bytes(216)  # as long as the longest (unix) addresses
    data = SIG + bytes([0x20, family]) + len(body).to_bytes(2, "big") + body
    assert proxy.parse_v2(data + b"after") == ProxyHeader(Command.LOCAL, None, None, 16 + 216)


def fixed(ver_cmd: int, family: int, length: int) -> bytes:
    return SIG + bytes([ver_cmd, family]) + length.to_bytes(2, "big")


@pytest.mark.parametrize("data,why", [
    (b"GET / HTTP/1.1\r\n", "signature is wrong"),
    (b"\r\n\r\n\x00\r\nQUIX\n" + bytes(4), "signature is wrong"),
    (b"\x16\x03\x01", "signature is wrong"),  # a TLS ClientHello: refused at its first byte
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "v1 \\(text\\)"),
    (b"PRO", "v1"),
    (fixed(0x11, 0x11, 12) + bytes(12), "version 1"),
    (fixed(0x31, 0x11, 12) + bytes(12), "version 3"),
    (fixed(0x22, 0x11, 12) + bytes(12), "unknown PROXY v2 command 2"),
    (fixed(0x2F, 0x11, 12) + bytes(12), "command 15"),
    (fixed(0x21, 0x13, 12) + bytes(12), "undefined .* 0x13"),
    (fixed(0x21, 0x41, 12) + bytes(12), "undefined .* 0x41"),
    (fixed(0x20, 0x10, 0), "undefined .* 0x10"),  # LOCAL too: the byte must be a defined one
    (fixed(0x21, 0x12, 12) + bytes(12), "only TCP is proxied here"),  # UDP over IPv4
    (fixed(0x21, 0x22, 36) + bytes(36), "only TCP is proxied here"),  # UDP over IPv6
    (fixed(0x21, 0x31, 216) + bytes(216), "only TCP is proxied here"),  # unix stream
    (fixed(0x21, 0x32, 216) + bytes(216), "only TCP is proxied here"),  # unix datagram
    (fixed(0x21, 0x00, 0), "only TCP is proxied here"),  # PROXY, family unspecified
    (fixed(0x21, 0x11, 11) + bytes(11), "shorter than its addresses \\(12"),
    (fixed(0x21, 0x21, 12) + bytes(12), "shorter than its addresses \\(36"),
    (fixed(0x21, 0x11, 2049), "2065 bytes: at most 2064"),
    (fixed(0x20, 0x00, 0xFFFF), "at most 2064"),
    (fixed(0x21, 0x11, 14) + bytes(14), "TLV is cut short"),
    (fixed(0x21, 0x11, 15) + bytes(12) + b"\x01\x00\x01", "TLV runs past"),
    (fixed(0x21, 0x11, 17) + bytes(12) + b"\x01\x00\x01x" + b"\x02", "TLV is cut short"),
])
def test_every_refusal_says_why(data, why):
    with pytest.raises(BadProxyHeader, match=why):
        proxy.parse_v2(data)


def test_a_hopeless_header_is_refused_before_the_rest_arrives():
    """Only the 16 fixed bytes are needed to refuse a bad version, command, family or length."""
    with pytest.raises(BadProxyHeader, match="only TCP"):
        proxy.parse_v2(fixed(0x21, 0x12, 12))
    with pytest.raises(BadProxyHeader, match="at most"):
        proxy.parse_v2(fixed(0x21, 0x11, 60000))
    with pytest.raises(BadProxyHeader, match="signature"):
        proxy.parse_v2(b"\r\n\r\n\x01")


def test_need_more_says_how_much_in_all():
    assert proxy.parse_v2(b"") == NeedMore(16)
    assert proxy.parse_v2(SIG[:5]) == NeedMore(16)
    assert proxy.parse_v2(TCP4[:16]) == NeedMore(28)
    assert proxy.parse_v2(TCP6[:40]) == NeedMore(52)


def test_build_refuses_what_it_cannot_say():
    with pytest.raises(ValueError, match="must be IPv4, or both IPv6"):
        proxy.build_v2(("10.0.0.1", 1), ("::1", 2))
    with pytest.raises(ValueError, match="neither address"):
        proxy.build_v2(("10.0.0.1", 1), None)
    with pytest.raises(ValueError, match="at most 2048"):
        proxy.build_v2(("10.0.0.1", 1), ("10.0.0.2", 2), proxy.tlv(1, bytes(2048)))


# -- properties --------------------------------------------------------------------------------

ports = st.integers(0, 65535)
v4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
v6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))
pairs = st.one_of(st.tuples(st.tuples(v4, ports), st.tuples(v4, ports)),
                  st.tuples(st.tuples(v6, ports), st.tuples(v6, ports)))
tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=64)), max_size=8)


@given(pairs, tlv_lists, st.binary(max_size=64))
def test_round_trip(pair, tlvs, after):
    src, dst = pair
    data = proxy.build_v2(src, dst, b"".join(proxy.tlv(k, v) for k, v in tlvs))
    header = proxy.parse_v2(data + after)
    assert header == ProxyHeader(Command.PROXY, src, dst, len(data))


@given(st.one_of(pairs, st.just((None, None))), tlv_lists, st.data())
def test_any_truncation_is_need_more_and_never_past_the_header(pair, tlvs, data):
    whole = proxy.build_v2(*pair, b"".join(proxy.tlv(k, v) for k, v in tlvs))
    cut = data.draw(st.integers(0, len(whole) - 1))
    answer = proxy.parse_v2(whole[:cut])
    assert isinstance(answer, NeedMore) and cut < answer.total <= len(whole)


@given(st.binary(max_size=100))
def test_garbage_never_raises_anything_else(data):
    try:
        answer = proxy.parse_v2(data)
    except BadProxyHeader:
        return
    if isinstance(answer, NeedMore):
        assert len(data) < answer.total <= proxy.MAX_HEADER
    else:
        assert answer.length <= len(data)


@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF), st.binary(max_size=80))
def test_garbage_after_the_signature_never_raises_anything_else(ver_cmd, family, length, rest):
    data = fixed(ver_cmd, family, length) + rest
    try:
        answer = proxy.parse_v2(data)
    except BadProxyHeader:
        return
    if isinstance(answer, NeedMore):
        assert len(data) < answer.total <= proxy.MAX_HEADER
    else:
        assert answer.length == 16 + length <= len(data)


# -- against a reference implementation (the proxy-protocol package, when installed) -----------

@given(pairs)
def test_a_reference_reads_what_we_build_and_we_read_what_it_builds(pair):
    v2, result = reference, reference_result
    src, dst = pair
    ours = proxy.build_v2(src, dst)
    theirs = v2.ProxyProtocolV2().unpack(ours)
    assert (str(theirs.source[0]), theirs.source[1]) == src
    assert (str(theirs.dest[0]), theirs.dest[1]) == dst
    cls = result.ProxyResultIPv4 if ":" not in src[0] else result.ProxyResultIPv6
    built = v2.ProxyProtocolV2().pack(cls(
        (ipaddress.ip_address(src[0]), src[1]), (ipaddress.ip_address(dst[0]), dst[1]),
        protocol=socket.SOCK_STREAM))
    assert built == ours
    assert proxy.parse_v2(built) == ProxyHeader(Command.PROXY, src, dst, len(built))


def test_a_references_local_header_reads_as_local():
    v2, result = reference, reference_result
    built = v2.ProxyProtocolV2().pack(result.ProxyResultLocal())
    assert built == LOCAL
    assert proxy.parse_v2(built) == ProxyHeader(Command.LOCAL, None, None, 16)
