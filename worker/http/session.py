"""Serving one client connection as HTTP/1.1: each request decided, sent on, answered, audited.

Two kinds of connection are served:

- a flow's stream carried as HTTP (``layer = "http"``): requests go to the flow's destination
  (the origin) over the flow's own off-ramp stream, unless a decision picks another upstream;
- an HTTP on-ramp's client (a forward proxy): absolute-form requests (``GET http://host/``) go to
  the host they name, ``CONNECT host:port`` hands the connection to the data path as a TCP flow
  (the same flow hooks, stream hooks and downgrade as any other) once it is decided.

For each request: the rules' HTTP keys and the application's ``on_request`` decide
(:class:`~ipferry.engine.decisions.HttpDecision`: allow, maybe to another upstream with another
target or headers, or deny with a status); the request goes on with its body streamed (one
chunk in flight per direction); ``on_response`` may change the response's headers or replace
it; one ``http_request`` audit record is written. ``Upgrade`` requests (WebSocket) that the
upstream accepts (101) become streams spliced in the kernel.

Bad input never raises out: a malformed request is answered 400 (a head over the limit 431, a
slow head 408) and the connection closed; an upstream that fails before answering is a 502 (504
when it is silent); one that fails mid-response resets the client, which must not take a cut
response for a whole one.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11

from ipferry.engine.decisions import (
    FlowStart,
    HttpDecision,
    HttpRequest,
    HttpResponse,
    TunnelContext,
)
from ipferry.runtime.settings import Http
from ipferry.wire.httpmsg import (
    BadTarget,
    authority,
    forwarded_headers,
    parse_target,
    plain_response,
    response_headers,
    status_class,
)

from .. import metrics
from ..app import call_hook
from ..relay import abort, relay
from .conn import ConnectionLost, HttpConn
from .pool import UpstreamKey, Upstreams, alive

__all__ = ["HttpLayer", "Refused", "Served"]

_UPGRADE_OK = {"websocket"}  # protocols an Upgrade may switch to (h2c is not passed on)
_NO_BODY = {"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"}


class Refused(Exception):
    """A dial the data path refused (the flow rules, a limit) or that failed: ``status`` is what
    the client is answered (403, 502, 504), ``reason`` why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Served:
    """Who a served connection is: its tenant, client and flow (an HTTP on-ramp's connection
    has no flow: ``origin`` None, ``onramp`` its name)."""

    tenant: str | None  # None: an on-ramp's client names its tenant with a token
    client: tuple[str, int]
    context: TunnelContext
    origin: tuple[str, int] | None = None  # a carried flow's destination
    flow: dict | None = None  # a carried flow's identity fields (audit)
    onramp: str | None = None
    # An on-ramp's: the tenant a request's Proxy-Authorization names (None: it has none; "":
    # a token that names no tenant).
    authenticate: Callable[[HttpRequest], str | None] | None = None


class _Stop(Exception):
    """End the connection (after what was said to the client)."""


class _Upstream:
    """The upstream connection a request went to, and whose it is."""

    __slots__ = ("conn", "flow", "key", "pooled", "reused")

    def __init__(self, conn: HttpConn, flow: dict | None, key: UpstreamKey | None,
                 reused: bool) -> None:
        self.conn, self.flow, self.key, self.reused = conn, flow, key, reused
        self.pooled = key is not None


