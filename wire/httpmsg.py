"""HTTP/1.1 messages as a proxy sees them: request targets, hop-by-hop headers, short answers.

Pure functions over what h11 parsed (header names lowercase bytes, values bytes): no socket, no
clock. The HTTP layer (:mod:`ipferry.worker.http`) uses them to turn a client's request into the
one it sends on (RFC 9110 section 7.6.1: hop-by-hop headers are the connection's, not the
message's) and to answer what it refuses.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from http import HTTPStatus

__all__ = ["HOP_BY_HOP", "Target", "BadTarget", "authority", "forwarded_headers", "parse_target",
           "plain_response", "status_class"]

# RFC 9110 7.6.1 and the de facto ones (Proxy-Connection, Keep-Alive): a proxy drops these,
# and whatever the Connection header names. Transfer-Encoding is the framing h11 redoes.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"transfer-encoding",
                        b"upgrade"})
MAX_HOST = 253


class BadTarget(ValueError):
    """A request target or authority the proxy cannot go to (answered 400)."""


@dataclass(frozen=True, slots=True)
class Target:
    """A request target (RFC 9112 3.2): ``form`` is ``origin`` (``/path?q``), ``absolute``
    (``http://host:port/path``, what a forward proxy gets), ``authority`` (``host:port``, a
    CONNECT's) or ``asterisk`` (``*``, an OPTIONS'). ``host``/``port`` are the authority's when
    the target has one; ``path`` is what goes on the request line of an origin-form request."""

    form: str
    host: str | None
    port: int | None
    path: str  # origin-form: path and query ("/" at least); "" for authority, "*" for asterisk


def authority(text: str, default_port: int | None) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` as (lowercase host without brackets, port)."""
    host, port = text, default_port
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep:
            raise BadTarget(f"unclosed IPv6 literal in {text[:80]!r}")
        host = inner
        if rest:
            if not rest.startswith(":"):
                raise BadTarget(f"junk after the IPv6 literal in {text[:80]!r}")
            port = _port(rest[1:], text)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise BadTarget(f"{host[:80]!r} is not an IPv6 address") from None
    elif ":" in text:
        host, _, tail = text.rpartition(":")
        port = _port(tail, text)
    host = host.lower().rstrip(".")
    if not host or len(host) > MAX_HOST or not all(_host_char(c) for c in host):
        raise BadTarget(f"bad host in {text[:80]!r}")
    if port is None:
        raise BadTarget(f"{text[:80]!r} names no port")
    return host, port


def _host_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c in "-._:")


def _port(text: str, whole: str) -> int:
    # ASCII digits only: str.isdigit() also takes "²" (int() refuses it) and "١" (int() reads
    # it as 1), and a long enough string of digits is over int()'s limit
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or not 0 < int(text) < 65536:
        raise BadTarget(f"bad port in {whole[:80]!r}")
    return int(text)


def parse_target(method: str, target: str) -> Target:
    """The request target's form and parts; raises :class:`BadTarget` for one a proxy cannot
    use (a scheme other than http, no host, a bad port)."""
    if method == "CONNECT":
        host, port = authority(target, None)
        return Target("authority", host, port, "")
    if target == "*":
        return Target("asterisk", None, None, "*")
    if target.startswith("/"):
        return Target("origin", None, None, target)
    scheme, sep, rest = target.partition("://")
    if not sep:
        raise BadTarget(f"request target {target[:80]!r} is neither a path nor an absolute URL")
    if scheme.lower() != "http":
        raise BadTarget(f"scheme {scheme[:20]!r}: only http:// goes through as a request "
                        "(https:// is a CONNECT)")
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0),
              default=len(rest))
    auth, path = rest[:end], rest[end:]
    if "@" in auth:
        raise BadTarget("user information in the request target")
    host, port = authority(auth, 80)
    path = path.partition("#")[0]
    if not path.startswith("/"):
        path = "/" + path
    return Target("absolute", host, port, path)


def forwarded_headers(headers: list[tuple[bytes, bytes]], *, upgrade: bool = False,
                      set_headers: tuple[tuple[str, str], ...] = (),
                      remove_headers: tuple[str, ...] = ()) -> list[tuple[bytes, bytes]]:
    """The headers to send on: without the hop-by-hop ones (and those Connection names), with
    ``Upgrade`` and ``Connection: upgrade`` kept when ``upgrade`` (the request asks to switch
    protocols and may), ``remove_headers`` removed and ``set_headers`` replacing (or adding)
    theirs. Content-Length stays: it frames the body as it came."""
    named = {token.strip().lower() for name, value in headers if name == b"connection"
             for token in value.split(b",")}
    drop = HOP_BY_HOP | named
    out = [(n, v) for n, v in headers if n not in drop or (upgrade and n == b"upgrade")]
    if upgrade:
        out.append((b"connection", b"upgrade"))
    chunked = any(n == b"transfer-encoding" and b"chunked" in v.lower() for n, v in headers)
    if chunked:  # the body's framing: h11 chunks it again on the way out
        out.append((b"transfer-encoding", b"chunked"))
    gone = {h.lower().encode("latin-1") for h in remove_headers}
    gone |= {n.lower().encode("latin-1") for n, _ in set_headers}
    if gone:
        out = [(n, v) for n, v in out if n not in gone]
    out.extend((n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in set_headers)
    return out


def response_headers(headers: list[tuple[bytes, bytes]],
                     set_headers: tuple[tuple[str, str], ...] = (),
                     remove_headers: tuple[str, ...] = ()) -> list[tuple[bytes, bytes]]:
    """A response's headers to send to the client: as :func:`forwarded_headers`, with the body's
    framing (Content-Length, chunked) kept for h11 to honour."""
    return forwarded_headers(headers, set_headers=set_headers, remove_headers=remove_headers)


def plain_response(status: int, text: str, *, close: bool = True,
                   extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole short answer (``text`` as its plain-text body), for what the proxy says itself
    outside h11 (a CONNECT's refusal)."""
    body = (text.rstrip("\n") + "\n").encode("utf-8", "replace")
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    lines = [f"HTTP/1.1 {status} {phrase}", "Content-Type: text/plain; charset=utf-8",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in extra]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def status_class(status: int) -> str:
    """``2xx`` and so on, the request counter's label (anything else is ``other``)."""
    return f"{status // 100}xx" if 100 <= status < 600 else "other"
