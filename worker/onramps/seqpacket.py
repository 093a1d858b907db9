"""Connected IP tunnels (SOCK_SEQPACKET): accept, read the context, then one packet a datagram.

A tunnel whose context the application refuses is closed with the reason logged; nothing else is
touched. Packets towards a tunnel wait in a bounded queue while its socket is full; beyond that
they are dropped and counted (the tunnel's TCP will retransmit), never buffered without bound.
Packets of flows another worker owns are the worker's business (see :mod:`ipferry.worker.mesh`).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Awaitable, Callable

from ipferry.wire.vnet import TUNNEL_MAGIC

from . import metrics
from .app import TunnelContext
from .datagrams import READ_SIZE, DatagramQueue, at_eof, drain

BATCH = 64
CONTEXT_TIMEOUT = 10.0  # a tunnel that sends no context in time is closed
MAX_TUNNELS = 10_000  # per worker and on-ramp: beyond it new tunnels are refused

_ids = itertools.count(1)


class Tunnel:
    local = True  # accepted by this worker (a RemoteTunnel is another worker's)
    steered = False  # packets arrive at whichever worker accepted it: foreign flows cross the mesh
    mtu = 65535  # the largest packet it carries
    vnet = False  # its datagrams carry a virtio-net header before the packet (ipferry.wire.vnet)

    def __init__(self, sock: socket.socket, onramp: str, origin: int = 0) -> None:
        self.id = next(_ids)
        self.origin = origin  # the worker holding it (ids are per worker)
        self.sock = sock
        self.onramp = onramp
        self.context: TunnelContext | None = None
        self.packets_in = 0
        self.packets_out = 0
        self.closed = False
        self.out = DatagramQueue(sock, "tunnel_queue_full")
        self._loop = asyncio.get_running_loop()

    @property
    def tenant(self) -> str:
        return self.context.tenant if self.context else ""

    def send(self, packet: bytes | bytearray) -> None:
        if not self.closed and self.out.send(packet):
            self.packets_out += 1

    def as_dict(self) -> dict:
        return {"id": self.id, "onramp": self.onramp, "kind": "tunnel", "offload": self.vnet,
                "tenant": self.tenant,
                "context": self.context.extra if self.context else None,
                "packets_in": self.packets_in, "packets_out": self.packets_out}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        self.out.close()
        self.sock.close()


class TunnelOnramp:
    """Accepts tunnels on a shared listener (every worker accepts; the kernel picks one)."""

    def __init__(self, name: str, worker: int, listener: socket.socket, log,
                 parse_context: Callable[[bytes], Awaitable[TunnelContext]],
                 on_packet: Callable[[Tunnel, bytes], None],
                 on_close: Callable[[Tunnel, str], None]) -> None:
        self.name = name
        self.worker = worker
        self.listener = listener
        self.log = log
        self.parse_context = parse_context
        self.on_packet = on_packet
        self.on_close = on_close
        self.tunnels: dict[int, Tunnel] = {}
        self.starting = 0  # accepted, context not yet accepted
        self._tasks: set[asyncio.Task] = set()
        self._loop = asyncio.get_running_loop()
        listener.setblocking(False)
        self._loop.add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(BATCH):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # another worker took it
            except OSError as exc:
                self.log.warning("tunnel_accept_failed", onramp=self.name, error=exc.strerror)
                return
            if len(self.tunnels) + self.starting >= MAX_TUNNELS:
                metrics.TUNNELS_CLOSED.labels("tunnel_limit").inc()
                sock.close()
                continue
            sock.setblocking(False)
            tunnel = Tunnel(sock, self.name, self.worker)
            self.starting += 1
            self._loop.add_reader(sock.fileno(), self._read_context, tunnel)
            self._loop.call_later(CONTEXT_TIMEOUT, self._context_overdue, tunnel)

    def _context_overdue(self, tunnel: Tunnel) -> None:
        if tunnel.context is None and not tunnel.closed:
            self.log.warning("tunnel_refused", onramp=self.name, reason="no context in time")
            metrics.TUNNELS_CLOSED.labels("context_timeout").inc()
            self.starting -= 1
            tunnel.close()

    def _read_context(self, tunnel: Tunnel) -> None:
        self._loop.remove_reader(tunnel.sock.fileno())
        try:
            raw = tunnel.sock.recv(READ_SIZE)
        except BlockingIOError:
            self._loop.add_reader(tunnel.sock.fileno(), self._read_context, tunnel)
            return
        except OSError:
            raw = None
        if raw is None or not raw and at_eof(tunnel.sock):  # gone before its context
            self.starting -= 1
            tunnel.close()
            return
        # An empty first datagram is an (empty) context: the application refuses it or not.
        if raw.startswith(TUNNEL_MAGIC):  # the client speaks offload framing; the rest is context
            tunnel.vnet = True
            raw = raw[len(TUNNEL_MAGIC):]
        task = self._loop.create_task(self._start(tunnel, raw))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self, tunnel: Tunnel, raw: bytes) -> None:
        try:
            context = await self.parse_context(raw)
        except Exception as exc:  # the application refused it: this tunnel only
            if not tunnel.closed:
                self.starting -= 1
                self.log.warning("tunnel_refused", onramp=self.name, reason=str(exc))
                metrics.TUNNELS_CLOSED.labels("bad_context").inc()
                tunnel.close()
            return
        if tunnel.closed:
            return  # timed out while the application decided
        self.starting -= 1
        tunnel.context = context
        self.tunnels[tunnel.id] = tunnel
        metrics.TUNNELS.inc()  # inc/dec: every on-ramp of the worker adds to the one gauge
        self.log.info("tunnel_open", tunnel=tunnel.id, onramp=self.name, tenant=tunnel.tenant)
        self._loop.add_reader(tunnel.sock.fileno(), self._read_packets, tunnel)

    def _read_packets(self, tunnel: Tunnel) -> None:
        def packet(data: bytes) -> None:
            tunnel.packets_in += 1
            self.on_packet(tunnel, data)

        drain(tunnel.sock, packet, lambda: self.close(tunnel, "closed_by_peer"))

    def close(self, tunnel: Tunnel, reason: str) -> None:
        if self.tunnels.pop(tunnel.id, None) is None:
            return
        tunnel.close()
        metrics.TUNNELS.dec()
        metrics.TUNNELS_CLOSED.labels(reason).inc()
        self.log.info("tunnel_closed", tunnel=tunnel.id, reason=reason,
                      packets_in=tunnel.packets_in, packets_out=tunnel.packets_out)
        self.on_close(tunnel, reason)

    def stop(self) -> None:
        self._loop.remove_reader(self.listener.fileno())
        for tunnel in list(self.tunnels.values()):
            self.close(tunnel, "shutdown")
