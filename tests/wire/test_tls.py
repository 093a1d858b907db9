"""The ClientHello parser against real ones: hellos Python's ssl module (OpenSSL) writes as a client,
and OpenSSL as a server reading the same bytes (its SNI callback says which name it saw). What
arrives cut short is "need more", never anything else; whatever else arrives is NotTls or a hello."""

import doctest
import ssl
import struct
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipferry.wire import tls
from ipferry.wire.tls import MAX_HELLO_BYTES, ClientHello, NeedMore, NotTls, parse_client_hello

FUZZ = settings(max_examples=150, deadline=None)
LONG_NAME = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters, the most


def real_hello(name: str | None = "www.example.com", alpn: list[str] | None = None,
               version: ssl.TLSVersion | None = None) -> bytes:
    """The ClientHello OpenSSL sends first, as a client (``version``: the only one it speaks)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def server_saw(data: bytes) -> list[str | None]:
    """The server names OpenSSL, as a server, saw in ``data`` (its SNI callback's arguments: empty
    if it refused the hello before it got that far). It has no certificate: it fails after.

    A name that is not ASCII never reaches the callback: the ssl module's decoding of it fails,
    unraisably; it is caught there, and counts as seen (latin-1)."""
    seen: list[str | None] = []

    def undecodable(unraisable: "sys.UnraisableHookArgs") -> None:
        assert isinstance(unraisable.exc_value, UnicodeDecodeError), unraisable.exc_value
        seen.append(unraisable.exc_value.object.decode("latin-1"))

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sni_callback = lambda _obj, name, _ctx: seen.append(name)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = ctx.wrap_bio(incoming, outgoing, server_side=True)
    incoming.write(data)
    hook, sys.unraisablehook = sys.unraisablehook, undecodable
    try:
        server.do_handshake()
    except ssl.SSLError:
        pass
    finally:
        sys.unraisablehook = hook
    return seen


HELLO = real_hello()  # one record, as OpenSSL sends it
MESSAGE = HELLO[5:]  # the handshake message it carries


def frame(message: bytes, cuts: list[int] | tuple[int, ...] = (), version: bytes = b"\x03\x01") -> bytes:
    """``message`` re-framed in records, cut at the offsets ``cuts``."""
    edges = [0, *sorted(cuts), len(message)]
    return b"".join(b"\x16" + version + struct.pack("!H", end - start) + message[start:end]
                    for start, end in zip(edges, edges[1:], strict=False))


def extension(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + value


def vector(width: int, value: bytes) -> bytes:
    return len(value).to_bytes(width, "big") + value


def sni(*entries: tuple[int, bytes]) -> bytes:
    return extension(0, vector(2, b"".join(bytes([kind]) + vector(2, name) for kind, name in entries)))


def alpn(*protocols: bytes) -> bytes:
    return extension(16, vector(2, b"".join(vector(1, p) for p in protocols)))


def body(extensions: bytes | None = b"", session: bytes = bytes(32), suites: bytes = b"\x13\x01\xc0\x2f",
         methods: bytes = b"\x00", version: bytes = b"\x03\x03") -> bytes:
    """A ClientHello's body laid out by hand (``extensions`` None: without the extensions block)."""
    out = version + bytes(range(32)) + vector(1, session) + vector(2, suites) + vector(1, methods)
    return out if extensions is None else out + vector(2, extensions)


def message(hello_body: bytes, kind: int = 1) -> bytes:
    return bytes([kind]) + vector(3, hello_body)


def built(extensions: bytes | None = b"", **fields: bytes) -> bytes:
    return frame(message(body(extensions, **fields)))


def test_docstring_examples():
    assert doctest.testmod(tls).failed == 0


def test_the_limits():
    assert tls.MAX_RECORDS == 4 and tls.MAX_MESSAGE == 65536
    assert MAX_HELLO_BYTES == 4 * (5 + 16384)


