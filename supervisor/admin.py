"""The admin HTTP API (aiohttp), on loopback TCP and/or a unix socket.

Reads (GET, HEAD, OPTIONS) are open to whoever can reach the listener. Every other request over
TCP needs the configured bearer token, checked before routing (401 without it, 403 when no token
is configured); over the unix socket, whose file mode (0600) already limits who connects, they
need nothing more.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hmac
import ipaddress
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

import structlog
from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST

from ipferry.worker.app import valid_tenant
from ipferry.worker.views import MAX_PAGE, strict_dumps

from . import statuspage
from .config import Admin
from .listeners import bind_unix

if TYPE_CHECKING:
    from .arbiter import Supervisor

T = TypeVar("T")
MAX_CONNECTIONS = 256  # admin connections at once per listener kind; more are closed at once
IDLE_TIMEOUT = 15.0  # seconds a connection may stay without a complete request (slowloris)
ERROR_LOG_INTERVAL = 10.0  # seconds between two admin_request_failed log lines

SUPERVISOR: web.AppKey[Supervisor] = web.AppKey("supervisor")
SERVER: web.AppKey[AdminServer] = web.AppKey("server")


def _over_unix_socket(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is not None and sock.family == socket.AF_UNIX


READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@web.middleware
async def contain_errors(request: web.Request, handler):
    """A handler that raises gets a 500 and one structured log line (at most every 10 s), never
    aiohttp's raw traceback in the JSON log."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        server = request.app[SERVER]
        now = time.monotonic()
        if now - server.error_logged >= ERROR_LOG_INTERVAL:
            server.error_logged = now
            structlog.get_logger().error("admin_request_failed", method=request.method,
                                         path=request.path[:200], exc_info=True)
        return web.Response(status=500, text="internal error (logged)\n")


async def expect_continue(request: web.Request) -> None:
    """``Expect: 100-continue`` only; any other value is refused without echoing it (aiohttp's
    own handler fails with a 500 on a value that is not UTF-8)."""
    if request.version == HttpVersion11:
        expect = request.headers.get("Expect", "")
        if expect.lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        else:
            raise web.HTTPExpectationFailed(text="only Expect: 100-continue is understood\n")


class _Refused(asyncio.Protocol):
    """A connection over :data:`MAX_CONNECTIONS`: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()  # a stream socket's


class _CountedHandler(RequestHandler):
    """aiohttp's connection handler that tells its :class:`CappedServer` when it is gone."""

    __slots__ = ("_gate",)
    _gate: CappedServer

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self._gate.live -= 1


class CappedServer:
    """aiohttp's server (a protocol factory) with a cap on the live connections of one kind of
    listener (TCP, or the unix socket): held-open connections must not exhaust the supervisor's
    fds (it restarts children with fds of its own), and a flood over TCP must not lock the
    operator out of the unix socket. Counted when made, not when registered: the loop accepts
    a burst before any of them is registered."""

    def __init__(self, inner: web.Server, cap: int) -> None:
        self._inner = inner
        self.cap = cap
        self.live = 0
        self.refused = 0

    def __call__(self) -> asyncio.BaseProtocol:
        if self.live >= self.cap:
            self.refused += 1
            return _Refused()
        # As aiohttp's Server.__call__ makes its handlers (its loop and keyword arguments).
        handler = _CountedHandler(self._inner, loop=self._inner._loop, **self._inner._kwargs)
        handler._gate = self
        self.live += 1
        return handler


_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


def loopback_host(host: str | None) -> bool:
    """A Host header naming this machine by loopback (``localhost``, 127.0.0.0/8, ``[::1]``,
    any port), or none (HTTP/1.0)."""
    if not host:
        return True
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.lower()
    if name in _LOOPBACK_HOSTS:
        return True
    parts = name.split(".")
    return (len(parts) == 4 and parts[0] == "127"
            and all(p.isascii() and p.isdigit() and int(p) < 256 for p in parts))


