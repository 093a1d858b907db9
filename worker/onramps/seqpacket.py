"""Connected IP tunnels (SOCK_SEQPACKET): accept, read the context, then one packet a datagram.

The on-ramp of config kind ``tunnel``. A tunnel whose context the application refuses is closed
with the reason logged; nothing else is touched. Packets towards a tunnel wait in a bounded queue
while its socket is full; beyond that they are dropped and counted (the tunnel's TCP will
retransmit), never buffered without bound. Packets of flows another worker owns are the worker's
business (see :mod:`ipferry.worker.mesh`).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Collection, Set
from typing import TYPE_CHECKING, Any, ClassVar

from ipferry.wire.vnet import ATTACH_MAGIC, TUNNEL_MAGIC

from .. import metrics
from ..app import TunnelContext
from ..attached import (
    LINGER_IDLE,
    LINGER_MAX,
    MAX_QUEUES,
    AttachedTunnel,
    NotATun,
    check_tun,
    close_all,
    recv_fds,
)
from ..datagrams import READ_SIZE, DatagramQueue, at_eof, drain
from ..tunnels import next_id
from . import STOP_TIMEOUT, Wiring, register
from . import drain as drain_tasks

if TYPE_CHECKING:
    from ..tunnels import Tunnel
    from . import Onramp

BATCH = 64
CONTEXT_TIMEOUT = 10.0  # a tunnel that sends no context in time is closed
MAX_TUNNELS = 10_000  # per worker and on-ramp: beyond it new tunnels are refused


class SeqpacketTunnel:
    """A connected tunnel whose context the application accepted."""

    local = True  # accepted by this worker (a RemoteTunnel is another worker's)
    anycast = False
    lands = False
    steered = False  # packets arrive at whichever worker accepted it: foreign flows cross the mesh
    mtu = 65535  # the largest packet it carries

    def __init__(self, sock: socket.socket, onramp: str, origin: int, context: TunnelContext,
                 vnet: bool = False) -> None:
        self.id = next_id()
        self.origin = origin  # the worker holding it (ids are per worker)
        self.sock = sock
        self.onramp = onramp
        self.context = context
        self.vnet = vnet  # its datagrams carry a virtio-net header before the packet
        self.packets_in = 0
        self.packets_out = 0
        self.closed = False
        self.out = DatagramQueue(sock, "tunnel_queue_full")
        self._loop = asyncio.get_running_loop()

    @property
    def device(self) -> tuple[int, int]:
        return (self.origin, self.id)

    @property
    def tenant(self) -> str:
        return self.context.tenant

    def send(self, packet: bytes | bytearray) -> None:
        if not self.closed and self.out.send(packet):
            self.packets_out += 1

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "onramp": self.onramp, "kind": "tunnel", "offload": self.vnet,
                "tenant": self.tenant, "context": self.context.extra,
                "packets_in": self.packets_in, "packets_out": self.packets_out}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        self.out.close()
        self.sock.close()


class _Starting:
    """An accepted tunnel whose context is not accepted yet."""

    __slots__ = ("sock", "timer", "task", "attach")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task | None = None
        self.attach = False  # the client will pass its TUN (ATTACH_MAGIC)


@register("tunnel")
class SeqpacketOnramp:
    """Accepts tunnels on a shared listener (every worker accepts; the kernel picks one)."""

    kind: ClassVar[str]
    endpoints: tuple[tuple[bytes | None, int], ...] = ()  # a unix socket: no flow can reach it

    def __init__(self, name: str, listener: socket.socket, wiring: Wiring) -> None:
        self.name = name
        self.worker = wiring.worker
        self.listener = listener
        self.log = wiring.log
        self.parse_context = wiring.parse_context
        self.on_packet = wiring.on_packet
        self.on_close = wiring.on_close
        self.claim_routes = wiring.claim_routes
        self.share_queues = wiring.share_queues
        self.workers = wiring.settings.workers
        self._tunnels: dict[int, SeqpacketTunnel | AttachedTunnel] = {}
        self._starting: set[_Starting] = set()  # accepted, context not yet accepted
        self._tasks: set[asyncio.Task] = set()
        self._loop = asyncio.get_running_loop()
        self._started = False

    def start(self) -> None:
        self.listener.setblocking(False)
        self._loop.add_reader(self.listener.fileno(), self._accept)
        self._started = True

    def tunnels(self) -> Collection[SeqpacketTunnel | AttachedTunnel]:
        return self._tunnels.values()

    def find(self, tunnel_id: int) -> SeqpacketTunnel | AttachedTunnel | None:
        return self._tunnels.get(tunnel_id)

    def sweep(self, in_use: Callable[[], Set[int]]) -> None:
        """Nothing to forget: a connected tunnel lives until either side closes it."""

    def reset_contexts(self) -> None:
        """Nothing to judge again: a tunnel's context was judged once, when it opened."""

    @property
    def starting(self) -> int:
        return len(self._starting)

    def _accept(self) -> None:
        for _ in range(BATCH):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # another worker took it
            except OSError as exc:
                self.log.warning("tunnel_accept_failed", onramp=self.name, error=exc.strerror)
                return
            if len(self._tunnels) + len(self._starting) >= MAX_TUNNELS:
                metrics.TUNNELS_CLOSED.labels("tunnel_limit").inc()
                sock.close()
                continue
            sock.setblocking(False)
            starting = _Starting(sock)
            self._starting.add(starting)
            self._loop.add_reader(sock.fileno(), self._read_context, starting)
            starting.timer = self._loop.call_later(CONTEXT_TIMEOUT, self._context_overdue,
                                                   starting)

    def _give_up(self, starting: _Starting) -> None:
        """Close a tunnel that never opened (no context, refused, or the on-ramp stopping)."""
        self._starting.discard(starting)
        if starting.timer is not None:
            starting.timer.cancel()
        if starting.task is not None and starting.task is not asyncio.current_task():
            starting.task.cancel()
        self._loop.remove_reader(starting.sock.fileno())
        starting.sock.close()

    def _context_overdue(self, starting: _Starting) -> None:
        if starting in self._starting:
            self.log.warning("tunnel_refused", onramp=self.name, reason="no context in time")
            metrics.TUNNELS_CLOSED.labels("context_timeout").inc()
            self._give_up(starting)

    def _read_context(self, starting: _Starting) -> None:
        sock = starting.sock
        self._loop.remove_reader(sock.fileno())
        try:
            raw = sock.recv(READ_SIZE)
        except BlockingIOError:
            self._loop.add_reader(sock.fileno(), self._read_context, starting)
            return
        except OSError:
            raw = None
        if raw is None or not raw and at_eof(sock):  # gone before its context
            self._give_up(starting)
            return
        # An empty first datagram is an (empty) context: the application refuses it or not.
        starting.attach = raw.startswith(ATTACH_MAGIC)
        if starting.attach:  # the client will hand over its TUN rather than send packets
            raw = raw[len(ATTACH_MAGIC):]
        vnet = raw.startswith(TUNNEL_MAGIC)
        if vnet:  # the client speaks offload framing; the rest is context
            raw = raw[len(TUNNEL_MAGIC):]
        task = self._loop.create_task(self._start(starting, raw, vnet))
        starting.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self, starting: _Starting, raw: bytes, vnet: bool) -> None:
        try:
            context = await self.parse_context(raw)
        except Exception as exc:  # the application refused it: this tunnel only
            if starting in self._starting:
                self.log.warning("tunnel_refused", onramp=self.name, reason=str(exc))
                metrics.TUNNELS_CLOSED.labels("bad_context").inc()
                self._give_up(starting)
            return
        if starting not in self._starting:
            return  # timed out while the application decided
        tunnel: SeqpacketTunnel | AttachedTunnel
        if starting.attach:
            tunnel = AttachedTunnel(self.worker, context, vnet, self.on_packet, self._tun_gone,
                                    onramp=self.name, control=starting.sock)
        else:
            tunnel = SeqpacketTunnel(starting.sock, self.name, self.worker, context, vnet)
        if context.extra.get("routes"):
            # A device: its addresses are claimed before it opens (refused: it never does).
            reason = await self._claim(tunnel)
            if starting not in self._starting:  # timed out meanwhile
                if reason is None:
                    self.on_close(tunnel, "context_timeout")  # (its routes are let go)
                return
            if reason is not None:
                self.log.warning("tunnel_refused", onramp=self.name, tenant=tunnel.tenant,
                                 reason=reason)
                metrics.TUNNELS_CLOSED.labels("route_refused").inc()
                self._give_up(starting)
                return
        self._starting.discard(starting)
        if starting.timer is not None:
            starting.timer.cancel()
        self._tunnels[tunnel.id] = tunnel
        metrics.TUNNELS.inc()  # inc/dec: every on-ramp of the worker adds to the one gauge
        if isinstance(tunnel, AttachedTunnel):
            self.log.info("tunnel_open", tunnel=tunnel.id, onramp=self.name,
                          tenant=tunnel.tenant, attach=True)
            # How many queues to make: one per worker. (The socket is empty: it cannot be full.)
            try:
                starting.sock.send(b'{"queues":%d}' % self.workers)
            except OSError:  # gone already
                self.close(tunnel, "closed_by_peer")
                return
            self._loop.add_reader(starting.sock.fileno(), self._read_control, tunnel)
            return
        self.log.info("tunnel_open", tunnel=tunnel.id, onramp=self.name, tenant=tunnel.tenant)
        self._loop.add_reader(tunnel.sock.fileno(), self._read_packets, tunnel)

    # -- a tunnel whose client passes its TUN ------------------------------------------------

    def _read_control(self, tunnel: AttachedTunnel) -> None:
        """The client's connection of an attached tunnel: its queues once (``tun`` with the fds),
        then ``done`` when its command has exited, or the end if it was killed."""
        sock = tunnel.control
        assert sock is not None
        while not tunnel.closed:
            try:
                data, fds, too_many = recv_fds(sock)
            except BlockingIOError:
                return
            except ConnectionResetError:
                continue  # (as drain: what the client sent first is still ours)
            except OSError:
                self.close(tunnel, "closed_by_peer")
                return
            if too_many:
                self._bad_attach(tunnel, f"more than {MAX_QUEUES} queues")
                return
            if data == b"done" and not fds:
                self._linger(tunnel)  # CMD exited: its namespace's last packets cross, then we
                return
            if fds or data:
                self._take_queues(tunnel, data, fds)
            elif at_eof(sock):  # (connect gone without "done": killed; nothing to wait for)
                self.close(tunnel, "closed_by_peer")
                return
            else:
                metrics.DROPS.labels("empty_datagram").inc()

    def _take_queues(self, tunnel: AttachedTunnel, data: bytes, fds: list[int]) -> None:
        if tunnel.attached or data != b"tun" or not fds:
            close_all(fds)
            why = ("queues passed twice" if tunnel.attached else
                   "expected the message 'tun' with the TUN's queues")
            return self._bad_attach(tunnel, why)
        try:
            for fd in fds:
                check_tun(fd, tunnel.vnet)
        except NotATun as exc:
            close_all(fds)
            return self._bad_attach(tunnel, f"a passed fd is {exc}")
        tunnel.queues = len(fds)
        tunnel.attach(fds[0])
        left = self.share_queues(tunnel, fds[1:]) if self.share_queues else fds[1:]
        for fd in left:  # no other worker took it: read here, every queue must be read
            tunnel.attach(fd)
        self.log.info("tunnel_attached", tunnel=tunnel.id, queues=len(fds),
                      shared=len(fds) - 1 - len(left))

    def _bad_attach(self, tunnel: AttachedTunnel, reason: str) -> None:
        self.log.warning("tunnel_refused", onramp=self.name, tenant=tunnel.tenant, reason=reason)
        self.close(tunnel, "bad_attach")

    def _tun_gone(self, tunnel: AttachedTunnel) -> None:
        self.close(tunnel, "tun_gone")

    def _linger(self, tunnel: AttachedTunnel) -> None:
        """The client is done (its command exited): carry the last packets (FINs, their ACKs)
        until its TUN is quiet, then close."""
        assert tunnel.control is not None
        self._loop.remove_reader(tunnel.control.fileno())
        if not tunnel.attached:
            self.close(tunnel, "closed_by_peer")
            return
        deadline = self._loop.time() + LINGER_MAX

        def check() -> None:
            if tunnel.closed:
                return
            if time.monotonic() - tunnel.last >= LINGER_IDLE or self._loop.time() >= deadline:
                self.close(tunnel, "closed_by_peer")
            else:
                self._loop.call_later(LINGER_IDLE / 4, check)

        check()

    async def _claim(self, tunnel: SeqpacketTunnel | AttachedTunnel) -> str | None:
        """Claim the tunnel's routes: None when they are its, else why not."""
        if self.claim_routes is None:
            return "this on-ramp takes no routes"
        try:
            await self.claim_routes(tunnel)
        except Exception as exc:  # RouteRefused (the reason), or a fault of ours
            return str(exc) or type(exc).__name__
        return None

    def _read_packets(self, tunnel: SeqpacketTunnel) -> None:
        def packet(data: bytes) -> None:
            tunnel.packets_in += 1
            self.on_packet(tunnel, data)

        drain(tunnel.sock, packet, lambda: self.close(tunnel, "closed_by_peer"))

    def close(self, tunnel: SeqpacketTunnel | AttachedTunnel, reason: str) -> None:
        if self._tunnels.pop(tunnel.id, None) is None:
            return
        tunnel.close()
        metrics.TUNNELS.dec()
        metrics.TUNNELS_CLOSED.labels(reason).inc()
        self.log.info("tunnel_closed", tunnel=tunnel.id, reason=reason,
                      packets_in=tunnel.packets_in, packets_out=tunnel.packets_out)
        self.on_close(tunnel, reason)

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self._started:
            self._loop.remove_reader(self.listener.fileno())
            self._started = False
        for starting in list(self._starting):
            self._give_up(starting)
        for tunnel in list(self._tunnels.values()):
            self.close(tunnel, "shutdown")
        if left := await drain_tasks(self._tasks, timeout):
            self.log.warning("onramp_tasks_left", onramp=self.name, tasks=left)


if TYPE_CHECKING:  # mypy checks that both keep to their Protocols
    def _conforms(onramp: SeqpacketOnramp, tunnel: SeqpacketTunnel,
                  attached: AttachedTunnel) -> tuple[Onramp, Tunnel, Tunnel]:
        return onramp, tunnel, attached