# -- real hellos ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    ("www.example.com", "www.example.com"),
    ("WWW.Example.COM", "www.example.com"),  # sent as given (checked below), read lowercased
    ("example.com.", "example.com"),  # sent with its dot
    ("bücher.example", "xn--bcher-kva.example"),  # ssl sends the A-label
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("a-b.c0", "a-b.c0"),
    (LONG_NAME, LONG_NAME),
    (None, None),  # no server_hostname: no SNI extension
])
def test_the_name_the_client_sent(name, expected):
    data = real_hello(name)
    if name is not None and name.isascii():
        assert name.encode() in data  # the case and the dot as given: the parser does the rest
    hello = parse_client_hello(data)
    assert hello == ClientHello(expected, (), len(data))
    assert server_saw(data) == [None if name is None else name.encode("idna").decode()]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3, None])
def test_tls_versions_and_alpn(version):
    data = real_hello("api.example.net", ["h2", "http/1.1"], version)
    assert parse_client_hello(data) == ClientHello("api.example.net", ("h2", "http/1.1"), len(data))
    assert parse_client_hello(real_hello("api.example.net", None, version)).alpn == ()
    # The 1.3 key share (and supported_versions) is in the hello only when 1.3 may be spoken.
    assert (b"\x00\x2b" in data[43:]) == (version != ssl.TLSVersion.TLSv1_2)


def test_every_prefix_needs_more_and_a_reader_reads_exactly_the_hello():
    totals = [parse_client_hello(HELLO[:n]) for n in range(len(HELLO))]
    assert len(totals) == len(HELLO) > 200
    assert all(isinstance(t, NeedMore) and n < t.total <= len(HELLO) for n, t in enumerate(totals))
    assert {t.total for t in totals} == {5, len(HELLO)}  # the record header, then the record's end
    # What a reader does: read up to what it is told, ask again; it never reads past the hello.
    data = HELLO + b"\x17\x03\x03\x00\x10" + bytes(16)  # early data after it
    have, asked = 0, []
    while isinstance(result := parse_client_hello(data[:have]), NeedMore):
        asked.append(have := result.total)
    assert asked == [5, len(HELLO)] and result == ClientHello("www.example.com", (), len(HELLO))


def test_trailing_bytes_are_not_the_hellos():
    for extra in (b"\x16\x03\x01\x00\x05hello", b"\x00", b"GET / HTTP/1.1\r\n", bytes(70000)):
        assert parse_client_hello(HELLO + extra) == ClientHello("www.example.com", (), len(HELLO))


def test_bytes_like_inputs():
    expected = ClientHello("www.example.com", (), len(HELLO))
    assert parse_client_hello(bytearray(HELLO)) == expected
    assert parse_client_hello(memoryview(HELLO)) == expected
    assert parse_client_hello(memoryview(b"xx" + HELLO)[2:]) == expected
    assert parse_client_hello(memoryview(bytearray(HELLO + b"!")).cast("b")) == expected  # signed
    assert parse_client_hello(memoryview(bytes(x for b in HELLO for x in (b, 0)))[::2]) == expected


# -- records -------------------------------------------------------------------------------------

def test_the_message_split_across_two_records_anywhere():
    assert HELLO[3:5] == struct.pack("!H", len(MESSAGE))  # one record, re-framed by hand below
    results = [parse_client_hello(frame(MESSAGE, [cut])) for cut in range(1, len(MESSAGE))]
    assert len(results) == len(MESSAGE) - 1
    assert all(r == ClientHello("www.example.com", (), len(MESSAGE) + 10) for r in results)
    for cut in (1, 2, 3, 4, 100):  # OpenSSL reads them so too
        assert server_saw(frame(MESSAGE, [cut])) == ["www.example.com"]


def test_a_split_hello_is_read_record_by_record():
    data = frame(MESSAGE, [3])  # the handshake header itself cut
    totals = {parse_client_hello(data[:n]) for n in range(len(data))}
    assert totals == {NeedMore(5), NeedMore(8), NeedMore(13), NeedMore(len(data))}
    assert parse_client_hello(data) == ClientHello("www.example.com", (), len(data))


@given(st.lists(st.integers(1, len(MESSAGE) - 1), max_size=3, unique=True))
@FUZZ
def test_up_to_four_records_cut_anywhere(cuts):
    data = frame(MESSAGE, cuts)
    assert parse_client_hello(data) == ClientHello("www.example.com", (), len(data))
    assert all(isinstance(parse_client_hello(data[:n]), NeedMore) for n in range(0, len(data), 7))


