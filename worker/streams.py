"""Stream handlers: what runs between a flow's two stream legs.

A handler gets the client's stream (the upgraded connection the namespace's kernel accepted) and
the server's (the off-ramp, already connected) and owns the bytes until both directions end. The
driver closes both sockets when the handler returns, and resets both (then cancels the handler)
when the flow is cut short. Today's handler splices; inspection and HTTP plug in here.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol

from ipferry.engine.flows import Flow

from .relay import relay


class StreamHandler(Protocol):
    async def __call__(self, flow: Flow, client: socket.socket, server: socket.socket) -> None: ...


async def splice(flow: Flow, client: socket.socket, server: socket.socket) -> None:
    """Relay the two streams in the kernel (``os.splice``): the bytes never enter Python."""
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await relay(client, server)


class UpgradedStream:
    """A flow's accepted stream and the handler's task (the driver's, per relayed flow)."""

    __slots__ = ("conn", "task")

    def __init__(self, conn: socket.socket, task: asyncio.Task) -> None:
        self.conn: socket.socket | None = conn
        self.task = task
