"""Stream handlers: what runs between a flow's two stream legs.

A handler gets the client's stream (the upgraded connection the namespace's kernel accepted, or
a TCP on-ramp's accepted connection) and the server's (the off-ramp, already connected, or a
socket downgraded into another device's tunnel) and owns the bytes until both directions end.
The driver closes both sockets when the handler returns, and resets both (then cancels the
handler) when the flow is cut short.

Two handlers: :func:`splice` relays in the kernel (the bytes never enter Python), and the one
:func:`application_handler` makes asks the application's ``on_stream_start`` hook first, which
may answer an inspector (:mod:`ipferry.worker.inspect`) to see, change or close the bytes. See
docs/streams.md.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Collection
from typing import Any, Protocol

from ipferry.engine.core import flow_fields, flow_start
from ipferry.engine.decisions import Decision, StreamStart
from ipferry.engine.flows import Flow
from ipferry.wire import tls

from . import metrics
from .app import call_hook
from .http.session import HttpLayer, Served
from .inspect import Inspector, inspect_stream
from .relay import abort, relay, wait_fd

__all__ = ["StreamHandler", "StreamHandlers", "UpgradedStream", "application_handler", "splice",
           "stream_start"]


class StreamHandler(Protocol):
    async def __call__(self, flow: Flow, client: socket.socket, server: socket.socket) -> None: ...


async def splice(flow: Flow, client: socket.socket, server: socket.socket) -> None:
    """Relay the two streams in the kernel (``os.splice``): the bytes never enter Python."""
    try:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # the HTTP layer's own upstreams are socketpairs: no Nagle to turn off
        pass
    await relay(client, server)


def stream_start(flow: Flow, sni: str | None = None) -> StreamStart:
    """What ``on_stream_start`` sees of a flow's stream: the flow, where its server leg goes,
    the device's tunnel when that leg is downgraded into one, the TLS server name the client
    began with (if read) and the layer its decision asked for."""
    server = flow.server
    assert server is not None
    tunnel = getattr(server, "tunnel", None)
    decision = flow.decision
    return StreamStart(flow_start(flow), server.upstream, tunnel is not None,
                       None if tunnel is None else tunnel.id, sni,
                       decision.layer if isinstance(decision, Decision) else None)


class StreamHandlers:
    """The stream handler that lets the application choose, stream by stream.

    On a stream to one of the ``[http] tls_ports`` the client's TLS ClientHello is read first
    (at most :data:`~ipferry.wire.tls.MAX_HELLO_BYTES`, for ``client_hello_timeout`` seconds; it
    goes on to the server untouched) and its server name is :attr:`StreamStart.sni`. Then
    ``get_app()`` (called then: a reloaded application is asked from then on) is asked
    ``on_stream_start(StreamStart)`` (plain or ``async``), if it has that method:

    - no such method, ``None``, ``"splice"`` or ``Decision.upgrade()``: :func:`splice` (zero
      copy), or HTTP when the flow's decision asked for ``layer = "http"``;
    - ``"http"`` or ``Decision.upgrade(layer="http")``: the stream is served as HTTP/1.1
      (:mod:`ipferry.worker.http`), each request decided by ``on_request``;
    - an :class:`~ipferry.worker.inspect.Inspector`: the bytes go through it
      (:func:`~ipferry.worker.inspect.inspect_stream`);
    - ``Decision.drop(reason)``: both ends are reset (a TLS stream's ``tls_stream`` record says
      so, with the reason);
    - the hook raises, or answers anything else: the stream is reset (both ends get RST) and
      ``stream_hook_failed`` is logged. Fail closed: an application that inspects streams (an
      auditor) must not have one pass unseen because its hook failed.
    """

    def __init__(self, get_app: Callable[[], object], log: Any, *, audit: Any = None,
                 http: HttpLayer | None = None, tls_ports: Collection[int] = (),
                 hello_timeout: float = 5.0) -> None:
        self.get_app = get_app
        self.log = log
        self.audit = audit
        self.http = http
        self.tls_ports = frozenset(tls_ports)
        self.hello_timeout = hello_timeout

    async def __call__(self, flow: Flow, client: socket.socket, server: socket.socket) -> None:
        sni, named = None, False  # named: a ClientHello was read (with or without a name)
        first = b""  # what was read of the client to find it: for whatever handles the stream
        if flow.key.dport in self.tls_ports:
            hello = await self._client_hello(flow, client)
            if hello is None:
                abort(client, server)
                return
            named, sni, first = hello
        hook = getattr(self.get_app(), "on_stream_start", None)
        choice: object = None
        if hook is not None:
            try:
                choice = await call_hook(hook, stream_start(flow, sni))
                if not (choice is None or choice in ("splice", "http")
                        or isinstance(choice, Decision | Inspector)):
                    raise TypeError(f"on_stream_start answered {type(choice).__name__}, not "
                                    "None, 'splice', 'http', a Decision or an inspector")
            except Exception as exc:
                self.log.warning("stream_hook_failed", error=repr(exc)[:200], **flow_fields(flow))
                abort(client, server)
                return
        if isinstance(choice, Decision) and choice.action != "upgrade":
            if named:
                self._tls_record(flow, sni, "deny", choice.reason)
            self.log.info("stream_refused", reason=choice.reason, sni=sni, **flow_fields(flow))
            abort(client, server)
            return
        if named:
            self._tls_record(flow, sni, "allow",
                             choice.reason if isinstance(choice, Decision) else "")
        if choice is not None and not isinstance(choice, str | Decision) \
                and isinstance(choice, Inspector):  # (a Protocol's isinstance is slow: last)
            if first:  # the inspector sees the client's first bytes too
                try:
                    shown = choice.to_server(first)
                except Exception as exc:
                    self.log.warning("stream_inspector_failed", error=repr(exc)[:200],
                                     **flow_fields(flow))
                    abort(client, server)
                    return
                first = first if shown is None else bytes(shown)
                if first and not await _write_all(server, first):
                    abort(client, server)
                    return
            await inspect_stream(client, server, choice, log=self.log.bind(**flow_fields(flow)))
            return
        decision = flow.decision
        if isinstance(choice, Decision) and choice.layer is not None:
            http = choice.layer == "http"
        else:  # None, a plain allow: as the flow's decision asked; "splice" / "http": so
            http = choice == "http" or (choice != "splice" and isinstance(decision, Decision)
                                        and decision.layer == "http")
        if http and self.http is not None:
            await self.http.serve(client, served_flow(flow), origin=server, first=first)
            return
        if first and not await _write_all(server, first):
            abort(client, server)
            return
        await splice(flow, client, server)

    async def _client_hello(self, flow: Flow, client: socket.socket
                            ) -> tuple[bool, str | None, bytes] | None:
        """Whether the client began with a ClientHello, its server name, and the bytes read (to
        send on). None: the stream is cut (the client went away). A client that sends no TLS,
        a hello without a name, or nothing for ``hello_timeout`` gets no name: its stream goes
        on unnamed, and ``on_stream_start`` sees ``sni=None`` (an application that allows only
        named streams refuses those)."""
        loop = asyncio.get_running_loop()
        buf = bytearray()
        need = tls.RECORD_HEADER
        deadline = loop.time() + self.hello_timeout
        while True:
            try:
                chunk = client.recv(need - len(buf))
            except (BlockingIOError, InterruptedError):
                left = deadline - loop.time()
                try:
                    if left <= 0:
                        raise TimeoutError
                    await asyncio.wait_for(wait_fd(loop, client.fileno(), writable=False), left)
                except TimeoutError:
                    metrics.TLS_STREAMS.labels("timeout").inc()
                    return False, None, bytes(buf)
                continue
            except OSError:
                return None
            if not chunk:
                return (False, None, bytes(buf)) if buf else None
            buf += chunk
            try:
                found = tls.parse_client_hello(buf)
            except tls.NotTls:
                metrics.TLS_STREAMS.labels("not_tls").inc()
                return False, None, bytes(buf)
            if isinstance(found, tls.NeedMore):
                need = found.total
                continue
            return True, found.server_name, bytes(buf)

    def _tls_record(self, flow: Flow, sni: str | None, decision: str, reason: str) -> None:
        metrics.TLS_STREAMS.labels("allowed" if decision == "allow" else "denied").inc()
        if self.audit is not None:
            self.audit.record("tls_stream", sni=sni, decision=decision, reason=reason,
                              **flow_fields(flow))


def served_flow(flow: Flow) -> Served:
    """Who a flow's stream carried as HTTP is, for the HTTP layer."""
    start = flow_start(flow)
    server = flow.server
    assert server is not None
    fields = flow_fields(flow)
    return Served(start.tenant, (start.src, start.sport), start.context,
                  origin=server.upstream, flow=fields)


def application_handler(get_app: Callable[[], object], log: Any, **kwargs: Any) -> StreamHandler:
    """The :class:`StreamHandlers` of an application (kept for callers of the first API)."""
    return StreamHandlers(get_app, log, **kwargs)


async def _write_all(sock: socket.socket, data: bytes) -> bool:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            n = sock.send(view)
        except (BlockingIOError, InterruptedError):
            await wait_fd(loop, sock.fileno(), writable=True)
            continue
        except OSError:
            return False
        view = view[n:]
    return True


class UpgradedStream:
    """A flow's accepted stream and the handler's task (the driver's, per relayed flow)."""

    __slots__ = ("conn", "task")

    def __init__(self, conn: socket.socket, task: asyncio.Task) -> None:
        self.conn: socket.socket | None = conn
        self.task = task
