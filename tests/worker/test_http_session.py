"""The HTTP layer serving one client connection (``HttpLayer.serve``), no root and no daemon:
the client is a loopback TCP connection driven with h11, the origin and other upstreams are
aiohttp servers (or scripted ones, for what aiohttp would not do) on 127.0.0.1, and ``dial`` is a
fake that connects a loopback socket (the engine's dial is tested end to end elsewhere).

Covered: keep-alive on the flow's own connection, bodies streamed both ways, rules and hooks
(sync and async) deciding, rewriting and failing, every refusal of bad input (400, 431, 408, a
quiet close when idle), upstream failures (502, 504, a reset mid-response), HEAD, 304,
100-continue, switched protocols, the upstream pool, the metrics and the audit records."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipferry.engine.decisions import HttpDecision, HttpRequest, HttpResponse, TunnelContext
from ipferry.runtime.settings import Http
from ipferry.worker import metrics
from ipferry.worker.app import Rule, RulesApplication
from ipferry.worker.http.conn import HttpConn
from ipferry.worker.http.pool import Dialed, UpstreamKey, Upstreams
from ipferry.worker.http.session import HttpLayer, Refused, Served

pytestmark = pytest.mark.timeout(30)

HTTP = Http(header_timeout=2.0, idle_timeout=2.0)
CLIENT = ("192.0.2.7", 40000)
TENANT = "acme"
LOOP = "127.0.0.1"


# -- the harness ---------------------------------------------------------------------------------


def run(test: Callable[[], Awaitable[None]], timeout: float = 10.0) -> None:
    async def main() -> None:
        await asyncio.wait_for(test(), timeout)

    asyncio.run(main())


def requests(status_class: str) -> float:
    return metrics.HTTP_REQUESTS.labels(status_class)._value.get()


def rejected(reason: str) -> float:
    return metrics.HTTP_REJECTED.labels(reason)._value.get()


class Audit:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def record(self, event: str, **fields: object) -> None:
        assert event == "http_request"
        self.records.append(fields)


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []

    def __getattr__(self, level: str):
        return lambda event, **kw: self.events.append((level, event, kw))

    def named(self, event: str) -> list[dict]:
        return [kw for _, e, kw in self.events if e == event]


class Dialer:
    """``dial``: a loopback TCP connection to the upstream (or what ``refuse`` says for it)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, int], tuple[str, int]]] = []
        self.refuse: dict[tuple[str, int], BaseException] = {}
        self.socks: list[socket.socket] = []

    async def __call__(self, tenant: str, client: tuple[str, int],
                       upstream: tuple[str, int]) -> Dialed:
        self.calls.append((tenant, client, upstream))
        if upstream in self.refuse:
            raise self.refuse[upstream]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, upstream)
        except OSError:
            sock.close()
            raise
        self.socks.append(sock)
        return Dialed(sock, {"src": client[0], "sport": sock.getsockname()[1],
                             "dst": upstream[0], "dport": upstream[1]})


class Hooks:
    """An application with the hooks a test gives it."""

    def __init__(self, on_request=None, on_response=None) -> None:
        if on_request is not None:
            self.on_request = on_request
        if on_response is not None:
            self.on_response = on_response


def upstream_app(name: str) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        assert request.transport is not None
        return web.json_response({
            "name": name, "method": request.method, "path": request.path_qs,
            "headers": [[k.decode().lower(), v.decode()] for k, v in request.raw_headers],
            "body": len(body), "peer": request.transport.get_extra_info("peername")[1]})

    async def sha256(request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(1 << 16):
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"sha256": digest.hexdigest(), "size": size,
                                  "chunked": request.headers.get("Transfer-Encoding")})

    async def many(request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        resp = web.StreamResponse()
        if request.query.get("chunked"):
            resp.enable_chunked_encoding()
        else:
            resp.content_length = n
        await resp.prepare(request)
        block = bytes(range(256)) * 256
        while n > 0:
            await resp.write(block[:n])
            n -= len(block)
        await resp.write_eof()
        return resp

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from {name}\n", headers={"Server": "up",
                                                                   "X-Up": name})

    async def etag(request: web.Request) -> web.Response:
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={"ETag": '"v1"'})
        return web.Response(text="version one", headers={"ETag": '"v1"'})

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/admin", echo)
    app.router.add_route("*", "/sha256", sha256)
    app.router.add_get("/bytes/{n:\\d+}", many)
    app.router.add_get("/hello", hello)
    app.router.add_get("/etag", etag)
    return app


class Conn:
    """A client connection being served: ``sock`` is the client's end (driven with h11),
    ``served`` the layer's, ``task`` its ``serve``."""

    def __init__(self, sock: socket.socket, served: socket.socket,
                 origin: socket.socket | None, task: asyncio.Future) -> None:
        self.sock, self.served, self.origin, self.task = sock, served, origin, task
        self.h11 = h11.Connection(h11.CLIENT)
        self.loop = asyncio.get_running_loop()

    async def write(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def send(self, *events: Any) -> None:
        await self.write(b"".join(self.h11.send(e) or b"" for e in events))

    async def event(self) -> object:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await self.loop.sock_recv(self.sock, 1 << 16))

    async def response(self) -> tuple[h11.Response, bytes]:
        body = bytearray()
        head = None
        while True:
            event = await self.event()
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                    self.h11.start_next_cycle()
                return head, bytes(body)
            else:
                raise AssertionError(f"unexpected {event!r}")

    async def request(self, method: str, target: str, *, headers=(), body: bytes | None = None,
                      chunks: list[bytes] | None = None) -> tuple[h11.Response, bytes]:
        head = [("host", "origin.example"), *headers]
        if body is not None:
            head.append(("content-length", str(len(body))))
        await self.send(h11.Request(method=method, target=target, headers=head))
        for chunk in chunks or ([body] if body else []):
            await self.send(h11.Data(data=chunk))
        await self.send(h11.EndOfMessage())
        return await self.response()

    async def done(self, timeout: float = 3.0) -> bool:
        """``serve``'s answer (it must end within ``timeout``); then its socket is closed, as
        its caller does unless it was handed on."""
        handed = await asyncio.wait_for(asyncio.shield(self.task), timeout)
        if not handed:
            self.served.close()
        return handed

    async def rest(self, timeout: float = 3.0) -> bytes:
        """What the client reads until the end (a reset raises)."""
        out = bytearray()
        while True:
            data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 1 << 16), timeout)
            if not data:
                return bytes(out)
            out += data


