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
from collections.abc import Callable
from typing import Any, Protocol

from ipferry.engine.core import flow_fields, flow_start
from ipferry.engine.decisions import StreamStart
from ipferry.engine.flows import Flow

from .app import call_hook
from .inspect import Inspector, inspect_stream
from .relay import abort, relay

__all__ = ["StreamHandler", "UpgradedStream", "application_handler", "splice", "stream_start"]


class StreamHandler(Protocol):
    async def __call__(self, flow: Flow, client: socket.socket, server: socket.socket) -> None: ...


async def splice(flow: Flow, client: socket.socket, server: socket.socket) -> None:
    """Relay the two streams in the kernel (``os.splice``): the bytes never enter Python."""
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await relay(client, server)


def stream_start(flow: Flow) -> StreamStart:
    """What ``on_stream_start`` sees of a flow's stream: the flow, where its server leg goes,
    and the device's tunnel when that leg is downgraded into one."""
    server = flow.server
    assert server is not None
    tunnel = getattr(server, "tunnel", None)
    return StreamStart(flow_start(flow), server.upstream, tunnel is not None,
                       None if tunnel is None else tunnel.id)


def application_handler(get_app: Callable[[], object], log: Any) -> StreamHandler:
    """The stream handler that lets the application choose, stream by stream.

    For each stream, ``get_app()`` (called then: a reloaded application is asked from then on)
    is asked ``on_stream_start(StreamStart)`` (plain or ``async``), if it has that method:

    - no such method, ``None`` or ``"splice"``: :func:`splice` (the default, zero copy);
    - an :class:`~ipferry.worker.inspect.Inspector`: the bytes go through it
      (:func:`~ipferry.worker.inspect.inspect_stream`);
    - the hook raises, or answers anything else: the stream is reset (both ends get RST) and
      ``stream_hook_failed`` is logged. Fail closed: an application that inspects streams (an
      auditor) must not have one pass unseen because its hook failed.
    """

    async def handle(flow: Flow, client: socket.socket, server: socket.socket) -> None:
        hook = getattr(get_app(), "on_stream_start", None)
        if hook is None:
            await splice(flow, client, server)
            return
        try:
            choice = await call_hook(hook, stream_start(flow))
            if choice is not None and choice != "splice" and not isinstance(choice, Inspector):
                raise TypeError(f"on_stream_start answered {type(choice).__name__}, not None, "
                                "'splice' or an inspector")
        except Exception as exc:
            log.warning("stream_hook_failed", error=repr(exc)[:200], **flow_fields(flow))
            abort(client, server)
            return
        if choice is None or choice == "splice":
            await splice(flow, client, server)
        else:
            await inspect_stream(client, server, choice, log=log.bind(**flow_fields(flow)))

    return handle


class UpgradedStream:
    """A flow's accepted stream and the handler's task (the driver's, per relayed flow)."""

    __slots__ = ("conn", "task")

    def __init__(self, conn: socket.socket, task: asyncio.Task) -> None:
        self.conn: socket.socket | None = conn
        self.task = task