@web.middleware
async def loopback_names_only(request: web.Request, handler):
    # DNS rebinding: a web page in a local browser may point its own name at 127.0.0.1 and read
    # this API as same-origin. Over TCP, only requests naming loopback in Host are served.
    if not _over_unix_socket(request) and not loopback_host(request.headers.get("Host")):
        raise web.HTTPMisdirectedRequest(text="the admin API answers requests for localhost, "
                                              "127.0.0.1 or [::1] only\n")
    return await handler(request)


@web.middleware
async def authorize_mutations(request: web.Request, handler):
    # Before anything else, routing included: a caller without the token learns nothing, not
    # even which paths or methods exist (every other method over TCP gets 401/403).
    if request.method in READ_METHODS or _over_unix_socket(request):
        return await handler(request)
    token = request.app[SERVER].settings.bearer_token()
    if token is None:
        raise web.HTTPForbidden(text="mutating calls need admin.token in the config, "
                                     "or the admin unix socket\n")
    given = request.headers.get("Authorization", "")
    if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())):
        raise web.HTTPUnauthorized(text="missing or wrong bearer token\n",
                                   headers={"WWW-Authenticate": 'Bearer realm="ipferry"'})
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    sup: Supervisor = request.app[SUPERVISOR]
    status = 200 if sup.is_ready() else 503
    return web.Response(status=status, text=sup.status_line() + "\n")


async def metrics(request: web.Request) -> web.Response:
    sup: Supervisor = request.app[SUPERVISOR]
    snapshots = await sup.pool.ask_workers("metrics", parts="families", timeout=1.0)
    body = sup.metrics.render({i: fams for i, fams in snapshots.items() if fams is not None})
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def summary(request: web.Request) -> web.Response:
    """The status page's counters (``statuspage.summarize``): asked of every ready worker as
    ``/metrics`` asks them, answered as small JSON."""
    sup: Supervisor = request.app[SUPERVISOR]
    live = sup.pool.live()
    snapshots = await sup.pool.ask_workers("metrics", parts="families", timeout=1.0, workers=live)
    return _json(statuspage.summarize(live, snapshots, time.monotonic(), time.time()))


async def workers(request: web.Request) -> web.Response:
    sup: Supervisor = request.app[SUPERVISOR]
    return _json([w.as_dict() for w in sup.workers])


async def mesh(request: web.Request) -> web.Response:
    """Each worker pings its peers over the mesh: which worker answered on each link."""
    sup: Supervisor = request.app[SUPERVISOR]
    return _json(await sup.pool.mesh_report())


def _json(data, status: int = 200) -> web.Response:
    # Strict JSON whatever an application put in a context: no NaN, no Infinity, no odd objects.
    return web.json_response(data, status=status, dumps=strict_dumps)


def encode_cursor(worker: int, epoch: str, seq: int) -> str:
    return base64.urlsafe_b64encode(f"{worker}.{epoch}.{seq}".encode()).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[int, str, int]:
    """(worker, its process's epoch, the flow's sequence number); 400 for anything else."""
    try:
        if len(text) > 96:
            raise ValueError
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
        worker, epoch, seq = raw.split(".")
        if not (worker.isdigit() and seq.isdigit() and re.fullmatch(r"[0-9a-f]{1,32}", epoch)):
            raise ValueError
        return int(worker), epoch, int(seq)
    except (ValueError, binascii.Error):
        raise web.HTTPBadRequest(text="after must be a cursor this API gave as next\n") from None


def page_query(query, decode: Callable[[str], T]) -> tuple[int, int, T | None]:
    """A paged endpoint's ``limit``, ``offset`` and ``after`` (decoded), or a 400 that says
    which is wrong."""
    try:
        limit = min(int(query.get("limit", 100)), MAX_PAGE)
        offset = int(query.get("offset", 0))
        if offset < 0 or limit < 1:
            raise ValueError
    except ValueError:
        raise web.HTTPBadRequest(text="offset must be an integer >= 0, limit one >= 1\n") from None
    if "after" not in query:
        return limit, offset, None
    if "offset" in query:
        raise web.HTTPBadRequest(text="page by offset or by after, not both\n")
    return limit, offset, decode(query["after"])


