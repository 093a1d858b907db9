"""wire/httpmsg: request targets of every form, the headers a proxy sends on (hop-by-hop ones
gone, those Connection names too), the short answers it writes itself (parsed back by h11 as a
client would), and the status classes the request counter is labelled by."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipferry.wire.httpmsg import (
    HOP_BY_HOP,
    BadTarget,
    Target,
    authority,
    forwarded_headers,
    parse_target,
    plain_response,
    response_headers,
    status_class,
)

pytestmark = pytest.mark.timeout(30)


# -- request targets ---------------------------------------------------------------------------


@pytest.mark.parametrize("target, path", [
    ("/", "/"),
    ("/a/b?x=1&y=2", "/a/b?x=1&y=2"),
    ("/%20space", "/%20space"),
])
def test_origin_form(target, path):
    assert parse_target("GET", target) == Target("origin", None, None, path)


def test_asterisk_form():
    assert parse_target("OPTIONS", "*") == Target("asterisk", None, None, "*")


@pytest.mark.parametrize("target, expected", [
    ("http://example.com/", Target("absolute", "example.com", 80, "/")),
    ("http://Example.COM./x?q=1", Target("absolute", "example.com", 80, "/x?q=1")),
    ("http://example.com", Target("absolute", "example.com", 80, "/")),
    ("http://example.com?q", Target("absolute", "example.com", 80, "/?q")),
    ("http://example.com/p#frag", Target("absolute", "example.com", 80, "/p")),
    ("http://example.com#frag", Target("absolute", "example.com", 80, "/")),
    ("HTTP://example.com:8080/p", Target("absolute", "example.com", 8080, "/p")),
    ("http://10.1.2.3:1/", Target("absolute", "10.1.2.3", 1, "/")),
    ("http://[::1]/", Target("absolute", "::1", 80, "/")),
    ("http://[2001:DB8::1]:8443/a", Target("absolute", "2001:db8::1", 8443, "/a")),
    ("http://host:65535/", Target("absolute", "host", 65535, "/")),
])
def test_absolute_form(target, expected):
    assert parse_target("GET", target) == expected


@pytest.mark.parametrize("target", [
    "http://user@example.com/",
    "http://user:pass@example.com/",
    "http://:pass@example.com:80/",
])
def test_userinfo_is_refused(target):
    with pytest.raises(BadTarget, match="user information"):
        parse_target("GET", target)


@pytest.mark.parametrize("target", ["https://example.com/", "ftp://example.com/",
                                    "ws://example.com/"])
def test_schemes_other_than_http_are_refused(target):
    with pytest.raises(BadTarget, match="scheme"):
        parse_target("GET", target)


@pytest.mark.parametrize("target", [
    "example.com/path",  # neither a path nor an absolute URL
    "",
    "http:///path",  # no host
    "http://:80/",
    "http://exa mple.com/",
    "http://exa_mple\x00.com/",
    "http://" + "a" * 254 + "/",
    "http://[::1/",  # unclosed IPv6 literal
    "http://[::1]x/",  # junk after it
    "http://[not-v6]/",
    "http://[::1]:/",
])
def test_bad_targets(target):
    with pytest.raises(BadTarget):
        parse_target("GET", target)


@pytest.mark.parametrize("port", ["0", "65536", "99999", "-1", "+80", "8o", "", " 80", "0x50"])
def test_bad_ports(port):
    with pytest.raises(BadTarget, match="port"):
        parse_target("GET", f"http://example.com:{port}/")
    with pytest.raises(BadTarget):
        parse_target("CONNECT", f"example.com:{port}")


@pytest.mark.parametrize("target, host, port", [
    ("example.com:443", "example.com", 443),
    ("EXAMPLE.com.:8443", "example.com", 8443),
    ("10.0.0.1:22", "10.0.0.1", 22),
    ("[::1]:443", "::1", 443),
    ("[2001:db8::2]:1", "2001:db8::2", 1),
])
def test_connect_authority(target, host, port):
    assert parse_target("CONNECT", target) == Target("authority", host, port, "")


@pytest.mark.parametrize("target", ["example.com", "[::1]", "/", "http://example.com:443/",
                                    "*", "example.com:", "[::1]443"])
def test_connect_needs_host_and_port(target):
    with pytest.raises(BadTarget):
        parse_target("CONNECT", target)


def test_authority_default_port():
    assert authority("example.com", 80) == ("example.com", 80)
    assert authority("[::1]", 8080) == ("::1", 8080)
    assert authority("example.com:81", 80) == ("example.com", 81)
    with pytest.raises(BadTarget, match="no port"):
        authority("example.com", None)


@given(st.sampled_from(["GET", "CONNECT", "OPTIONS", "POST"]),
       st.one_of(st.text(max_size=300),
                 st.text(max_size=200).map(lambda t: "http://" + t),
                 st.text(alphabet="[]:.0123456789abcdef/@#?%", max_size=60),
                 st.text(alphabet="[]:.0123456789abcdef/@#?%", max_size=60)
                 .map(lambda t: "http://" + t)))
@settings(max_examples=400, deadline=None)
def test_parse_target_raises_only_bad_target(method, target):
    try:
        parsed = parse_target(method, target)
    except BadTarget:
        return
    assert parsed.form in ("origin", "absolute", "authority", "asterisk")
    if parsed.form in ("absolute", "authority"):
        assert parsed.host and parsed.port is not None and 0 < parsed.port < 65536
    if parsed.form in ("origin", "absolute"):
        assert parsed.path.startswith("/")


# -- headers sent on ---------------------------------------------------------------------------

REQUEST = [
    (b"host", b"example.com"),
    (b"connection", b"keep-alive, X-Private"),
    (b"keep-alive", b"timeout=5"),
    (b"proxy-connection", b"keep-alive"),
    (b"proxy-authorization", b"Basic dTpw"),
    (b"proxy-authenticate", b"Basic"),
    (b"te", b"trailers"),
    (b"trailer", b"x-sum"),
    (b"upgrade", b"websocket"),
    (b"x-private", b"secret"),
    (b"accept", b"*/*"),
    (b"content-length", b"5"),
]


def names(headers):
    return [n for n, _ in headers]


def test_hop_by_hop_headers_are_dropped():
    out = forwarded_headers(REQUEST)
    assert out == [(b"host", b"example.com"), (b"accept", b"*/*"), (b"content-length", b"5")]
    assert not set(names(out)) & HOP_BY_HOP


def test_headers_named_by_connection_are_dropped_any_case_and_spacing():
    headers = [(b"connection", b" X-One ,x-two"), (b"connection", b"X-THREE"),
               (b"x-one", b"1"), (b"x-two", b"2"), (b"x-three", b"3"), (b"x-four", b"4")]
    assert forwarded_headers(headers) == [(b"x-four", b"4")]


def test_upgrade_kept_only_when_asked():
    headers = [(b"host", b"h"), (b"connection", b"Upgrade"), (b"upgrade", b"websocket"),
               (b"sec-websocket-key", b"k")]
    plain = forwarded_headers(headers)
    assert b"upgrade" not in names(plain) and b"connection" not in names(plain)
    assert plain == [(b"host", b"h"), (b"sec-websocket-key", b"k")]
    up = forwarded_headers(headers, upgrade=True)
    assert (b"upgrade", b"websocket") in up
    assert [v for n, v in up if n == b"connection"] == [b"upgrade"]
    assert (b"sec-websocket-key", b"k") in up


def test_chunked_framing_is_kept_once():
    headers = [(b"host", b"h"), (b"transfer-encoding", b"Chunked")]
    out = forwarded_headers(headers)
    assert out == [(b"host", b"h"), (b"transfer-encoding", b"chunked")]
    assert response_headers(headers) == out
    # content-length frames a body as it came: kept
    assert forwarded_headers([(b"content-length", b"10")]) == [(b"content-length", b"10")]


def test_set_and_remove_headers():
    headers = [(b"host", b"a"), (b"x-a", b"1"), (b"x-a", b"2"), (b"x-b", b"3"), (b"x-c", b"4")]
    out = forwarded_headers(headers, set_headers=(("X-A", "new"), ("X-New", "n"),
                                                  ("Host", "b")),
                            remove_headers=("X-B",))
    assert out == [(b"x-c", b"4"), (b"x-a", b"new"), (b"x-new", b"n"), (b"host", b"b")]
    assert response_headers([(b"server", b"s"), (b"connection", b"close"),
                             (b"content-length", b"3")],
                            set_headers=(("X-Via", "ipferry"),),
                            remove_headers=("server",)) == [(b"content-length", b"3"),
                                                            (b"x-via", b"ipferry")]


def test_forwarded_headers_are_sendable_by_h11():
    out = forwarded_headers(REQUEST + [(b"transfer-encoding", b"chunked")],
                            set_headers=(("X-Added", "1"),))
    out = [(n, v) for n, v in out if n != b"content-length"]
    client = h11.Connection(h11.CLIENT)
    data = client.send(h11.Request(method="POST", target="/", headers=out))
    data += client.send(h11.Data(data=b"hello"))
    data += client.send(h11.EndOfMessage())
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    request = server.next_event()
    assert isinstance(request, h11.Request)
    assert (b"x-added", b"1") in request.headers
    assert isinstance(server.next_event(), h11.Data)


# -- the proxy's own answers -------------------------------------------------------------------

def parse_response(raw: bytes, method: str = "GET") -> tuple[h11.Response, bytes, h11.Connection]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[(b"host", b"x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    head = conn.next_event()
    assert isinstance(head, h11.Response)
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        else:
            assert isinstance(event, h11.EndOfMessage), event
            return head, body, conn


@pytest.mark.parametrize("status", [400, 403, 407, 408, 431, 502, 504])
def test_plain_response_parses(status):
    head, body, conn = parse_response(plain_response(status, "no way"))
    assert head.status_code == status
    assert body == b"no way\n"
    headers = dict(head.headers)
    assert headers[b"content-type"] == b"text/plain; charset=utf-8"
    assert headers[b"connection"] == b"close"
    assert conn.their_state is h11.MUST_CLOSE


def test_plain_response_keep_alive_extra_and_unknown_status():
    raw = plain_response(407, "who are you?\n\n", close=False,
                         extra=(("Proxy-Authenticate", 'Basic realm="x"'),))
    head, body, conn = parse_response(raw)
    assert head.status_code == 407 and head.reason == b"Proxy Authentication Required"
    assert body == b"who are you?\n"
    assert (b"proxy-authenticate", b'Basic realm="x"') in head.headers
    assert conn.their_state is h11.DONE  # keep-alive: another request may follow
    head, body, _ = parse_response(plain_response(599, "odd"))
    assert head.status_code == 599 and head.reason == b"Error"


def test_plain_response_body_is_utf8_and_length_is_bytes():
    head, body, _ = parse_response(plain_response(403, "refusé ✗"))
    assert body == "refusé ✗\n".encode()
    assert dict(head.headers)[b"content-length"] == str(len(body)).encode()


@pytest.mark.parametrize("status, label", [
    (100, "1xx"), (101, "1xx"), (199, "1xx"), (200, "2xx"), (204, "2xx"), (304, "3xx"),
    (404, "4xx"), (431, "4xx"), (500, "5xx"), (599, "5xx"), (0, "other"), (99, "other"),
    (600, "other"), (-1, "other"), (1000, "other"),
])
def test_status_class(status, label):
    assert status_class(status) == label