def test_five_records_are_too_many():
    with pytest.raises(NotTls, match="more than 4 records"):
        parse_client_hello(frame(MESSAGE, [1, 2, 3, 4]))
    with pytest.raises(NotTls, match="more than 4 records"):  # known as soon as the 4th record ends
        parse_client_hello(frame(MESSAGE, [1, 2, 3, 4])[:4 * 6])


def test_the_largest_hello_fills_four_records():
    padding = 65536 - len(message(body(sni((0, b"big.example")) + extension(21, b""))))
    big = message(body(sni((0, b"big.example")) + extension(21, bytes(padding))))
    assert len(big) == 65536
    data = frame(big, [16384, 32768, 49152])
    assert len(data) == MAX_HELLO_BYTES
    assert parse_client_hello(data) == ClientHello("big.example", (), MAX_HELLO_BYTES)
    assert server_saw(data) == ["big.example"]
    bigger = message(body(sni((0, b"big.example")) + extension(21, bytes(padding + 1))))
    with pytest.raises(NotTls, match="65537 bytes"):  # refused from its header alone
        parse_client_hello(frame(bigger, [16384])[:9])


# -- hellos built by hand ------------------------------------------------------------------------

def test_server_name_entries():
    first = sni((0, b"one.example"), (0, b"two.example"))
    assert parse_client_hello(built(first)).server_name == "one.example"
    other_then_host = sni((1, b"\x00\x01opaque"), (0, b"host.example"))
    assert parse_client_hello(built(other_then_host)).server_name == "host.example"
    assert parse_client_hello(built(sni((7, b"x")))).server_name is None
    assert parse_client_hello(built(None)) == ClientHello(None, (), len(built(None)))
    assert parse_client_hello(built()).server_name is None  # an empty extensions block
    hello = built(extension(0xFE0D, bytes(40)) + sni((0, b"A.Example.")) + alpn(b"h3", b"\xff\x00"))
    assert parse_client_hello(hello) == ClientHello("a.example", ("h3", "\xff\x00"), len(hello))
    assert server_saw(built(sni((0, b"one.example")))) == ["one.example"]


@pytest.mark.parametrize("name", [
    b"", b".", b"..", b"a..b", b".a", b"a_b.example", b"a b.example", b"a\x00.example",
    b"b\xc3\xbccher.example", b"-a.example", b"a-.example", b"a*.example", b"a." * 127 + b"a",
    b"a" * 64 + b".example", b"192.0.2.1", b"[2001:db8::1]", b"host.123", b"a.example..",
])
def test_bad_server_names(name):
    with pytest.raises(NotTls, match="^bad server name$"):
        parse_client_hello(built(sni((0, name))))


def test_good_server_names():
    for name in (b"a", b"1.example", b"a" * 63, b"0x.1a", b"a." * 126 + b"a"):
        assert parse_client_hello(built(sni((0, name)))).server_name == name.decode()