async def flows(request: web.Request) -> web.Response:
    """Live flows of every worker, by worker then start order; ``?tenant=`` filters,
    ``?offset=&limit=`` or ``?after=<cursor>&limit=`` pages.

    The supervisor first asks every ready worker how many flows match (after the cursor, for
    its worker), then asks only the workers the page falls in for slices of their ordered index.
    A worker's answer is at most ``limit`` bounded rows that fit one control message (a part
    cut short for room is asked for again from where it stopped), so no page can outgrow a
    message and a page costs the same at any depth."""
    sup: Supervisor = request.app[SUPERVISOR]
    query = request.query
    limit, offset, cursor = page_query(query, decode_cursor)
    tenant = query.get("tenant")
    live = sup.pool.live()

    def count(index: int) -> dict:
        body: dict[str, object] = {"op": "count", "tenant": tenant}
        if cursor is not None and index == cursor[0]:
            body.update(after=cursor[2], epoch=cursor[1])
        return body

    counts = await sup.pool.ask_workers("flows", count, workers=live)
    answered = [(i, child, counts[i]) for i, child in live
                if counts[i] is not None and counts[i].type == "flows"]
    missing = {w.index for w in sup.workers} - {i for i, _, _ in answered}
    total = sum(int(r["total"]) for _, _, r in answered)
    rows: list[dict] = []
    epochs: dict[int, str] = {}
    left = 0  # matching flows after the page (as counted)
    if cursor is None:
        skip = offset
        for i, child, r in answered:
            n = int(r["total"])
            if skip >= n or len(rows) >= limit:
                skip = max(0, skip - n)
                continue
            start, skip = skip, 0
            while len(rows) < limit:
                page = await sup.pool.ask_worker(child, "flows", {
                    "op": "slice", "tenant": tenant, "start": start, "limit": limit - len(rows)})
                if page is None or page.type != "flows":
                    missing.add(i)
                    break
                epochs[i] = page["epoch"]
                rows += page["flows"]
                start += len(page["flows"])
                if not page.get("cut") or not page["flows"]:
                    break
        left = total - offset - len(rows)
    else:
        first, epoch, seq = cursor
        stopped = False
        for i, child, r in answered:
            if i < first:
                continue
            after, epoch_i = (seq, epoch) if i == first else (0, None)
            remaining = int(r["after"]) if i == first else int(r["total"])
            left += remaining
            while not stopped and len(rows) < limit and remaining > 0:
                page = await sup.pool.ask_worker(child, "flows", {
                    "op": "after", "tenant": tenant, "after": after, "epoch": epoch_i,
                    "limit": limit - len(rows)})
                if page is None or page.type != "flows":
                    # Stop here: going on to the next worker would move the cursor past this
                    # one's flows. The next page starts from the last flow given.
                    missing.add(i)
                    stopped = True
                    break
                got = page["flows"]
                epochs[i] = epoch_i = page["epoch"]
                rows += got
                remaining -= len(got)
                if not got or not page.get("cut"):
                    break
                after = got[-1]["seq"]
        left -= len(rows)
        if stopped and not rows:
            left = max(left, 1)
    next_cursor = None
    if rows and left > 0:
        last = rows[-1]
        next_cursor = encode_cursor(last["worker"], epochs[last["worker"]], last["seq"])
    elif cursor is not None and left > 0:
        next_cursor = query["after"]  # nothing could be read: try again from the same place
    return _json({"total": total, "offset": None if cursor else offset,
                  "after": query.get("after"), "limit": limit, "flows": rows,
                  "next": next_cursor, "workers_missing": sorted(missing)})


