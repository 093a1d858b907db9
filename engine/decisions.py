"""What the application decides about, and decides: values the engine and the hooks share.

Frozen dataclasses (a decision is shared by every flow its rule decides: memory per flow).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TunnelContext:
    tenant: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FlowStart:
    tenant: str
    protocol: str  # "tcp", "udp", ...
    src: str
    sport: int
    dst: str
    dport: int
    context: TunnelContext
    # The name the daemon's resolver gave the tenant this destination for, if it did (lately).
    host: str | None = None


@dataclass(frozen=True)
class Decision:
    """``upgrade``: let the flow go on, to ``upstream`` (None: the original destination);
    ``drop``: refuse, with ``reason`` (the rule that said so).

    ``layer`` says how a flow that goes on is carried: None (the default) is IP packets into the
    tunnel of a device of the tenant's private network when the destination is one, else
    upgraded to a stream or datagrams and off-ramped by a socket; ``"ip"`` asks for IP packets
    (a destination that is no device is then off-ramped as by default); ``"stream"`` always
    upgrades a TCP flow to a stream (so :meth:`on_stream_start` may inspect it) and, towards a
    device, downgrades it back into that device's tunnel; ``"http"`` does the same and carries
    the stream as HTTP/1.1: each request is decided by ``on_request`` and the rules' HTTP keys
    (see :class:`HttpRequest`)."""

    action: str  # "upgrade" | "drop"
    upstream: tuple[str, int] | None = None
    reason: str = ""
    layer: str | None = None  # None | "ip" | "stream" | "http"

    @classmethod
    def upgrade(cls, upstream: tuple[str, int] | None = None, reason: str = "",
                layer: str | None = None) -> Decision:
        return cls("upgrade", upstream, reason, layer)

    @classmethod
    def drop(cls, reason: str) -> Decision:
        return cls("drop", None, reason)


@dataclass(frozen=True)
class StreamStart:
    """What ``on_stream_start`` sees of a stream about to be relayed: its flow, where the server
    leg goes, and whether that leg is a stream downgraded into a device's tunnel (then
    ``destination_tunnel`` is that tunnel's id)."""

    flow: FlowStart
    upstream: tuple[str, int]
    downgraded: bool = False
    destination_tunnel: int | None = None
    # The server name of the TLS ClientHello the client began with, on a stream to one of the
    # ``[http] tls_ports`` (None: none read, or no SNI in it).
    sni: str | None = None
    layer: str | None = None  # the flow's decision's layer ("http": carried as HTTP)


@dataclass(frozen=True)
class FlowEnd:
    start: FlowStart
    decision: Decision
    packets: tuple[int, int]  # (to server, to client)
    bytes: tuple[int, int]
    payload_bytes: tuple[int, int]
    duration: float
    close_reason: str


@dataclass(frozen=True)
class DnsQueryStart:
    """What ``on_dns_query`` sees of a query to the daemon's resolver: who asks (the flow's
    tenant, source and tunnel context), for what name (lowercase, no trailing dot) and type."""

    tenant: str
    src: str
    sport: int
    name: str
    type: str  # "A", "AAAA", "TXT", ... (the number for a type without a name)
    context: TunnelContext


@dataclass(frozen=True)
class DnsDecision:
    """``allow``: forward to the host's resolver; ``nxdomain`` / ``refused``: answer so;
    ``answer``: answer ``address`` (an A or AAAA record, TTL 60) without asking anyone."""

    action: str  # "allow" | "nxdomain" | "refused" | "answer"
    address: str | None = None
    reason: str = ""

    @classmethod
    def allow(cls, reason: str = "") -> DnsDecision:
        return cls("allow", None, reason)

    @classmethod
    def nxdomain(cls, reason: str = "") -> DnsDecision:
        return cls("nxdomain", None, reason)

    @classmethod
    def refused(cls, reason: str = "") -> DnsDecision:
        return cls("refused", None, reason)

    @classmethod
    def answer(cls, address: str, reason: str = "") -> DnsDecision:
        return cls("answer", address, reason)


Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class HttpRequest:
    """What ``on_request`` sees of one HTTP request, before anything of it went on.

    ``flow`` is the stream's flow (an HTTP on-ramp's: the client, its tenant, and the
    destination the request names). ``host`` is the Host header's (or an absolute-form or
    CONNECT target's) name, lowercase, without the port; ``port`` the port it names (else the
    flow's destination port). ``target`` is the request target as it came; ``path`` its path
    (no query). ``headers`` are as they came (names lowercase), hop-by-hop ones included.
    ``upstream`` is where it goes unless a decision says otherwise: the flow's destination, or
    the on-ramp's resolved target (None while a name is not resolved yet)."""

    flow: FlowStart
    method: str
    target: str
    host: str
    port: int
    path: str
    headers: Headers
    upstream: tuple[str, int] | None = None
    onramp: str | None = None  # the HTTP on-ramp's name; None for a stream carried as HTTP

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), if there is one."""
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)


@dataclass(frozen=True)
class HttpDecision:
    """``allow``: send the request on, to ``upstream`` (None: where it was going; a device
    address of the tenant's network is reached by downgrade), with ``target`` instead of its
    request target and its headers changed (``set_headers`` replace every header of the name
    or add it, ``remove_headers`` remove them; ``host`` is a header like the others); ``deny``:
    answer ``status`` (403 by default) with a short body saying ``reason``.

    ``on_response`` may answer one too: ``deny`` replaces the response (before any of it went
    to the client), ``allow`` changes its headers."""

    action: str  # "allow" | "deny"
    status: int = 403
    reason: str = ""
    upstream: tuple[str, int] | None = None
    target: str | None = None
    set_headers: Headers = ()
    remove_headers: tuple[str, ...] = ()

    @classmethod
    def allow(cls, reason: str = "", *, upstream: tuple[str, int] | None = None,
              target: str | None = None, set_headers: Headers | dict[str, str] = (),
              remove_headers: tuple[str, ...] | list[str] = ()) -> HttpDecision:
        if isinstance(set_headers, dict):
            set_headers = tuple(set_headers.items())
        return cls("allow", 200, reason, upstream, target, tuple(set_headers),
                   tuple(remove_headers))

    @classmethod
    def deny(cls, reason: str = "", status: int = 403) -> HttpDecision:
        return cls("deny", status, reason)


@dataclass(frozen=True)
class HttpResponse:
    """What ``on_response`` sees: the request it answers, its status and headers (names
    lowercase), before any of it went to the client."""

    request: HttpRequest
    status: int
    reason: str
    headers: Headers

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)
