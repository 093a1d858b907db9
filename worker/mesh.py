"""The worker mesh: packets of flows owned by another worker cross to it, replies come back.

One SOCK_SEQPACKET link per pair of workers (made by the supervisor). Two kinds of datagram share
it, in order: control messages (the JSON of :mod:`ipferry.runtime.fdpass`, starting with ``{``) and
binary frames, a kind byte and a tunnel id before a raw packet:

- ``P`` + tunnel id + packet: from the origin's tunnel to the flow's owner;
- ``R`` + tunnel id + packet: from the owner back to the origin's tunnel.

The owner learns a tunnel's context from ``tunnel_open`` {tunnel, tenant, extra, vnet, device}
before its first packet, and forgets it on ``tunnel_closed`` {tunnel} or when the link goes down.

A tunnel whose client passed its TUN (:mod:`ipferry.worker.attached`) gives each worker a queue of
it: ``tunnel_queue`` {device, tenant, extra, vnet} with the fd ``queue``, and ``tunnel_detach``
{device} when it ends. A worker with a queue of the ``device`` a ``tunnel_open`` names answers that
tunnel's flows on its own queue, not back over the mesh.
"""

from __future__ import annotations

import array
import asyncio
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ipferry.runtime import fdpass

from . import metrics
from .app import TunnelContext
from .attached import close_all
from .datagrams import BATCH, READ_SIZE, DatagramQueue, at_eof

if TYPE_CHECKING:
    from .tunnels import Tunnel

FRAME = struct.Struct("!cI")
PACKET, REPLY = b"P", b"R"
_ANCILLARY = socket.CMSG_SPACE(4 * 4)  # room for the fds of one message (a queue: one)


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
        # (recvmsg, not recv: a message may carry a fd. As datagrams.drain otherwise.)
        recvmsg = self.sock.recvmsg
        for _ in range(BATCH):
            try:
                data, ancdata, _flags, _ = recvmsg(READ_SIZE, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                return
            except ConnectionResetError:
                continue
            except OSError:
                self.close()
                return
            if ancdata:
                self._datagram(data, _fds(ancdata))
            elif data:
                self._datagram(data)
            elif at_eof(self.sock):
                self.close()
                return
            else:
                metrics.DROPS.labels("mesh_bad_frame").inc()
            if self.closed:
                return

    def _datagram(self, data: bytes, fds: list[int] | None = None) -> None:
        if data[:1] == b"{":
            try:
                msg = fdpass.decode(data, fds or [])
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
        elif fds:  # (no frame carries fds)
            close_all(fds)
            metrics.DROPS.labels("mesh_bad_frame").inc()
        elif len(data) > FRAME.size:
            kind, tunnel = FRAME.unpack_from(data)
            self.on_frame(self, kind, tunnel, data[FRAME.size:])
        else:
            metrics.DROPS.labels("mesh_bad_frame").inc()

    def send_message(self, type_: str, body: dict | None = None) -> bool:
        return self.out.send(fdpass.encode(type_, body, []), control=True)

    def send_fd(self, type_: str, body: dict, name: str, fd: int) -> bool:
        """A control message with one fd (it stays open here); False if it could not go now."""
        if self.closed:
            return False
        try:
            socket.send_fds(self.sock, [fdpass.encode(type_, body, [name])], [fd])
        except OSError:  # full, or the peer gone: the caller keeps the fd's job
            return False
        return True

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


def _fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, raw in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(raw[:len(raw) - len(raw) % fds.itemsize])
    return list(fds)


class RemoteTunnel:
    """Another worker's tunnel as seen by the owner of some of its flows (a
    :class:`ipferry.worker.tunnels.Tunnel`)."""

    local = False
    steered = False
    anycast = False
    lands = False
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
    def device(self) -> tuple[int, int]:
        return (self.origin, self.id)

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