class HttpLayer:
    """A worker's HTTP layer: its limits, hooks, upstream pool, audit and metrics."""

    def __init__(self, settings: Http, *, get_app: Callable[[], object], audit: Any, log: Any,
                 dial: Callable[[str, tuple[str, int], tuple[str, int]], Awaitable[Any]],
                 hand_connect: Callable[..., Awaitable[tuple[int, dict | None]]] | None = None,
                 resolve: Callable[[str, int], Awaitable[str]] | None = None,
                 forbidden: Callable[[tuple[str, int]], bool] | None = None) -> None:
        self.settings = settings
        self.get_app = get_app
        self.audit = audit
        self.log = log
        self.upstreams = Upstreams(dial, per_upstream=settings.pool_per_upstream,
                                   total=settings.pool_total,
                                   idle_timeout=settings.pool_idle_timeout,
                                   max_head=settings.max_header_bytes)
        self.hand_connect = hand_connect  # CONNECT: (served, tenant, sock, target) -> status
        self.resolve = resolve if resolve is not None else _resolve
        # (address, port) no client may name: the daemon's own host (see the data path)
        self.forbidden = forbidden if forbidden is not None else _nowhere_forbidden
        self.sessions = 0

    async def serve(self, sock: socket.socket, served: Served,
                    origin: socket.socket | None = None, first: bytes = b"") -> bool:
        """Serve ``sock`` until the client is done (or cut short). ``origin`` is a carried
        flow's connected off-ramp: requests to the origin use it first. ``first``: the client's
        bytes read already (looking for a TLS ClientHello), the start of its first request.
        Neither socket is closed
        here; True when ``sock`` was handed on (a CONNECT) and is no longer the caller's."""
        self.sessions += 1
        session = _Session(self, sock, served, origin)
        if first:  # the client's bytes read already (looking for a TLS ClientHello)
            session.client.h11.receive_data(first)
            session.client.received += len(first)
        try:
            return await session.run()
        finally:
            self.sessions -= 1
            session.release()

    def sweep(self) -> None:
        self.upstreams.sweep()

    def close(self) -> None:
        self.upstreams.close()