async def tunnels(request: web.Request) -> web.Response:
    """Every ready worker's tunnels, collected in parts (each fits one control message)."""
    sup: Supervisor = request.app[SUPERVISOR]
    parts = await sup.pool.ask_workers("tunnels", parts="tunnels")
    return _json(fold_queues(parts))


def fold_queues(parts: dict[int, list | None]) -> list[dict]:
    """The workers' tunnel rows, each with its worker; a worker's queue of another worker's
    attached tunnel (``queue_of``: the holder's worker and tunnel id) is no row of its own:
    its packets count into the holder's row (left out when the holder did not answer)."""
    tunnels: list[dict] = []
    queues: list[dict] = []
    for worker, rows in parts.items():
        for row in rows or ():
            if not isinstance(row, dict):
                continue
            (queues if "queue_of" in row else tunnels).append({**row, "worker": worker})
    holders = {(t["worker"], t.get("id")): t for t in tunnels if "device" in t}
    for queue in queues:
        try:
            holder = holders.get(tuple(queue["queue_of"]))
        except TypeError:
            continue
        if holder is not None:
            for key in ("packets_in", "packets_out"):
                if isinstance(holder.get(key), int) and isinstance(queue.get(key), int):
                    holder[key] += queue[key]
    return tunnels


def encode_route_cursor(tenant: str, prefix: str) -> str:
    return base64.urlsafe_b64encode(f"{tenant} {prefix}".encode()).decode().rstrip("=")


def decode_route_cursor(text: str) -> tuple[str, str]:
    """(tenant, prefix) of the last route of a page; 400 for anything else."""
    try:
        if len(text) > 160:
            raise ValueError
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
        tenant, prefix = raw.split(" ")
        if not valid_tenant(tenant) or "%" in prefix:
            raise ValueError
        ipaddress.ip_network(prefix)
        return tenant, prefix
    except (ValueError, binascii.Error):
        raise web.HTTPBadRequest(text="after must be a cursor this API gave as next\n") from None


async def routes(request: web.Request) -> web.Response:
    """The route registry (tunnels' claims and sites), by tenant then address, and the tenants'
    networks; ``?tenant=`` filters, ``?offset=&limit=`` or ``?after=<cursor>&limit=`` pages
    the routes. The registry is the supervisor's: no worker is asked."""
    sup: Supervisor = request.app[SUPERVISOR]
    query = request.query
    limit, offset, cursor = page_query(query, decode_route_cursor)
    tenant = query.get("tenant")
    total, page = sup.routes.page(tenant, 0 if cursor else offset, limit + 1, after=cursor)
    more = len(page) > limit
    page = page[:limit]
    next_cursor = encode_route_cursor(page[-1].tenant, page[-1].prefix) if more else None
    networks = [{"tenant": n.tenant, "cidr": str(n.cidr)} for n in sup.config.networks
                if tenant is None or n.tenant == tenant]
    return _json({"total": total, "offset": None if cursor else offset,
                  "after": query.get("after"), "limit": limit,
                  "routes": [r.row() for r in page], "next": next_cursor, "networks": networks})


async def status(request: web.Request) -> web.Response:
    sup: Supervisor = request.app[SUPERVISOR]
    nsd = sup.nsd
    return _json({
        "ready": sup.is_ready(), "status": sup.status_line(), "node": sup.config.node,
        "pid": os.getpid(),
        "started_at": sup.started_at, "config": sup.config_path,
        "nsd": {"pid": nsd.child.pid if nsd.child else None, "state": str(nsd.state),
                "restarts": nsd.restart_count, "started_at": nsd.started_at, **nsd.namespaces},
        "workers": [w.as_dict() for w in sup.workers],
        "audit": {"sink": sup.config.audit.sink, "on_error": sup.config.audit.on_error,
                  "degraded": bool(sup.audit_failures()),
                  "failing": {str(i): e for i, e in sup.audit_failures().items()}},
        "onramps": [{"name": o.name, "kind": o.kind, "path": str(o.path) if o.path else None,
                     "address": o.address, "from_systemd": o.from_systemd}
                    for o in sup.onramps],
    })