def answer(raw: bytes, method: str = "GET") -> tuple[h11.Response, bytes, bool]:
    """A raw answer parsed as a client would: (head, body, whether it says it closes)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")
    head = conn.next_event()
    assert isinstance(head, h11.Response), head
    body = bytearray()
    while isinstance(event := conn.next_event(), h11.Data):
        body += event.data
    assert isinstance(event, h11.EndOfMessage), event
    return head, bytes(body), conn.their_state is h11.MUST_CLOSE


def header(resp: h11.Response, name: str) -> bytes | None:
    return next((v for n, v in resp.headers if n == name.encode()), None)


class Env:
    def __init__(self, settings: Http = HTTP, app: object = None, hand_connect=None) -> None:
        self.app = app if app is not None else RulesApplication()
        self.audit = Audit()
        self.log = Log()
        self.dialer = Dialer()
        self.layer = HttpLayer(settings, get_app=lambda: self.app, audit=self.audit,
                               log=self.log, dial=self.dialer, hand_connect=hand_connect)
        self.runners: list[web.AppRunner] = []
        self.servers: list[asyncio.AbstractServer] = []
        self.conns: list[Conn] = []

    async def aiohttp(self, name: str = "a") -> int:
        runner = web.AppRunner(upstream_app(name), access_log=None, shutdown_timeout=0.2)
        await runner.setup()
        site = web.TCPSite(runner, LOOP, 0)
        await site.start()
        self.runners.append(runner)
        return runner.addresses[0][1]

    async def scripted(self, handler) -> int:
        """An upstream that runs ``handler(reader, writer)`` for each connection."""
        server = await asyncio.start_server(handler, LOOP, 0)
        self.servers.append(server)
        return server.sockets[0].getsockname()[1]

    def carried(self, port: int, **kw) -> Served:
        """A flow to 127.0.0.1:``port`` carried as HTTP."""
        return Served(TENANT, CLIENT, TunnelContext(TENANT), origin=(LOOP, port),
                      flow={"src": CLIENT[0], "sport": CLIENT[1], "dst": LOOP, "dport": port},
                      **kw)

    def onramp(self, tenant: str | None = TENANT, **kw) -> Served:
        return Served(tenant, CLIENT, TunnelContext(tenant or "", {"onramp": "web"}),
                      onramp="web", **kw)

    async def open(self, port: int | None = None, served: Served | None = None) -> Conn:
        """A client connection served: a flow to ``port`` carried as HTTP (its origin connection
        made here), or as ``served`` says."""
        listener = socket.socket()
        listener.bind((LOOP, 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
        listener.close()
        client.setblocking(False)
        origin = None
        if served is None:
            assert port is not None
            served = self.carried(port)
            origin = socket.create_connection((LOOP, port))
        task = asyncio.ensure_future(self.layer.serve(theirs, served, origin))
        conn = Conn(client, theirs, origin, task)
        self.conns.append(conn)
        return conn

    async def close(self) -> None:
        for conn in self.conns:
            conn.task.cancel()
        await asyncio.gather(*(c.task for c in self.conns), return_exceptions=True)
        for conn in self.conns:
            for sock in (conn.sock, conn.served, conn.origin):
                if sock is not None:
                    sock.close()
        self.layer.close()
        for sock in self.dialer.socks:
            sock.close()
        for server in self.servers:
            server.close()
        for runner in self.runners:
            await runner.cleanup()


@contextlib.asynccontextmanager
async def env(**kw):
    e = Env(**kw)
    try:
        yield e
    finally:
        await e.close()


async def audited(e: Env, n: int, timeout: float = 2.0) -> list[dict]:
    """The audit records, once there are ``n`` (each is written as its answer ends: the client
    may read the answer first)."""
    deadline = time.monotonic() + timeout
    while len(e.audit.records) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.01)
    assert len(e.audit.records) == n, e.audit.records
    return e.audit.records


def dead_port() -> int:
    s = socket.socket()
    s.bind((LOOP, 0))
    port = s.getsockname()[1]
    s.close()
    return port


# -- keep-alive, bodies --------------------------------------------------------------------------


def test_keep_alive_on_the_flows_own_connection():
    async def test():
        async with env() as e:
            port = await e.aiohttp()
            before = requests("2xx")
            conn = await e.open(port)
            peers = []
            for i in range(3):
                resp, body = await conn.request("GET", f"/echo?i={i}")
                assert resp.status_code == 200
                seen = json.loads(body)
                assert seen["path"] == f"/echo?i={i}"
                peers.append(seen["peer"])
            assert conn.origin is not None
            assert len(set(peers)) == 1 and peers[0] == conn.origin.getsockname()[1]
            assert e.dialer.calls == []  # the flow's own connection served them all
            conn.sock.shutdown(socket.SHUT_WR)
            assert await conn.done() is False
            assert await conn.rest() == b""
            assert requests("2xx") - before == 3
            records = e.audit.records
            assert len(records) == 3
            assert [r["path"] for r in records] == ["/echo"] * 3
            assert all(r["status"] == 200 and r["decision"] == "allow" and r["method"] == "GET"
                       and r["tenant"] == TENANT and r["host"] == "origin.example"
                       and r["client"] == CLIENT[0] and r["client_port"] == CLIENT[1]
                       and r["onramp"] is None and r["upstream"] == f"{LOOP}:{port}"
                       and r["flow"] == {"src": CLIENT[0], "sport": CLIENT[1], "dst": LOOP,
                                         "dport": port}
                       and r["response_bytes"] > 0 and r["duration"] >= 0
                       for r in records)
            assert conn.origin.fileno() != -1  # the flow's: its driver closes it
    run(test)


def test_pipelined_requests_are_answered_in_order():
    async def test():
        async with env() as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            raw = b"".join(b"GET /echo?n=%d HTTP/1.1\r\nHost: o\r\n\r\n" % i for i in range(3))
            await conn.write(raw)
            for i in range(3):  # (written already: the client's h11 only follows along)
                conn.h11.send(h11.Request(method="GET", target="/", headers=[("host", "o")]))
                conn.h11.send(h11.EndOfMessage())
                resp, body = await conn.response()
                assert resp.status_code == 200 and json.loads(body)["path"] == f"/echo?n={i}"
    run(test)


def test_bodies_streamed_both_ways():
    async def test():
        async with env() as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            blob = os.urandom(3 * (1 << 20) + 123)
            # Content-Length
            resp, body = await conn.request("POST", "/sha256", body=blob,
                                            chunks=[blob[i:i + 100_000]
                                                    for i in range(0, len(blob), 100_000)])
            assert resp.status_code == 200
            got = json.loads(body)
            assert got == {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob),
                           "chunked": None}
            # chunked (no Content-Length: h11 chunks it; the upstream gets it chunked)
            await conn.send(h11.Request(method="PUT", target="/sha256",
                                        headers=[("host", "o"),
                                                 ("transfer-encoding", "chunked")]))
            for i in range(0, len(blob), 70_000):
                await conn.send(h11.Data(data=blob[i:i + 70_000]))
            await conn.send(h11.EndOfMessage())
            resp, body = await conn.response()
            got = json.loads(body)
            assert resp.status_code == 200 and got["size"] == len(blob)
            assert got["sha256"] == hashlib.sha256(blob).hexdigest()
            assert got["chunked"] == "chunked"
            # downloads, sized and chunked
            n = 5 * (1 << 20) + 7
            resp, body = await conn.request("GET", f"/bytes/{n}")
            assert resp.status_code == 200 and header(resp, "content-length") == str(n).encode()
            assert len(body) == n and body[:256] == bytes(range(256))
            resp, body = await conn.request("GET", f"/bytes/{n}?chunked=1")
            assert header(resp, "transfer-encoding") == b"chunked" and len(body) == n
            records = await audited(e, 4)
            assert [r["request_bytes"] for r in records] == [len(blob), len(blob), 0, 0]
            assert [r["response_bytes"] for r in records][2:] == [n, n]
            assert e.dialer.calls == []
    run(test)


def test_headers_sent_on_and_back():
    async def test():
        async with env() as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            resp, body = await conn.request("GET", "/echo", headers=[
                ("connection", "keep-alive, x-hop"), ("x-hop", "1"), ("keep-alive", "5"),
                ("proxy-authorization", "Bearer secret"), ("te", "trailers"),
                ("x-end", "kept")])
            names = [n for n, _ in json.loads(body)["headers"]]
            assert "x-end" in names and "host" in names
            for hop in ("x-hop", "keep-alive", "proxy-authorization", "te"):
                assert hop not in names
            assert resp.status_code == 200
    run(test)


def test_http10_client_gets_a_host_header_sent_and_the_connection_closed():
    async def test():
        async with env() as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            await conn.write(b"GET /echo HTTP/1.0\r\n\r\n")
            assert await conn.done() is False
            resp, body, closes = answer(await conn.rest())
            assert resp.status_code == 200 and closes
            headers = dict(json.loads(body)["headers"])
            assert headers["host"] == f"{LOOP}:{port}"  # the origin's, none having come
    run(test)


def test_client_connection_close_ends_after_the_answer():
    async def test():
        async with env() as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            resp, body = await conn.request("GET", "/hello", headers=[("connection", "close")])
            assert resp.status_code == 200 and body == b"hello from a\n"
            assert header(resp, "connection") == b"close"
            assert await conn.done() is False
            assert await conn.rest() == b""
    run(test)


# -- rules and hooks -----------------------------------------------------------------------------


def test_rule_deny_names_the_rule_and_keeps_the_connection():
    async def test():
        app = RulesApplication([Rule("deny", name="no-admin", path="/admin")])
        async with env(app=app) as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            before = requests("4xx")
            resp, body = await conn.request("GET", "/admin?x=1")
            assert resp.status_code == 403
            assert b"denied by rule no-admin" in body
            assert header(resp, "connection") is None  # kept: it had no body
            resp, body = await conn.request("GET", "/echo")
            assert resp.status_code == 200
            assert requests("4xx") - before == 1
            deny = (await audited(e, 2))[0]
            assert (deny["status"], deny["decision"], deny["reason"], deny["path"]) == \
                (403, "deny", "denied by rule no-admin", "/admin")
    run(test)


def test_rule_deny_of_a_request_with_a_body_closes():
    async def test():
        app = RulesApplication([Rule("deny", name="no-post", method="POST")])
        async with env(app=app) as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            await conn.send(h11.Request(method="POST", target="/echo",
                                        headers=[("host", "o"), ("content-length", "1000")]))
            await conn.send(h11.Data(data=b"x" * 10))
            assert await conn.done() is False
            resp, body, closes = answer(await conn.rest())
            assert resp.status_code == 403 and closes
            assert b"denied by rule no-post" in body
    run(test)


def test_on_request_sees_the_request_and_rewrites_it_to_another_upstream():
    async def test():
        seen: list[HttpRequest] = []

        async with env() as e:
            port_a, port_b = await e.aiohttp("a"), await e.aiohttp("b")

            def on_request(request: HttpRequest) -> HttpDecision:
                seen.append(request)
                if request.path == "/to-b":
                    return HttpDecision.allow("to b", upstream=(LOOP, port_b),
                                              target="/echo?rewritten=1",
                                              set_headers={"X-Added": "yes", "Host": "b.example"},
                                              remove_headers=["X-Secret"])
                return HttpDecision.allow()

            e.app = Hooks(on_request=on_request)
            conn = await e.open(port_a)
            resp, body = await conn.request("GET", "/to-b?q=1",
                                            headers=[("x-secret", "s"), ("x-other", "o"),
                                                     ("connection", "keep-alive")])
            assert resp.status_code == 200
            got = json.loads(body)
            headers = dict(got["headers"])
            assert got["name"] == "b" and got["path"] == "/echo?rewritten=1"
            assert headers["x-added"] == "yes" and headers["host"] == "b.example"
            assert "x-secret" not in headers and headers["x-other"] == "o"
            assert e.dialer.calls == [(TENANT, CLIENT, (LOOP, port_b))]
            # the next one goes to the origin, on the flow's own connection
            resp, body = await conn.request("GET", "/echo")
            assert json.loads(body)["name"] == "a" and len(e.dialer.calls) == 1
            assert len(seen) == 2
            first = seen[0]
            assert (first.method, first.target, first.host, first.port, first.path) == \
                ("GET", "/to-b?q=1", "origin.example", port_a, "/to-b")
            assert first.upstream == (LOOP, port_a) and first.onramp is None
            assert first.flow.tenant == TENANT and first.flow.src == CLIENT[0]
            assert first.header("X-Secret") == "s" and first.header("connection") == "keep-alive"
            records = await audited(e, 2)
            assert records[0]["upstream"] == f"{LOOP}:{port_b}"
            assert records[0]["reason"] == "to b"
            assert records[0]["flow"]["dport"] == port_b
            assert records[1]["upstream"] == f"{LOOP}:{port_a}"
    run(test)


def test_async_hooks():
    async def test():
        async def on_request(request: HttpRequest) -> HttpDecision | None:
            await asyncio.sleep(0.01)
            if request.path == "/admin":
                return HttpDecision.deny("async says no", status=451)
            return None  # None: allowed

        async def on_response(response: HttpResponse) -> HttpDecision:
            await asyncio.sleep(0.01)
            return HttpDecision.allow(set_headers={"X-Seen-Status": str(response.status)})

        async with env(app=Hooks(on_request, on_response)) as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            resp, body = await conn.request("GET", "/admin")
            assert resp.status_code == 451 and b"async says no" in body
            resp, body = await conn.request("GET", "/hello")
            assert resp.status_code == 200 and body == b"hello from a\n"
            assert header(resp, "x-seen-status") == b"200"
    run(test)


def test_on_response_changes_headers():
    async def test():
        seen: list[HttpResponse] = []

        def on_response(response: HttpResponse) -> HttpDecision | None:
            seen.append(response)
            return HttpDecision.allow(set_headers=(("X-Checked", "1"),),
                                      remove_headers=("Server", "X-Up"))

        async with env(app=Hooks(on_response=on_response)) as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            resp, body = await conn.request("GET", "/hello")
            assert resp.status_code == 200 and body == b"hello from a\n"
            assert header(resp, "x-checked") == b"1"
            assert header(resp, "server") is None and header(resp, "x-up") is None
            assert len(seen) == 1
            assert seen[0].status == 200 and seen[0].header("x-up") == "a"
            assert seen[0].request.path == "/hello"
            resp, _ = await conn.request("GET", "/hello")  # still kept
            assert resp.status_code == 200
    run(test)


@pytest.mark.parametrize("decision, status", [
    (HttpDecision.deny("not for you", status=451), 451),
    (HttpDecision.deny("bad status"), 403),
    (HttpDecision("deny", 200, "a deny with a 200"), 502),
])
def test_on_response_denies(decision, status):
    async def test():
        async with env(app=Hooks(on_response=lambda response: decision)) as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            await conn.send(h11.Request(method="GET", target="/hello", headers=[("host", "o")]),
                            h11.EndOfMessage())
            assert await conn.done() is False
            resp, body, closes = answer(await conn.rest())
            assert resp.status_code == status and closes
            assert decision.reason.encode() in body
            assert b"hello from" not in body
            records = e.audit.records
            assert len(records) == 1
            assert (records[0]["status"], records[0]["decision"], records[0]["reason"]) == \
                (status, "deny", decision.reason)
    run(test)


@pytest.mark.parametrize("hook", ["raises", "wrong type", "async raises"])
def test_on_request_failing_is_500_and_close(hook):
    async def test():
        async def async_raises(request):
            raise RuntimeError("boom")

        def raises(request):
            raise RuntimeError("boom")

        fn = {"raises": raises, "wrong type": lambda request: "allow",
              "async raises": async_raises}[hook]
        async with env(app=Hooks(on_request=fn)) as e:
            port = await e.aiohttp()
            before = rejected("hook_error")
            conn = await e.open(port)
            await conn.send(h11.Request(method="GET", target="/echo", headers=[("host", "o")]),
                            h11.EndOfMessage())
            assert await conn.done() is False
            resp, body, closes = answer(await conn.rest())
            assert resp.status_code == 500 and closes
            assert b"hook failed" in body
            assert rejected("hook_error") - before == 1
            assert len(e.log.named("http_hook_failed")) == 1
            assert e.dialer.calls == []
    run(test)


def test_on_response_failing_is_502_and_close():
    async def test():
        def on_response(response):
            raise ValueError("nope")

        async with env(app=Hooks(on_response=on_response)) as e:
            port = await e.aiohttp()
            before = rejected("hook_error")
            conn = await e.open(port)
            await conn.send(h11.Request(method="GET", target="/hello", headers=[("host", "o")]),
                            h11.EndOfMessage())
            assert await conn.done() is False
            resp, body, closes = answer(await conn.rest())
            assert resp.status_code == 502 and closes and b"hello from" not in body
            assert rejected("hook_error") - before == 1
            assert [r["status"] for r in e.audit.records] == [502]
    run(test)


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n",  # TLS
])
def test_malformed_request_is_400_and_close(raw):
    async def test():
        async with env() as e:
            port = await e.aiohttp()
            before = rejected("malformed")
            conn = await e.open(port)
            await conn.write(raw)
            assert await conn.done() is False
            resp, body, closes = answer(await conn.rest())
            assert resp.status_code == 400 and closes and body.startswith(b"bad request")
            assert rejected("malformed") - before == 1
            assert e.audit.records == []
    run(test)


@pytest.mark.parametrize("target, status", [
    ("http://user@h/", 400),
    ("https://h/", 400),
    ("nonsense", 400),
])
def test_bad_target_is_400(target, status):
    async def test():
        async with env() as e:
            port = await e.aiohttp()
            before = rejected("bad_target")
            conn = await e.open(port)
            await conn.write(f"GET {target} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            assert await conn.done() is False
            resp, body, closes = answer(await conn.rest())
            assert resp.status_code == status and closes
            assert rejected("bad_target") - before == 1
    run(test)


def test_connect_on_a_carried_stream_is_405():
    async def test():
        async with env() as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            await conn.write(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
            assert await conn.done() is False
            resp, _, closes = answer(await conn.rest(), method="CONNECT")
            assert resp.status_code == 405 and closes
    run(test)


def test_head_over_the_limit_is_431():
    async def test():
        async with env(settings=Http(max_header_bytes=1024)) as e:
            port = await e.aiohttp()
            before = rejected("header_too_large")
            conn = await e.open(port)
            await conn.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 2000)
            assert await conn.done() is False
            resp, body, closes = answer(await conn.rest())
            assert resp.status_code == 431 and closes
            assert rejected("header_too_large") - before == 1
    run(test)


def test_head_over_the_limit_in_one_read_is_431():
    async def test():
        async with env(settings=Http(max_header_bytes=1024)) as e:
            port = await e.aiohttp()
            before = rejected("header_too_large")
            conn = await e.open(port)
            await conn.write(b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 5000
                             + b"\r\n\r\n")
            assert await conn.done() is False
            resp, _, closes = answer(await conn.rest())
            assert resp.status_code == 431 and closes
            assert rejected("header_too_large") - before == 1
    run(test)


def test_slow_head_is_408():
    async def test():
        async with env(settings=Http(header_timeout=0.3)) as e:
            port = await e.aiohttp()
            before = rejected("header_timeout")
            conn = await e.open(port)
            await conn.write(b"GET /echo HTTP/1.1\r\nHost: a\r\n")
            started = time.monotonic()
            assert await conn.done() is False
            assert 0.2 < time.monotonic() - started < 2
            resp, body, closes = answer(await conn.rest())
            assert resp.status_code == 408 and closes
            assert rejected("header_timeout") - before == 1
    run(test)


def test_slow_second_head_is_408():
    async def test():
        async with env(settings=Http(header_timeout=0.3)) as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            resp, _ = await conn.request("GET", "/hello")
            assert resp.status_code == 200
            await conn.write(b"GET /echo HTTP/1.1\r\n")
            assert await conn.done() is False
            resp, _, closes = answer(await conn.rest())
            assert resp.status_code == 408 and closes
    run(test)


def test_silent_client_is_closed_quietly():
    async def test():
        async with env(settings=Http(header_timeout=0.3)) as e:
            port = await e.aiohttp()
            before = rejected("header_timeout")
            conn = await e.open(port)
            assert await conn.done() is False
            assert await conn.rest() == b""
            assert rejected("header_timeout") == before
    run(test)


def test_idle_keep_alive_connection_is_closed_quietly():
    async def test():
        async with env(settings=Http(idle_timeout=0.3, header_timeout=5)) as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            resp, _ = await conn.request("GET", "/hello")
            assert resp.status_code == 200
            started = time.monotonic()
            assert await conn.done() is False
            assert 0.2 < time.monotonic() - started < 2
            assert await conn.rest() == b""
            assert len(e.audit.records) == 1
    run(test)


# -- upstream failures ---------------------------------------------------------------------------


def redirect_to(upstream: tuple[str, int]) -> Hooks:
    return Hooks(on_request=lambda request: HttpDecision.allow(upstream=upstream))


def test_upstream_refusing_the_connection_is_502():
    async def test():
        dead = (LOOP, dead_port())
        async with env(app=redirect_to(dead)) as e:
            port = await e.aiohttp()
            before = requests("5xx")
            conn = await e.open(port)
            resp, body = await conn.request("GET", "/echo")
            assert resp.status_code == 502 and b"cannot reach" in body
            assert header(resp, "connection") is None  # a GET: kept
            assert e.dialer.calls == [(TENANT, CLIENT, dead)]
            assert (await audited(e, 1))[0]["status"] == 502
            assert requests("5xx") - before == 1
    run(test)


@pytest.mark.parametrize("refusal", [Refused(504, "the upstream did not answer"),
                                     Refused(403, "denied by rule flows"),
                                     TimeoutError()])
def test_dial_refused(refusal):
    async def test():
        other = (LOOP, dead_port())
        async with env(app=redirect_to(other)) as e:
            e.dialer.refuse[other] = refusal
            port = await e.aiohttp()
            conn = await e.open(port)
            resp, body = await conn.request("GET", "/echo")
            expected = refusal.status if isinstance(refusal, Refused) else 504
            assert resp.status_code == expected
            if isinstance(refusal, Refused):
                assert refusal.reason.encode() in body
            assert (await audited(e, 1))[0]["status"] == expected
            resp, _ = await conn.request("GET", "/hello", headers=[])
            assert resp.status_code == expected  # still redirected, still refused: kept
    run(test)


def test_upstream_closing_mid_response_resets_the_client():
    async def test():
        async def cut(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
            await writer.drain()
            writer.close()

        async with env() as e:
            port = await e.scripted(cut)
            conn = await e.open(port)
            await conn.send(h11.Request(method="GET", target="/", headers=[("host", "o")]),
                            h11.EndOfMessage())
            resp = await conn.event()
            assert isinstance(resp, h11.Response) and resp.status_code == 200
            assert await conn.done() is False
            got = 0
            with pytest.raises(ConnectionResetError):
                while True:
                    event = await conn.event()
                    assert isinstance(event, h11.Data), event  # never a clean end
                    got += len(event.data)
            assert got <= 1000
            assert len(e.audit.records) == 1
            assert e.audit.records[0]["status"] == 200
            assert e.audit.records[0]["response_bytes"] <= 1000
    run(test)


def test_upstream_closing_before_answering_is_502():
    async def test():
        async def mute(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.close()

        async with env() as e:
            port = await e.scripted(mute)
            conn = await e.open(port)
            await conn.send(h11.Request(method="GET", target="/", headers=[("host", "o")]),
                            h11.EndOfMessage())
            assert await conn.done() is False
            resp, body, closes = answer(await conn.rest())
            assert resp.status_code == 502 and closes and b"upstream failed" in body
            assert [r["status"] for r in e.audit.records] == [502]
    run(test)


def test_upstream_answering_garbage_is_502():
    async def test():
        async def garbage(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
            await writer.drain()

        async with env() as e:
            port = await e.scripted(garbage)
            conn = await e.open(port)
            await conn.send(h11.Request(method="GET", target="/", headers=[("host", "o")]),
                            h11.EndOfMessage())
            assert await conn.done() is False
            resp, _, closes = answer(await conn.rest())
            assert resp.status_code == 502 and closes
    run(test)


def test_origin_closed_between_requests_is_redialed():
    async def test():
        async def once(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
            writer.close()

        async with env() as e:
            port = await e.scripted(once)
            conn = await e.open(port)
            for _ in range(3):
                resp, body = await conn.request("GET", "/")
                assert resp.status_code == 200 and body == b"ok"
            # The client's connection is kept (Connection: close is the upstream's, hop by hop)
            assert header(resp, "connection") is None
            assert e.dialer.calls == [(TENANT, CLIENT, (LOOP, port))] * 2
    run(test)


# -- HEAD, 304, 100-continue, switching protocols -----------------------------------------------


def test_head_and_304_have_no_body_and_keep_the_connection():
    async def test():
        async with env() as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            await conn.send(h11.Request(method="HEAD", target="/hello",
                                        headers=[("host", "o")]), h11.EndOfMessage())
            resp, body = await conn.response()
            assert resp.status_code == 200 and body == b""
            assert header(resp, "content-length") == b"13"
            resp, body = await conn.request("GET", "/etag")
            assert resp.status_code == 200 and body == b"version one"
            resp, body = await conn.request("GET", "/etag", headers=[("if-none-match", '"v1"')])
            assert resp.status_code == 304 and body == b""
            resp, body = await conn.request("GET", "/hello")
            assert resp.status_code == 200 and body == b"hello from a\n"
            records = await audited(e, 4)
            assert [r["status"] for r in records] == [200, 200, 304, 200]
            assert records[0]["method"] == "HEAD"
    run(test)


def test_100_continue():
    async def test():
        heads: list[bytes] = []

        async def continuing(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            heads.append(head)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            body = await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length + body[::-1])
            await writer.drain()

        async with env() as e:
            port = await e.scripted(continuing)
            conn = await e.open(port)
            await conn.send(h11.Request(method="POST", target="/up",
                                        headers=[("host", "o"), ("content-length", "5"),
                                                 ("expect", "100-continue")]))
            informational = await asyncio.wait_for(conn.event(), 2)
            assert isinstance(informational, h11.InformationalResponse)
            assert informational.status_code == 100
            await conn.send(h11.Data(data=b"hello"), h11.EndOfMessage())
            resp, body = await conn.response()
            assert resp.status_code == 200 and body == b"olleh"
            assert b"expect: 100-continue" in heads[0].lower()
            record = (await audited(e, 1))[0]
            assert record["status"] == 200 and record["request_bytes"] == 5
    run(test)


def test_upgrade_switches_to_raw_bytes_both_ways():
    async def test():
        heads: list[bytes] = []

        async def websocket(reader, writer):
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\n\r\nfirst-from-upstream;")
            await writer.drain()
            while data := await reader.read(1 << 16):
                writer.write(data.upper())
                await writer.drain()
            writer.close()

        async with env() as e:
            port = await e.scripted(websocket)
            before = requests("1xx")
            conn = await e.open(port)
            head = conn.h11.send(h11.Request(method="GET", target="/ws", headers=[
                ("host", "o"), ("connection", "Upgrade"), ("upgrade", "websocket"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("sec-websocket-version", "13")]))
            await conn.write(head + conn.h11.send(h11.EndOfMessage()) + b"early;")
            switched = await conn.event()
            assert isinstance(switched, h11.InformationalResponse)
            assert switched.status_code == 101
            assert conn.h11.our_state is h11.SWITCHED_PROTOCOL
            got = bytearray(conn.h11.trailing_data[0])
            while len(got) < len(b"first-from-upstream;EARLY;"):
                got += await conn.loop.sock_recv(conn.sock, 1 << 16)
            assert bytes(got) == b"first-from-upstream;EARLY;"
            await conn.write(b"ping")
            assert await asyncio.wait_for(conn.loop.sock_recv(conn.sock, 100), 2) == b"PING"
            conn.sock.shutdown(socket.SHUT_WR)
            assert await conn.done() is False
            assert await conn.rest() == b""
            lower = heads[0].lower()
            assert b"upgrade: websocket" in lower and b"connection: upgrade" in lower
            assert requests("1xx") - before == 1
            assert [r["status"] for r in e.audit.records] == [101]
    run(test)


def test_h2c_upgrade_is_not_passed_on():
    async def test():
        async with env() as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            resp, body = await conn.request("GET", "/echo", headers=[
                ("connection", "Upgrade, HTTP2-Settings"), ("upgrade", "h2c"),
                ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA")])
            assert resp.status_code == 200
            names = [n for n, _ in json.loads(body)["headers"]]
            assert "upgrade" not in names and "http2-settings" not in names
            resp, _ = await conn.request("GET", "/hello")  # kept: never switched
            assert resp.status_code == 200
    run(test)


# -- HTTP on-ramps (forward proxy) ---------------------------------------------------------------


def test_onramp_absolute_form_and_pool_reuse_across_sessions():
    async def test():
        async with env() as e:
            port = await e.aiohttp()
            peers = []
            for _ in range(2):
                conn = await e.open(served=e.onramp())
                resp, body = await conn.request("GET", f"http://{LOOP}:{port}/echo?x=1",
                                                headers=[])
                got = json.loads(body)
                assert resp.status_code == 200 and got["path"] == "/echo?x=1"
                peers.append(got["peer"])
                conn.sock.shutdown(socket.SHUT_WR)
                assert await conn.done() is False
            assert e.dialer.calls == [(TENANT, CLIENT, (LOOP, port))]
            assert peers[0] == peers[1]
            assert e.layer.upstreams.reused == 1 and e.layer.upstreams.opened == 1
            assert len(e.layer.upstreams) == 1
            assert [r["onramp"] for r in e.audit.records] == ["web", "web"]
            assert e.audit.records[0]["host"] == LOOP
    run(test)


def test_onramp_resolves_names():
    async def test():
        seen: list[HttpRequest] = []
        names = {"app.test": LOOP}

        async def resolve(host: str, port: int) -> str:
            if host not in names:
                raise OSError(113, "no such host")
            return names[host]

        def on_request(request: HttpRequest) -> None:
            seen.append(request)

        async with env(app=Hooks(on_request=on_request)) as e:
            e.layer.resolve = resolve
            port = await e.aiohttp()
            conn = await e.open(served=e.onramp())
            resp, body = await conn.request("GET", f"http://app.test:{port}/echo",
                                            headers=[])
            assert resp.status_code == 200 and json.loads(body)["path"] == "/echo"
            assert e.dialer.calls == [(TENANT, CLIENT, (LOOP, port))]
            resp, body = await conn.request("GET", "http://nowhere.test/echo", headers=[])
            assert resp.status_code == 502 and b"cannot resolve nowhere.test" in body
            assert header(resp, "connection") is None  # kept
            assert len(seen) == 2
            assert (seen[0].host, seen[0].port, seen[0].upstream) == ("app.test", port, None)
            assert seen[0].flow.dst == "" and seen[0].flow.dport == port
            assert seen[0].onramp == "web" and seen[0].target == f"http://app.test:{port}/echo"
            assert [r["status"] for r in await audited(e, 2)] == [200, 502]
    run(test)


def test_onramp_needs_an_absolute_target():
    async def test():
        async with env() as e:
            conn = await e.open(served=e.onramp())
            await conn.write(b"GET /relative HTTP/1.1\r\nHost: a\r\n\r\n")
            assert await conn.done() is False
            resp, _, closes = answer(await conn.rest())
            assert resp.status_code == 400 and closes
    run(test)


def test_onramp_tokens():
    async def test():
        tokens = {"Bearer good": "beta", "Bearer wrong": ""}

        def authenticate(request: HttpRequest) -> str | None:
            value = request.header("proxy-authorization")
            return None if value is None else tokens.get(value, "")

        async with env() as e:
            port = await e.aiohttp()
            before = rejected("proxy_auth")
            conn = await e.open(served=e.onramp(tenant=None, authenticate=authenticate))
            url = f"http://{LOOP}:{port}/echo"
            resp, body = await conn.request("GET", url)
            assert resp.status_code == 407 and header(resp, "proxy-authenticate")
            resp, _ = await conn.request("GET", url,
                                         headers=[("proxy-authorization", "Bearer wrong")])
            assert resp.status_code == 407
            resp, body = await conn.request("GET", url,
                                            headers=[("proxy-authorization", "Bearer good")])
            assert resp.status_code == 200
            names = [n for n, _ in json.loads(body)["headers"]]
            assert "proxy-authorization" not in names  # never sent on
            assert rejected("proxy_auth") - before == 2
            assert e.dialer.calls == [("beta", CLIENT, (LOOP, port))]
            records = await audited(e, 3)
            assert [(r["tenant"], r["status"], r["decision"]) for r in records] == \
                [(None, 407, "deny"), (None, 407, "deny"), ("beta", 200, "allow")]
    run(test)


def test_onramp_connect_is_handed_on():
    async def test():
        handed: list[tuple] = []

        async def hand_connect(served, tenant, sock, upstream, first):
            handed.append((tenant, sock, upstream, first))
            sock.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
            return 200, {"src": CLIENT[0], "sport": 1, "dst": upstream[0], "dport": upstream[1]}

        async with env(hand_connect=hand_connect) as e:
            conn = await e.open(served=e.onramp())
            await conn.write(b"CONNECT 10.9.8.7:443 HTTP/1.1\r\nHost: 10.9.8.7:443\r\n\r\n"
                             b"\x16\x03\x01")
            assert await conn.done() is True
            assert len(handed) == 1
            assert handed[0][0] == TENANT and handed[0][1] is conn.served
            assert handed[0][2:] == (("10.9.8.7", 443), b"\x16\x03\x01")
            assert e.audit.records[0]["status"] == 200
            assert e.audit.records[0]["method"] == "CONNECT"
            conn.served.close()
    run(test)


def test_onramp_connect_without_a_data_path_is_501():
    async def test():
        async with env() as e:
            conn = await e.open(served=e.onramp())
            await conn.write(b"CONNECT 10.9.8.7:443 HTTP/1.1\r\nHost: 10.9.8.7:443\r\n\r\n")
            assert await conn.done() is False
            resp, _, closes = answer(await conn.rest(), method="CONNECT")
            assert resp.status_code == 501 and closes
    run(test)


# -- the pool ------------------------------------------------------------------------------------


def finished(sock: socket.socket) -> HttpConn:
    """A client connection whose exchange ended cleanly (reusable)."""
    conn = HttpConn(sock, h11.CLIENT)
    conn.h11.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.h11.send(h11.EndOfMessage())
    conn.h11.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(conn.h11.next_event(), h11.Response)
    assert isinstance(conn.h11.next_event(), h11.EndOfMessage)
    assert conn.reusable
    return conn


class Pairs:
    """Socket pairs: ours for the pool, theirs kept to play the upstream."""

    def __init__(self) -> None:
        self.theirs: list[socket.socket] = []
        self.ours: list[socket.socket] = []
        self.dialed = 0

    def pair(self) -> socket.socket:
        a, b = socket.socketpair()
        self.ours.append(a)
        self.theirs.append(b)
        return a

    async def dial(self, tenant, client, upstream) -> Dialed:
        self.dialed += 1
        return Dialed(self.pair(), {"dst": upstream[0]})

    def close(self) -> None:
        for s in self.ours + self.theirs:
            s.close()


def pool(pairs: Pairs, **kw) -> Upstreams:
    conf = {"per_upstream": 8, "total": 256, "idle_timeout": 30.0, "max_head": 65536, **kw}
    return Upstreams(pairs.dial, **conf)


KEY = UpstreamKey(TENANT, "10.0.0.1", 80)


def test_pool_keeps_and_reuses():
    async def test():
        pairs = Pairs()
        ups = pool(pairs)
        try:
            conn, flow, reused = await ups.get(KEY, CLIENT)
            assert not reused and pairs.dialed == 1 and flow == {"dst": "10.0.0.1"}
            done = finished(conn.sock)
            ups.put(KEY, done, flow)
            assert len(ups) == 1
            again, flow2, reused = await ups.get(KEY, CLIENT)
            assert again is done and reused and flow2 == flow and len(ups) == 0
            assert again.h11.our_state is h11.IDLE and again.h11.their_state is h11.IDLE
            assert (ups.reused, ups.opened, pairs.dialed) == (1, 1, 1)
            # another tenant, another port: other keys
            ups.put(KEY, again, flow)  # not done with an exchange: closed, not kept
            assert len(ups) == 0 and again.sock.fileno() == -1
            ups.put(KEY, finished(pairs.pair()), flow)
            _, _, reused = await ups.get(KEY._replace(tenant="other"), CLIENT)
            assert not reused
            _, _, reused = await ups.get(KEY._replace(port=8080), CLIENT)
            assert not reused and len(ups) == 1 and pairs.dialed == 3
        finally:
            ups.close()
            pairs.close()
    run(test)


def test_pool_closes_what_cannot_be_reused():
    async def test():
        pairs = Pairs()
        ups = pool(pairs)
        try:
            fresh = HttpConn(pairs.pair(), h11.CLIENT)  # mid-exchange: never kept
            ups.put(KEY, fresh, {})
            assert len(ups) == 0 and fresh.sock.fileno() == -1
            for limits in ({"per_upstream": 0}, {"total": 0}):
                none = pool(pairs, **limits)
                conn = finished(pairs.pair())
                none.put(KEY, conn, {})
                assert len(none) == 0 and conn.sock.fileno() == -1
        finally:
            ups.close()
            pairs.close()
    run(test)


def test_pool_never_hands_out_a_connection_the_upstream_closed_or_wrote_to():
    async def test():
        pairs = Pairs()
        ups = pool(pairs)
        try:
            closed, chatty = finished(pairs.pair()), finished(pairs.pair())
            ups.put(KEY, closed, {})
            ups.put(KEY, chatty, {})
            pairs.theirs[0].close()
            pairs.theirs[1].send(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
            conn, _, reused = await ups.get(KEY, CLIENT)
            assert not reused and conn is not closed and conn is not chatty
            assert closed.sock.fileno() == -1 and chatty.sock.fileno() == -1
            assert pairs.dialed == 1 and len(ups) == 0
        finally:
            ups.close()
            pairs.close()
    run(test)


def test_pool_per_upstream_and_total_limits():
    async def test():
        pairs = Pairs()
        ups = pool(pairs, per_upstream=2, total=3)
        try:
            a = [finished(pairs.pair()) for _ in range(3)]
            for conn in a:
                ups.put(KEY, conn, {})
            assert len(ups) == 2
            assert a[0].sock.fileno() == -1  # the oldest of the upstream's went
            assert a[1].sock.fileno() != -1 and a[2].sock.fileno() != -1
            other = KEY._replace(address="10.0.0.2")
            b = [finished(pairs.pair()) for _ in range(2)]
            for conn in b:
                ups.put(other, conn, {})
            assert len(ups) == 3
            assert a[1].sock.fileno() == -1  # the oldest of all went
            assert [c.sock.fileno() != -1 for c in (a[2], *b)] == [True, True, True]
            got, _, reused = await ups.get(KEY, CLIENT)
            assert got is a[2] and reused
            got, _, reused = await ups.get(other, CLIENT)
            assert got is b[1] and reused  # the newest first
            assert len(ups) == 1
        finally:
            ups.close()
            pairs.close()
    run(test)


def test_pool_idle_timeout_and_sweep():
    async def test():
        pairs = Pairs()
        ups = pool(pairs, idle_timeout=0.1)
        try:
            old = [finished(pairs.pair()) for _ in range(2)]
            ups.put(KEY, old[0], {})
            ups.put(KEY._replace(address="10.0.0.2"), old[1], {})
            await asyncio.sleep(0.15)
            young = finished(pairs.pair())
            ups.put(KEY._replace(address="10.0.0.3"), young, {})
            assert ups.sweep() == 2
            assert len(ups) == 1
            assert [c.sock.fileno() for c in old] == [-1, -1]
            assert young.sock.fileno() != -1
            assert ups.sweep() == 0
            await asyncio.sleep(0.15)
            conn, _, reused = await ups.get(KEY._replace(address="10.0.0.3"), CLIENT)
            assert not reused and conn is not young and young.sock.fileno() == -1
            ups.put(KEY, finished(pairs.pair()), {})
            ups.close()
            assert len(ups) == 0 and pairs.ours[-1].fileno() == -1
        finally:
            ups.close()
            pairs.close()
    run(test)


def test_layer_pool_is_bounded_per_upstream():
    async def test():
        async with env(settings=Http(pool_per_upstream=1)) as e:
            port_a, port_b = await e.aiohttp("a"), await e.aiohttp("b")
            e.app = redirect_to((LOOP, port_b))
            conns = [await e.open(port_a) for _ in range(3)]
            for conn in conns:  # three at once: three upstream connections
                await conn.send(h11.Request(method="GET", target="/hello",
                                            headers=[("host", "o")]), h11.EndOfMessage())
            for conn in conns:
                resp, body = await conn.response()
                assert body == b"hello from b\n"
            for conn in conns:
                conn.sock.shutdown(socket.SHUT_WR)
                await conn.done()
            assert len(e.dialer.calls) == 3
            assert len(e.layer.upstreams) == 1  # one kept, the others closed
            assert sum(s.fileno() != -1 for s in e.dialer.socks) == 1
    run(test)


# -- hostile input -------------------------------------------------------------------------------

PIECES = [b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\n", b"HEAD / HTTP/1.0\r\n",
          b"CONNECT a:443 HTTP/1.1\r\n", b"GET http://1.2.3.4:80/ HTTP/1.1\r\n",
          b"Host: a\r\n", b"Content-Length: 5\r\n", b"Content-Length: 99\r\n",
          b"Transfer-Encoding: chunked\r\n", b"Expect: 100-continue\r\n",
          b"Connection: Upgrade\r\nUpgrade: websocket\r\n", b"Connection: close\r\n",
          b"\r\n", b"5\r\nhello\r\n", b"0\r\n\r\n", b"hello", b"\x00\xff", b"\n", b" ",
          b"zz\r\n", b"5\r\nhelloXX"]
HOSTILE = st.one_of(st.binary(max_size=600),
                    st.lists(st.one_of(st.sampled_from(PIECES), st.binary(max_size=8)),
                             max_size=14).map(b"".join))


async def respond_to_anything(sock: socket.socket) -> None:
    """An origin that answers whatever it reads with a short 200."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        while await loop.sock_recv(sock, 1 << 16):
            await loop.sock_sendall(sock, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@given(HOSTILE)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_bytes_never_raise_and_the_connection_ends(data):
    async def test():
        layer = HttpLayer(Http(header_timeout=0.3, idle_timeout=0.3), get_app=RulesApplication,
                          audit=Audit(), log=Log(), dial=Dialer())
        client, theirs = socket.socketpair()
        origin, upstream = socket.socketpair()
        for s in (client, theirs, origin, upstream):
            s.setblocking(False)
        responder = asyncio.ensure_future(respond_to_anything(upstream))
        served = Served(TENANT, CLIENT, TunnelContext(TENANT), origin=("10.0.0.1", 80),
                        flow={})
        loop = asyncio.get_running_loop()
        try:
            task = asyncio.ensure_future(layer.serve(theirs, served, origin))
            with contextlib.suppress(OSError):
                await loop.sock_sendall(client, data)
                client.shutdown(socket.SHUT_WR)
            handed = await asyncio.wait_for(task, 3)
            assert handed is False
        finally:
            responder.cancel()
            await asyncio.gather(responder, return_exceptions=True)
            layer.close()
            for s in (client, theirs, origin, upstream):
                s.close()

    run(test)