class _Session:
    def __init__(self, layer: HttpLayer, sock: socket.socket, served: Served,
                 origin: socket.socket | None) -> None:
        self.layer = layer
        self.settings = layer.settings
        self.served = served
        self.client = HttpConn(sock, h11.SERVER, max_head=self.settings.max_header_bytes)
        self.origin: _Upstream | None = None
        if origin is not None:
            self.origin = _Upstream(HttpConn(origin, h11.CLIENT,
                                             max_head=self.settings.max_header_bytes),
                                    served.flow, None, True)
        self.handed = False
        self.log = layer.log
        self.stash: Any = None  # the request's first body event, read with its head
        self.sticky: _Upstream | None = None  # the last pooled upstream, done, kept for the next
        self.method = b""  # the current request's (a HEAD's answer has no body)

    # -- the connection ----------------------------------------------------------------------------

    async def run(self) -> bool:
        first = True
        try:
            while True:
                request = await self._read_head(first)
                if request is None:
                    return self.handed
                first = False
                await self._serve(request)
                if self.handed:
                    return True
                if not self.client.reusable:
                    return False
                self.client.h11.start_next_cycle()
        except _Stop:
            return self.handed
        except ConnectionLost:
            return self.handed

    def release(self) -> None:
        """The origin's connection is the flow's (its driver closes it); the last pooled one
        goes back to the pool."""
        self.origin = None
        self._unstick()

    def _unstick(self) -> None:
        sticky, self.sticky = self.sticky, None
        if sticky is not None and sticky.key is not None:
            self.layer.upstreams.put(sticky.key, sticky.conn, sticky.flow or {})

    async def _read_head(self, first: bool) -> h11.Request | None:
        """The next request's head, or None when the client is done (closed, idle too long)."""
        buffered = bool(self.client.h11.trailing_data[0])
        wait = self.settings.header_timeout if first or buffered else None
        try:
            if wait is None:  # keep-alive: idle until the next request's first byte
                async with asyncio.timeout(self.settings.idle_timeout):
                    await self._readable()
                wait = self.settings.header_timeout
            async with asyncio.timeout(wait):  # (no task per request, unlike wait_for)
                event = await self.client.next_event()
            # A body-less request's end is there already: take it now, so that a refusal keeps
            # the connection and an upstream answering at once finds the request whole. (A
            # body's first bytes, if they came with the head, wait for the upload.) Bad body
            # bytes that came with the head are bad input like a bad head.
            following = None if not isinstance(event, h11.Request) else \
                self.client.h11.next_event()
        except TimeoutError:
            if self.client.received == 0 and first or not self._partial():
                return None  # nothing of a request: an idle connection, closed quietly
            self._reject("header_timeout")
            await self._say(408, "the request's head took too long")
            raise _Stop from None
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            self._reject("header_too_large" if status == 431 else "malformed")
            await self._say(status, f"bad request: {str(exc)[:120]}")
            raise _Stop from None
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
        assert isinstance(event, h11.Request), event
        # h11 bounds a head still coming; one that came whole in a read is bounded here.
        size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
        if size > self.settings.max_header_bytes:
            self._reject("header_too_large")
            await self._say(431, f"the request's head is over {self.settings.max_header_bytes} "
                            "bytes")
            raise _Stop
        self.stash = None if following is h11.NEED_DATA else following
        return event

    def _partial(self) -> bool:
        return bool(self.client.h11.trailing_data[0]) or \
            self.client.h11.their_state is not h11.IDLE

    async def _readable(self) -> None:
        if self.client.h11.trailing_data[0]:
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        fd = self.client.sock.fileno()
        loop.add_reader(fd, _wake, fut)
        try:
            await fut
        finally:
            loop.remove_reader(fd)

    # -- one request ---------------------------------------------------------------------------

    async def _serve(self, head: h11.Request) -> None:
        started = time.monotonic()
        self.method = head.method
        method = head.method.decode("ascii", "replace")
        raw_target = head.target.decode("latin-1")
        try:
            target = parse_target(method, raw_target)
        except BadTarget as exc:
            self._reject("bad_target")
            await self._answer(400, f"bad request target: {exc}", close=True)
            return
        served = self.served
        headers = tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in head.headers)
        host_header = next((v for n, v in headers if n == "host"), None)
        if served.onramp is None:
            if target.form == "authority":
                self._reject("bad_target")
                await self._answer(405, "CONNECT is for HTTP on-ramps, not a stream carried "
                                   "as HTTP", close=True)
                return
            assert served.origin is not None
            host, port = target.host, target.port
            if host is None:
                host, port = _host_of(host_header, served.origin)
            upstream: tuple[str, int] | None = served.origin
        else:
            if target.form not in ("absolute", "authority"):
                self._reject("bad_target")
                await self._answer(400, "a proxy request needs an absolute URL "
                                   "(http://host/path) or CONNECT host:port", close=True)
                return
            assert target.host is not None and target.port is not None
            host, port = target.host, target.port
            upstream = (host, port) if _is_ip(host) else None
        tenant = served.tenant
        flow = FlowStart(tenant or "", "tcp", served.client[0], served.client[1],
                         upstream[0] if upstream else "", upstream[1] if upstream else port or 0,
                         served.context, host)
        request = HttpRequest(flow, method, raw_target, host or "", port or 0,
                              target.path.partition("?")[0], headers, upstream, served.onramp)
        if served.authenticate is not None:
            named = served.authenticate(request)
            if named == "" or (named is None and tenant is None):
                self._reject("proxy_auth")
                record = _Record(self, request, None, started)
                record.decision, record.reason = "deny", "proxy authentication required"
                record.done(407, None)
                await self._answer(407, "proxy authentication required: a token as "
                                   "Proxy-Authorization (Bearer TOKEN, or Basic with the token "
                                   "as the password)",
                                   close=self.client.h11.their_state is not h11.DONE,
                                   extra=((b"proxy-authenticate", b'Basic realm="ipferry"'),))
                return
            if named is not None and named != tenant:
                tenant = named
                flow = FlowStart(tenant, "tcp", flow.src, flow.sport, flow.dst, flow.dport,
                                 TunnelContext(tenant, served.context.extra), host)
                request = HttpRequest(flow, method, raw_target, request.host, request.port,
                                      request.path, headers, upstream, served.onramp)
        assert tenant is not None
        decision = await self._decide(request)
        if decision is None:
            return
        record = _Record(self, request, tenant, started)
        if decision.action != "allow":
            record.decision, record.reason = "deny", decision.reason
            status = decision.status if 400 <= decision.status < 600 else 403
            record.done(status, self.served.flow)  # before the answer: a closing one raises
            await self._answer(status, decision.reason or "denied",
                               close=self.client.h11.their_state is not h11.DONE)
            return
        record.reason = decision.reason
        up_addr = decision.upstream or upstream
        if up_addr is None:
            assert host is not None and port is not None
            try:
                up_addr = (await self.layer.resolve(host, port), port)
            except OSError as exc:
                record.done(502, None, upstream=None)
                await self._answer(502, f"cannot resolve {host}: {exc.strerror or exc}",
                                   close=self.client.h11.their_state is not h11.DONE)
                return
        record.upstream = up_addr
        if decision.upstream is None and served.onramp is not None \
                and self.layer.forbidden(up_addr):
            # A client's own choice of destination (an application's is its own): never the
            # daemon's host (its admin API, its on-ramps), as no tunnel's flow may go there.
            self._reject("forbidden_destination")
            record.decision, record.reason = "deny", "the daemon's own host is no destination"
            record.done(403, None)
            await self._answer(403, record.reason,
                               close=self.client.h11.their_state is not h11.DONE)
            return
        if target.form == "authority":
            await self._connect(request, tenant, up_addr, record)
            return
        await self._forward(head, request, decision, target.path, up_addr, tenant, record)

    async def _decide(self, request: HttpRequest) -> HttpDecision | None:
        hook = getattr(self.layer.get_app(), "on_request", None)
        if hook is None:
            return HttpDecision.allow()
        try:
            decision = await call_hook(hook, request)
            if decision is None:
                return HttpDecision.allow()
            if not isinstance(decision, HttpDecision):
                raise TypeError(f"on_request answered {type(decision).__name__}, not an "
                                "HttpDecision or None")
            return decision
        except Exception as exc:  # fail closed: a policy that cannot decide lets nothing by
            self.log.warning("http_hook_failed", hook="on_request", error=repr(exc)[:200],
                             tenant=request.flow.tenant, host=request.host)
            self._reject("hook_error")
            await self._answer(500, "the proxy's request hook failed", close=True)
            return None

    # -- CONNECT (an on-ramp's): the connection goes on as a TCP flow -----------------------------

    async def _connect(self, request: HttpRequest, tenant: str, upstream: tuple[str, int],
                       record: _Record) -> None:
        trailing = self.client.trailing()
        if self.layer.hand_connect is None or len(trailing) > 16384:
            status = 400 if trailing else 501
            record.done(status, None)
            await self._answer(status, "CONNECT is not served here", close=True)
            return
        self.handed = True  # the socket is the data path's from now on, whatever it answers
        status, flow = await self.layer.hand_connect(self.served, tenant, self.client.sock,
                                                     upstream, trailing)
        record.decision = "allow" if status == 200 else "deny"
        record.done(status, flow)

    # -- a request sent on ------------------------------------------------------------------------

    async def _forward(self, head: h11.Request, request: HttpRequest, decision: HttpDecision,
                       path: str, upstream: tuple[str, int], tenant: str,
                       record: _Record) -> None:
        upgrade = _wants_upgrade(head)
        headers = forwarded_headers(list(head.headers), upgrade=upgrade,
                                    set_headers=decision.set_headers,
                                    remove_headers=decision.remove_headers)
        if not any(n == b"host" for n, _ in headers):  # HTTP/1.0 clients may send none
            headers.append((b"host", _host_value(request.host, request.port).encode()))
        target = decision.target or path  # origin form (an absolute URL's path and query)
        if not target or not (target.startswith("/") or target == "*"):
            target = "/" + (target or "")
        out = h11.Request(method=head.method, target=target.encode("latin-1"), headers=headers)
        has_body = self.client.h11.their_state is not h11.DONE
        for attempt in (0, 1):
            try:
                up = await self._upstream(tenant, upstream)
            except Refused as exc:
                record.done(exc.status, None)
                await self._answer(exc.status, exc.reason, close=has_body)
                return
            try:
                await up.conn.send(out)
            except ConnectionLost:
                self._drop(up)
                if attempt == 0 and up.reused:
                    continue  # an idle connection the upstream closed as we took it: again
                record.done(502, up.flow)
                await self._answer(502, "the upstream closed the connection", close=has_body)
                return
            break
        record.flow = up.flow
        await self._exchange(up, request, record)

    async def _upstream(self, tenant: str, upstream: tuple[str, int]) -> _Upstream:
        origin = self.origin
        if origin is not None and upstream == self.served.origin:
            if origin.conn.h11.our_state is h11.IDLE and alive(origin.conn.sock):
                return origin
            self.origin = None  # closed by the upstream: the next goes by the pool
        key = UpstreamKey(tenant, upstream[0], upstream[1])
        sticky = self.sticky
        if sticky is not None:
            if sticky.key == key and alive(sticky.conn.sock):
                self.sticky = None
                sticky.conn.h11.start_next_cycle()
                sticky.reused = True
                return sticky
            self._unstick()  # another upstream's (or dead: the pool's peek finds out)
        try:
            conn, flow, reused = await self.layer.upstreams.get(key, self.served.client)
        except Refused:
            raise
        except TimeoutError:
            raise Refused(504, f"the upstream {_host_value(*upstream)} did not answer") from None
        except OSError as exc:
            raise Refused(502, f"cannot reach {_host_value(*upstream)}: "
                          f"{exc.strerror or exc}") from None
        return _Upstream(conn, flow, key, reused)

    async def _exchange(self, up: _Upstream, request: HttpRequest, record: _Record) -> None:
        if isinstance(self.stash, h11.EndOfMessage):  # no body: no upload to run beside
            self.stash = None
            try:
                await up.conn.send(h11.EndOfMessage())
                status, switched = await self._download(up, request, record)
            except BaseException:
                self._drop(up)
                record.done(record.status or 502, up.flow)
                raise
            record.done(status, up.flow)
            if switched:
                await self._switch(up)
            elif up.conn.reusable:
                self._keep(up)
            else:
                self._drop(up)
            return
        upload = asyncio.ensure_future(self._upload(up, record))
        download = asyncio.ensure_future(self._download(up, request, record))
        try:
            await asyncio.wait((upload, download), return_when=asyncio.FIRST_COMPLETED)
            if not download.done() and upload.exception() is not None:
                await self._upload_failed(up, record, upload.exception(), download)
            status, switched = await download
        except BaseException:
            for task in (upload, download):
                task.cancel()
            await asyncio.gather(upload, download, return_exceptions=True)
            self._drop(up)
            record.done(record.status or 502, up.flow)
            raise
        if not upload.done() and self.client.h11.their_state is h11.SEND_BODY:
            upload.cancel()  # answered before the body was all there: both close after this
        results = await asyncio.gather(upload, return_exceptions=True)
        upload_failed = isinstance(results[0], BaseException)
        record.done(status, up.flow)
        if switched:
            await self._switch(up)
            return
        if upload_failed or not up.conn.reusable:
            self._drop(up)
            if upload_failed:
                raise _Stop
            return
        self._keep(up)

    async def _upload_failed(self, up: _Upstream, record: _Record, exc: BaseException | None,
                             download: asyncio.Future) -> None:
        """The client's body failed before the answer ended (it went away, or its framing is
        bad): the upstream would wait for the rest forever. Both ends go."""
        download.cancel()
        await asyncio.gather(download, return_exceptions=True)
        self._drop(up)
        if isinstance(exc, h11.RemoteProtocolError) and \
                self.client.h11.our_state is h11.SEND_RESPONSE:
            self._reject("malformed")
            record.done(400, up.flow)
            await self._say(400, f"bad request body: {str(exc)[:120]}")
        else:
            if self.client.h11.our_state is not h11.SEND_RESPONSE:
                abort(self.client.sock)  # part of the answer went: never a short "whole" one
            record.reason = record.reason or "the client went away mid-request"
            record.done(record.status or 400, up.flow)
        raise _Stop

    async def _upload(self, up: _Upstream, record: _Record) -> None:
        """The request's body, client to upstream, a chunk at a time, and its end."""
        while True:
            event, self.stash = self.stash, None
            if event is None:
                event = await self.client.next_event()
            if isinstance(event, h11.Data):
                record.sent += len(event.data)
                await up.conn.send(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                await up.conn.send(h11.EndOfMessage())
                return
            else:  # ConnectionClosed mid-body
                raise ConnectionLost("the client closed mid-request")

    async def _download(self, up: _Upstream, request: HttpRequest,
                        record: _Record) -> tuple[int, bool]:
        """The response, upstream to client; (status, switched protocols)."""
        status = 0
        try:
            while True:
                event = await up.conn.next_event()
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101:
                        if self.client.h11.their_state is not h11.MIGHT_SWITCH_PROTOCOL:
                            raise h11.RemoteProtocolError("a 101 to a request that asked for "
                                                          "no upgrade")
                        record.status = 101
                        await self.client.send(h11.InformationalResponse(
                            status_code=101, headers=list(event.headers), reason=event.reason))
                        return 101, True
                    await self.client.send(h11.InformationalResponse(
                        status_code=event.status_code, headers=response_headers(
                            list(event.headers)), reason=event.reason))
                elif isinstance(event, h11.Response):
                    status = record.status = event.status_code
                    if not await self._respond(event, request, record):
                        return record.status, False
                elif isinstance(event, h11.Data):
                    record.received += len(event.data)
                    await self.client.send(h11.Data(data=event.data))
                elif isinstance(event, h11.EndOfMessage):
                    await self.client.send(h11.EndOfMessage())
                    return status, False
                else:  # ConnectionClosed before the response ended
                    raise ConnectionLost("the upstream closed mid-response")
        except (ConnectionLost, h11.RemoteProtocolError) as exc:
            if self.client.h11.our_state is h11.SEND_RESPONSE:  # nothing sent yet: say so
                self.log.info("http_upstream_failed", error=str(exc)[:200],
                              host=request.host, tenant=request.flow.tenant)
                self._drop(up)
                record.status = 502
                await self._answer(502, f"the upstream failed: {str(exc)[:120]}", close=True)
                return 502, False
            abort(self.client.sock)  # cut mid-response: a reset, never a short "whole" one
            record.reason = f"cut mid-response ({record.reason})" if record.reason else \
                "cut mid-response"
            raise _Stop from None

    async def _respond(self, event: h11.Response, request: HttpRequest,
                       record: _Record) -> bool:
        """Send the response head (after ``on_response``); False if it was replaced."""
        set_h: tuple[tuple[str, str], ...] = ()
        remove_h: tuple[str, ...] = ()
        hook = getattr(self.layer.get_app(), "on_response", None)
        if hook is not None:
            response = HttpResponse(request, event.status_code,
                                    event.reason.decode("latin-1"),
                                    tuple((n.decode("latin-1"), v.decode("latin-1"))
                                          for n, v in event.headers))
            try:
                decision = await call_hook(hook, response)
                if decision is not None and not isinstance(decision, HttpDecision):
                    raise TypeError(f"on_response answered {type(decision).__name__}")
            except Exception as exc:
                self.log.warning("http_hook_failed", hook="on_response", error=repr(exc)[:200],
                                 tenant=request.flow.tenant, host=request.host)
                self._reject("hook_error")
                record.status = 502
                await self._answer(502, "the proxy's response hook failed", close=True)
                return False
            if decision is not None and decision.action != "allow":
                record.status = decision.status if 400 <= decision.status < 600 else 502
                record.decision, record.reason = "deny", decision.reason
                await self._answer(record.status, decision.reason or "response denied",
                                   close=True)
                return False
            if decision is not None:
                set_h, remove_h = decision.set_headers, decision.remove_headers
        self.client.hold(h11.Response(  # goes with the body's first bytes, or its end
            status_code=event.status_code, reason=event.reason,
            headers=response_headers(list(event.headers), set_h, remove_h)))
        return True

    async def _switch(self, up: _Upstream) -> None:
        """Both sides switched protocols (101): their first bytes across, then a kernel splice
        until both end. Neither connection is HTTP any more: the upstream's is not pooled."""
        client_first, up_first = self.client.trailing(), up.conn.trailing()
        if up_first:
            await self.client.write(up_first)
        if client_first:
            await up.conn.write(client_first)
        try:
            await relay(self.client.sock, up.conn.sock)
        finally:
            if up.pooled:
                up.conn.close()
            self.origin = None
        raise _Stop

    def _keep(self, up: _Upstream) -> None:
        if up.pooled and up.key is not None:
            # Kept by this client for its next request (a keep-alive client's next request
            # mostly goes where its last went): the pool gets it when the client goes elsewhere
            # or away.
            self._unstick()
            self.sticky = up
        elif up is self.origin:
            up.conn.h11.start_next_cycle()

    def _drop(self, up: _Upstream) -> None:
        if up.pooled:
            up.conn.close()
        elif up is self.origin:
            self.origin = None  # the flow's own: its driver closes it

    # -- what the proxy says itself ---------------------------------------------------------------

    async def _answer(self, status: int, text: str, *, close: bool,
                      extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """A short plain-text answer to the current request (through h11, so keep-alive goes
        on when it may); ``close`` ends the connection after it."""
        body = (text.rstrip("\n") + "\n").encode("utf-8", "replace")
        headers = [(b"content-type", b"text/plain; charset=utf-8"),
                   (b"content-length", str(len(body)).encode()), *extra]
        if close:
            headers.append((b"connection", b"close"))
        try:
            self.client.hold(h11.Response(status_code=status, headers=headers,
                                          reason=_phrase(status)))
            if self.method != b"HEAD":  # a HEAD's answer: the head only
                await self.client.send(h11.Data(data=body))
            await self.client.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            raise _Stop from None
        if close:
            raise _Stop

    async def _say(self, status: int, text: str) -> None:
        """An answer outside h11 (its state is an error's): written raw, then the end."""
        try:
            await asyncio.wait_for(self.client.write(plain_response(status, text)), 5)
        except (ConnectionLost, OSError, TimeoutError):
            pass

    def _reject(self, reason: str) -> None:
        metrics.HTTP_REJECTED.labels(reason).inc()


class _Record:
    """One request's audit record and metrics, written once when its answer is known."""

    __slots__ = ("session", "request", "tenant", "started", "sent", "received", "decision",
                 "reason", "upstream", "flow", "written", "status")

    def __init__(self, session: _Session, request: HttpRequest, tenant: str | None,
                 started: float) -> None:
        self.session = session
        self.request = request
        self.tenant = tenant
        self.started = started
        self.sent = self.received = 0
        self.decision = "allow"
        self.reason = ""
        self.upstream: tuple[str, int] | None = request.upstream
        self.flow: dict | None = None
        self.written = False
        self.status = 0  # the answer's, once known

    def done(self, status: int, flow: dict | None, **_: object) -> None:
        if self.written:
            return
        self.written = True
        duration = time.monotonic() - self.started
        metrics.HTTP_REQUESTS.labels(status_class(status)).inc()
        metrics.HTTP_DURATION.observe(duration)
        request, served = self.request, self.session.served
        flow = flow or self.flow or served.flow or {}
        self.session.layer.audit.record(
            "http_request", tenant=self.tenant, client=served.client[0],
            client_port=served.client[1], onramp=served.onramp, method=request.method,
            host=request.host, path=request.path[:1024], status=status,
            request_bytes=self.sent, response_bytes=self.received,
            duration=round(duration, 6), decision=self.decision, reason=self.reason,
            upstream=None if self.upstream is None else _host_value(*self.upstream),
            flow={k: flow.get(k) for k in ("src", "sport", "dst", "dport")} if flow else None)


def _nowhere_forbidden(upstream: tuple[str, int]) -> bool:
    return False


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _wants_upgrade(head: h11.Request) -> bool:
    """A request asking to switch to a protocol we pass on (WebSocket)."""
    upgrade = next((v for n, v in head.headers if n == b"upgrade"), None)
    if upgrade is None:
        return False
    connection = b",".join(v for n, v in head.headers if n == b"connection").lower()
    return b"upgrade" in connection and upgrade.strip().lower().decode("latin-1") in _UPGRADE_OK


def _host_of(header: str | None, origin: tuple[str, int]) -> tuple[str, int]:
    """The Host header's name and port (the origin's when there is none, or it is bad)."""
    if header:
        try:
            return authority(header, origin[1])
        except BadTarget:
            pass
    return origin


def _host_value(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == 80 else f"{shown}:{port}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


_NAMES: dict[str, tuple[str, float]] = {}
_NAMES_MAX = 4096
NAME_TTL = 30.0


async def _resolve(host: str, port: int) -> str:
    """A host name's address (the host's resolver, cached :data:`NAME_TTL` seconds)."""
    now = time.monotonic()
    cached = _NAMES.get(host)
    if cached is not None and cached[1] > now:
        return cached[0]
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), 5)
    except TimeoutError:
        raise OSError(errno.ETIMEDOUT, "the resolver did not answer") from None
    except socket.gaierror as exc:
        raise OSError(errno.EHOSTUNREACH, exc.strerror or "no such host") from None
    address = str(infos[0][4][0])
    if len(_NAMES) >= _NAMES_MAX:
        _NAMES.clear()
    _NAMES[host] = (address, now + NAME_TTL)
    return address