async def reload(request: web.Request) -> web.Response:
    sup: Supervisor = request.app[SUPERVISOR]
    result = await sup.call("reload")
    if result is None:
        raise web.HTTPServiceUnavailable(text="the daemon is stopping\n")
    ok, message = result
    return _json({"reloaded": ok, "message": message}, status=200 if ok else 422)


async def restart_worker(request: web.Request) -> web.Response:
    sup: Supervisor = request.app[SUPERVISOR]
    try:
        index = int(request.match_info["index"])
        if not 0 <= index < len(sup.workers):
            raise ValueError
    except ValueError:
        raise web.HTTPNotFound(text=f"no worker {request.match_info['index']}\n") from None
    slot = await sup.call("restart_worker", index)
    if slot is None:
        state = sup.workers[index].state
        raise web.HTTPConflict(text=f"worker {index} has no running process to restart ({state})\n")
    return _json(slot.as_dict(), status=202)


class AdminServer:
    def __init__(self, supervisor: Supervisor, settings: Admin, listen_override: str | None):
        self.settings = settings
        self.listen = listen_override if listen_override is not None else settings.listen
        self.unix_path: Path | None = settings.unix_socket_path()
        self.app = web.Application(middlewares=[contain_errors, loopback_names_only,
                                                    authorize_mutations])
        self.app[SUPERVISOR] = supervisor
        self.app[SERVER] = self
        self.error_logged = -ERROR_LOG_INTERVAL
        get = functools.partial(self.app.router.add_get, expect_handler=expect_continue)
        post = functools.partial(self.app.router.add_post, expect_handler=expect_continue)
        get("/", statuspage.page)
        get("/healthz", healthz)
        get("/readyz", readyz)
        get("/metrics", metrics)
        get("/api/status", status)
        get("/api/summary", summary)
        get("/api/workers", workers)
        get("/api/mesh", mesh)
        get("/api/flows", flows)
        get("/api/tunnels", tunnels)
        get("/api/routes", routes)
        post("/api/reload", reload)
        post("/api/workers/{index}/restart", restart_worker)
        # keepalive_timeout also closes a connection that never completes its first request.
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                    keepalive_timeout=IDLE_TIMEOUT)
        # aiohttp logs a raw traceback for every malformed request: noise an unauthenticated
        # client could pour into the JSON log. Its 400 answer is all that request needs.
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
        self._unix_inode: int | None = None

    async def start(self) -> None:
        await self.runner.setup()
        server = self.runner.server
        assert server is not None  # made by setup()
        # A site takes its protocol factory from the runner when it starts: put a cap of its
        # own kind in between, for each. (aiohttp types the attribute as its Server; a site
        # only calls it.)
        self.runner._server = CappedServer(server, MAX_CONNECTIONS)  # type: ignore[assignment]
        if self.listen:
            host, _, port = self.listen.rpartition(":")
            await web.TCPSite(self.runner, host.strip("[]"), int(port), reuse_address=True).start()
        if self.unix_path is not None:
            sock, self._unix_inode = bind_unix(self.unix_path, socket.SOCK_STREAM, 0o600, 128)
            self.runner._server = CappedServer(server, MAX_CONNECTIONS)  # type: ignore[assignment]
            await web.SockSite(self.runner, sock).start()
        self.runner._server = server  # shutdown and cleanup speak to aiohttp's own

    def addresses(self) -> list[str]:
        out = [f"http://{self.listen}"] if self.listen else []
        if self.unix_path is not None:
            out.append(f"unix:{self.unix_path}")
        return out

    async def stop(self) -> None:
        await self.runner.cleanup()
        if self.unix_path is not None:
            try:
                if os.stat(self.unix_path).st_ino == self._unix_inode:
                    os.unlink(self.unix_path)
            except FileNotFoundError:
                pass