@pytest.mark.parametrize("data,why", [
    (b"\x17\x03\x03\x00\x10", "first byte 0x17"),
    (b"G", "first byte 0x47"),
    (b"\x80\x2e\x01\x03\x01", "SSLv2"),
    (b"\x16\x02", "version major 2"),
    (b"\x16\x03\x01\x00\x00", "empty handshake record"),
    (b"\x16\x03\x01\x40\x01", "record of 16385 bytes"),
    (b"\x16\x03\x01\x00\x40\x02", "handshake type 2"),
    (b"\x16\x03\x01\x00\x40\x01\x01\x00\x00", "ClientHello of 65540 bytes"),
    (frame(b"\x01\x00\x00\x01\x03\x00", [4]), "bytes after the ClientHello"),
    (frame(MESSAGE + b"\x14\x00\x00\x00"), "bytes after the ClientHello"),
    (frame(MESSAGE, [1]).replace(b"\x16\x03\x01", b"\x15\x03\x01", 2), "first byte 0x15"),
    (frame(MESSAGE, [1], b"\x03\x03")[:7] + b"\x04", "version major 4"),
    (frame(message(b"\x03\x03" + bytes(31))), "ClientHello cut short"),
    (built(version=b"\x02\x00"), "ClientHello version major 2"),
    (frame(message(body()[:34] + b"\x21" + bytes(33))), "session id longer"),
    (frame(message(body(session=b"")[:35])), "cipher suites cut short"),
    (built(suites=b""), "bad cipher suites"),
    (built(suites=b"\x13\x01\x00"), "bad cipher suites"),
    (built(methods=b""), "no compression methods"),
    (frame(message(body(None) + b"\x00")), "extensions cut short"),
    (frame(message(body(b"") + b"\x00")), "bytes after the extensions"),
    (built(b"\x00"), "extension cut short"),
    (built(b"\x00\x00\x00\x05abc"), "extension cut short"),
    (built(sni((0, b"a.example")) + sni((0, b"b.example"))), "extension 0 twice"),
    (built(alpn(b"h2") + alpn(b"h2")), "extension 16 twice"),
    (built(extension(0, b"")), "server name list cut short"),
    (built(extension(0, b"\x00\x00")), "bad server name list"),
    (built(extension(0, vector(2, b"\x00\x00\x03ab"))), "server name cut short"),
    (built(extension(0, vector(2, b"\x00\x00\x01a") + b"x")), "bad server name list"),
    (built(extension(16, b"\x00\x00")), "bad ALPN list"),
    (built(alpn(b"h2", b"")), "empty ALPN protocol"),
    (built(extension(16, vector(2, b"\x05h2"))), "ALPN protocol cut short"),
])
def test_refusals(data, why):
    with pytest.raises(NotTls, match=why):
        parse_client_hello(data)


# -- hostile bytes -------------------------------------------------------------------------------

def check(data: bytes) -> ClientHello | NeedMore | None:
    """What the parser says of ``data``: a hello or need-more (which must be consistent), or None
    for NotTls; anything else raised fails the test."""
    try:
        result = parse_client_hello(data)
    except NotTls:
        return None
    if isinstance(result, NeedMore):
        assert len(data) < result.total <= MAX_HELLO_BYTES
    else:
        assert 0 < result.length <= min(len(data), MAX_HELLO_BYTES)
        assert parse_client_hello(data[:result.length]) == result  # it took no more than it said
    return result


@given(st.binary(max_size=600))
@FUZZ
def test_random_bytes(data):
    check(data)
    check(b"\x16\x03\x01" + data)
    check(b"\x16\x03\x01" + struct.pack("!H", len(data) + 4) + b"\x01" + vector(3, data))


def agrees_with_openssl(data: bytes) -> bool:
    """Where both the parser and OpenSSL read a server name from ``data``, it is the same name
    (the parser's stricter about names: it may refuse one OpenSSL takes, never read another)."""
    result = check(data)
    seen = server_saw(data)
    if not isinstance(result, ClientHello) or not seen:
        return False
    theirs = seen[0]
    if theirs is not None:
        theirs = theirs.lower().removesuffix(".")
    assert result.server_name == theirs
    return True


def test_every_byte_flipped():
    results = [check(HELLO[:i] + bytes([HELLO[i] ^ 0xFF]) + HELLO[i + 1:]) for i in range(len(HELLO))]
    assert len(results) == len(HELLO)
    refused = sum(r is None for r in results)
    assert 10 < refused < len(HELLO) - 100  # framing bytes matter; random and key bytes do not
    agreed = [agrees_with_openssl(HELLO[:i] + bytes([HELLO[i] ^ 0x20]) + HELLO[i + 1:])
              for i in range(0, len(HELLO), 3)]
    assert len(agreed) == (len(HELLO) + 2) // 3 and sum(agreed) > 50


@given(st.sampled_from([HELLO, frame(MESSAGE, [200]), real_hello("Mixed.Case.example", ["h2", "x"])]),
       st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
       st.integers(0, 10**6))
@FUZZ
def test_mutated_real_hellos(data, flips, cut):
    mutated = bytearray(data)
    for at, xor in flips:
        mutated[at % len(mutated)] ^= xor
    agrees_with_openssl(bytes(mutated))
    check(bytes(mutated[:cut % (len(mutated) + 1)]))
    check(bytes(mutated) + bytes(mutated))
