"""The admin HTTP API (aiohttp), on loopback TCP and/or a unix socket.

Reads (GET, HEAD, OPTIONS) are open to whoever can reach the listener. Every other request over
TCP needs the configured bearer token, checked before routing (401 without it, 403 when no token
is configured); over the unix socket, whose file mode (0600) already limits who connects, they
need nothing more.
"""

from __future__ import annotations

import hmac
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .config import Admin
from .listeners import bind_unix

if TYPE_CHECKING:
    from .arbiter import Supervisor

SUPERVISOR = web.AppKey("supervisor", object)
SERVER = web.AppKey("server", object)


def _over_unix_socket(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is not None and sock.family == socket.AF_UNIX


READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


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
    await sup.gather_worker_metrics()
    body = generate_latest(sup.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def workers(request: web.Request) -> web.Response:
    sup: Supervisor = request.app[SUPERVISOR]
    return web.json_response([w.as_dict() for w in sup.workers])


async def mesh(request: web.Request) -> web.Response:
    """Each worker pings its peers over the mesh: which worker answered on each link."""
    sup: Supervisor = request.app[SUPERVISOR]
    return web.json_response(await sup.mesh_report())


async def flows(request: web.Request) -> web.Response:
    """Live flows of every worker; ``?tenant=`` filters, ``?offset=&limit=`` pages."""
    sup: Supervisor = request.app[SUPERVISOR]
    try:
        offset = int(request.query.get("offset", 0))
        # A page crosses the control channel in one message: keep it well under its size.
        limit = min(int(request.query.get("limit", 100)), 200)
        if offset < 0 or limit < 1:
            raise ValueError
    except ValueError:
        raise web.HTTPBadRequest(text="offset must be an integer >= 0, limit one >= 1\n") from None
    if offset > 100_000:
        raise web.HTTPBadRequest(text="offset at most 100000; filter by tenant instead\n")
    replies = await sup.ask_workers("flows", {"tenant": request.query.get("tenant"),
                                              "upto": offset + limit})
    replies = {i: r for i, r in replies.items() if r is not None and r.type == "flows"}
    every = sorted((f for r in replies.values() for f in r["flows"]),
                   key=lambda f: (f["worker"], f["tenant"], f["src"], f["sport"]))
    return web.json_response({"total": sum(r["total"] for r in replies.values()),
                              "offset": offset, "limit": limit,
                              "flows": every[offset:offset + limit],
                              "workers_missing": [w.index for w in sup.workers
                                                  if not replies.get(w.index)]})


async def tunnels(request: web.Request) -> web.Response:
    sup: Supervisor = request.app[SUPERVISOR]
    replies = await sup.ask_workers("tunnels")
    return web.json_response([{**t, "worker": i} for i, r in sorted(replies.items()) if r
                              for t in r["tunnels"]])


async def status(request: web.Request) -> web.Response:
    sup: Supervisor = request.app[SUPERVISOR]
    nsd = sup.nsd
    return web.json_response({
        "ready": sup.is_ready(), "status": sup.status_line(), "pid": os.getpid(),
        "started_at": sup.started_at, "config": sup.config_path,
        "nsd": {"pid": nsd.child.pid if nsd.child else None, "state": str(nsd.state),
                "restarts": nsd.restart_count, "started_at": nsd.started_at, **nsd.namespaces},
        "workers": [w.as_dict() for w in sup.workers],
        "onramps": [{"name": o.name, "kind": o.kind, "path": str(o.path) if o.path else None,
                     "address": o.address, "from_systemd": o.from_systemd}
                    for o in sup.onramps],
    })


async def reload(request: web.Request) -> web.Response:
    sup: Supervisor = request.app[SUPERVISOR]
    ok, message = sup.reload()
    return web.json_response({"reloaded": ok, "message": message}, status=200 if ok else 422)


async def restart_worker(request: web.Request) -> web.Response:
    sup: Supervisor = request.app[SUPERVISOR]
    try:
        index = int(request.match_info["index"])
        if not 0 <= index < len(sup.workers):
            raise ValueError
    except ValueError:
        raise web.HTTPNotFound(text=f"no worker {request.match_info['index']}\n") from None
    slot = await sup.restart_worker(index)
    if slot is None:
        state = sup.workers[index].state
        raise web.HTTPConflict(text=f"worker {index} has no running process to restart ({state})\n")
    return web.json_response(slot.as_dict(), status=202)


class AdminServer:
    def __init__(self, supervisor: Supervisor, settings: Admin, listen_override: str | None):
        self.settings = settings
        self.listen = listen_override if listen_override is not None else settings.listen
        self.unix_path: Path | None = settings.unix_socket_path()
        self.app = web.Application(middlewares=[authorize_mutations])
        self.app[SUPERVISOR] = supervisor
        self.app[SERVER] = self
        self.app.router.add_get("/healthz", healthz)
        self.app.router.add_get("/readyz", readyz)
        self.app.router.add_get("/metrics", metrics)
        self.app.router.add_get("/api/status", status)
        self.app.router.add_get("/api/workers", workers)
        self.app.router.add_get("/api/mesh", mesh)
        self.app.router.add_get("/api/flows", flows)
        self.app.router.add_get("/api/tunnels", tunnels)
        self.app.router.add_post("/api/reload", reload)
        self.app.router.add_post("/api/workers/{index}/restart", restart_worker)
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        self._unix_inode: int | None = None

    async def start(self) -> None:
        await self.runner.setup()
        if self.listen:
            host, _, port = self.listen.rpartition(":")
            await web.TCPSite(self.runner, host.strip("[]"), int(port), reuse_address=True).start()
        if self.unix_path is not None:
            sock, self._unix_inode = bind_unix(self.unix_path, socket.SOCK_STREAM, 0o600, 128)
            await web.SockSite(self.runner, sock).start()

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
