"""The worker mesh: packets of flows owned by another worker cross to it, replies come back.

One SOCK_SEQPACKET link per pair of workers (made by the supervisor). Two kinds of datagram share
it, in order: control messages (the JSON of :mod:`ipferry.runtime.fdpass`, starting with ``{``) and
binary frames, a kind byte and a tunnel id before a raw packet:

- ``P`` + tunnel id + packet: from the origin's tunnel to the flow's owner;
- ``R`` + tunnel id + packet: from the owner back to the origin's tunnel.

The owner learns a tunnel's context from ``tunnel_open`` {tunnel, tenant, extra} before its first
packet, and forgets it on ``tunnel_closed`` {tunnel} or when the link goes down.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ipferry.runtime import fdpass

from . import metrics
from .app import TunnelContext
from .datagrams import DatagramQueue, drain

if TYPE_CHECKING:
    from .tunnels import Tunnel

FRAME = struct.Struct("!cI")
PACKET, REPLY = b"P", b"R"


class MeshLink:
    def __init__(self, peer: int, sock, *, on_message: Callable, on_frame: Callable,
                 on_close: Callable) -> None:
        self.peer = peer
        self.sock = sock
        sock.setblocking(False)
        self.out = DatagramQueue(sock, "mesh_queue_full")
        self.on_message = on_message
        self.on_frame = on_frame
        self.on_close = on_close
        # Our tunnels the peer has been told about, by id: its replies name them so.
        self.opened: dict[int, Tunnel] = {}
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = 1
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._read)

    def _read(self) -> None:
        drain(self.sock, self._datagram, self.close, empty_reason="mesh_bad_frame")

    def _datagram(self, data: bytes) -> None:
        if data[:1] == b"{":
            try:
                msg = fdpass.decode(data, [])
            except fdpass.ProtocolError:
                metrics.DROPS.labels("mesh_bad_message").inc()
                return
            reply_to = msg.body.get("reply_to")
            fut = self._pending.pop(reply_to, None) if isinstance(reply_to, int) else None
            if fut is not None:
                if not fut.done():
                    fut.set_result(msg)
            else:
                self.on_message(self, msg)
        elif len(data) > FRAME.size:
            kind, tunnel = FRAME.unpack_from(data)
            self.on_frame(self, kind, tunnel, data[FRAME.size:])
        else:
            metrics.DROPS.labels("mesh_bad_frame").inc()

    def send_message(self, type_: str, body: dict | None = None) -> bool:
        return self.out.send(fdpass.encode(type_, body, []), control=True)

    def send_frame(self, kind: bytes, tunnel: int, packet: bytes | bytearray) -> bool:
        return self.out.send(FRAME.pack(kind, tunnel) + packet)

    async def request(self, type_: str, body: dict | None = None, timeout: float = 2.0):
        req_id = self._next_id
        self._next_id += 1
        fut = self._loop.create_future()
        self._pending[req_id] = fut
        try:
            self.send_message(type_, {**(body or {}), "id": req_id})
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(req_id, None)

    def reply(self, request: fdpass.Message, type_: str, body: dict | None = None) -> None:
        self.send_message(type_, {**(body or {}), "reply_to": request.body.get("id")})

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        self.out.close()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(fdpass.ChannelClosed(f"mesh link to {self.peer} closed"))
        self.sock.close()
        self.on_close(self)


class RemoteTunnel:
    """Another worker's tunnel as seen by the owner of some of its flows (a
    :class:`ipferry.worker.tunnels.Tunnel`)."""

    local = False
    steered = False
    mtu = 65535

    def __init__(self, link: MeshLink, tunnel_id: int, context: TunnelContext,
                 vnet: bool = False) -> None:
        self.vnet = vnet  # the origin's tunnel framing: packets cross the mesh in it, both ways
        self.link = link
        self.origin = link.peer  # the worker that holds the tunnel
        self.id = tunnel_id
        self.context = context
        self.closed = False

    @property
    def tenant(self) -> str:
        return self.context.tenant

    def send(self, packet: bytes | bytearray) -> None:
        if not self.closed:
            self.link.send_frame(REPLY, self.id, packet)

    def close(self) -> None:
        self.closed = True  # the link is shared with the origin's other tunnels: it stays

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "origin": self.origin, "kind": "remote", "offload": self.vnet,
                "tenant": self.tenant, "context": self.context.extra}


if TYPE_CHECKING:  # mypy checks that it keeps to the Protocol
    def _conforms(tunnel: RemoteTunnel) -> Tunnel:
        return tunnel
