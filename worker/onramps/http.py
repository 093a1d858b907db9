"""A forward proxy: the on-ramp of config kind ``http`` (what ``curl -x`` and browsers expect).

Every worker accepts on the one listener the supervisor bound. A connection from a source
outside the on-ramp's ``allow`` list is closed at once; the others are served by the worker's
HTTP layer (:mod:`ipferry.worker.http.session`): absolute-form requests go to the host they name,
``CONNECT host:port`` becomes a TCP flow of the tenant (decided by the flow rules and hooks,
downgraded into a device's tunnel when the address is one, spliced).

The tenant is the on-ramp's ``tenant``, or the one a request's ``Proxy-Authorization`` token
maps to (``Bearer TOKEN``, or ``Basic`` with the token as the password, as ``curl -U
user:TOKEN`` sends it). Workers hold only the tokens' SHA-256: a token is never logged, and a
wrong one is answered 407 like a missing one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import socket
from typing import TYPE_CHECKING, ClassVar

from ipferry.engine.decisions import HttpRequest, TunnelContext

from .. import metrics
from ..http.session import Served
from ..relay import abort
from . import STOP_TIMEOUT, OnrampUnusable, Wiring, register
from .listening import ListeningOnramp
from .tcp import _endpoint, _plain

if TYPE_CHECKING:
    from . import Onramp

BATCH = 64
MAX_CONNECTIONS = 4096  # per worker and on-ramp: clients served at once


def token_of(header: str | None) -> str | None:
    """The token a ``Proxy-Authorization`` value carries (Bearer, or Basic's password, or its
    user when the password is empty), or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == "bearer":
        return value or None
    if scheme == "basic":
        try:
            user, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(
                ":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        return password or user or None
    return None


@register("http")
class HttpOnramp(ListeningOnramp):
    """Accepts on a shared TCP listener; each connection is served as a forward proxy's."""

    kind: ClassVar[str]
    refused_counter = metrics.HTTP_REJECTED
    refused_event = "http_connection_refused"

    def __init__(self, name: str, listener: socket.socket, wiring: Wiring, *,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        super().__init__()
        conf = wiring.settings.http_onramps.get(name)
        if conf is None:
            raise OnrampUnusable(f"HTTP on-ramp {name}: no settings came with its socket")
        if wiring.serve_http is None:
            raise OnrampUnusable(f"HTTP on-ramp {name}: this worker has no HTTP layer")
        self.name = name
        self.listener = listener
        self.log = wiring.log
        self.tenant = conf.tenant
        self.tokens = dict(conf.tokens)
        self.allow = [ipaddress.ip_network(n) for n in conf.allow]
        self.endpoints = (_endpoint(*conf.address),)  # flows to the proxy itself are refused
        self.serve_http = wiring.serve_http
        self.max_connections = max_connections
        self.clients: set[asyncio.Task] = set()

    # -- the Onramp protocol (start, tunnels, find, sweep: ListeningOnramp) ----------------

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Accept no more; clients still served are cut (their sockets closed)."""
        self._stop_accepting()
        for task in list(self.clients):
            task.cancel()
        if self.clients:
            await asyncio.wait(list(self.clients), timeout=timeout)

    # -- accepting -------------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(BATCH):
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._refused("accept_failed", error=exc.strerror)
                return
            address = _plain(peer[0])
            if self.allow and not any(address in net for net in self.allow):
                sock.close()
                self._refused("source_denied", source=str(address))
                continue
            if len(self.clients) >= self.max_connections:
                sock.close()
                self._refused("pending_limit", limit=self.max_connections)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client = (str(address), peer[1])
            served = Served(self.tenant, client,
                            TunnelContext(self.tenant or "", {"onramp": self.name}),
                            onramp=self.name, authenticate=self._authenticate)
            task = self._loop.create_task(self._serve(sock, served))
            self.clients.add(task)
            task.add_done_callback(self.clients.discard)

    async def _serve(self, sock: socket.socket, served: Served) -> None:
        handed = False
        try:
            handed = await self.serve_http(sock, served)
        except asyncio.CancelledError:  # the worker stops: a cut answer must not look whole
            if not handed:
                abort(sock)
            raise
        except Exception:  # a bug of the HTTP layer: this client only
            self.log.exception("http_onramp_failed", onramp=self.name, client=served.client[0])
        finally:
            if not handed:
                sock.close()

    def _authenticate(self, request: HttpRequest) -> str | None:
        """The tenant a request's token names; None without one; "" for a token that names
        none (answered 407 even where the on-ramp has a tenant of its own)."""
        header = request.header("proxy-authorization")
        if header is None:
            return None
        token = token_of(header)
        if token is None:
            return ""
        return self.tokens.get(hashlib.sha256(token.encode("utf-8", "replace")).hexdigest(), "")


if TYPE_CHECKING:
    def _conforms(onramp: HttpOnramp) -> Onramp:
        return onramp
