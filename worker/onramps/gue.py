"""The unconnected IP tunnel on-ramp: GUE datagrams on a UDP socket shared by all workers.

The on-ramp of config kind ``gue``. Each worker reads its own socket of the port's SO_REUSEPORT
group, to which the kernel's steering program (:mod:`ipferry.wire.steering`) delivers only the
flows this worker owns: GUE packets never cross the mesh. A sender (address, port) with one
context is a :class:`GueTunnel`: replies go back to it GUE-encapsulated. It is forgotten once
idle and no flow refers to it.

Whoever can send to the port can claim any tenant, so sources are checked against the on-ramp's
allow list and tenants against its ``tenants`` list; failures are dropped and counted
(``gue_source_denied``, ``bad_gue``, ``gue_bad_context``, ``gue_unknown_tenant``).
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import socket
import time
from collections.abc import Callable, Collection, Set
from typing import TYPE_CHECKING, Any, ClassVar

from ipferry.wire import gue
from ipferry.wire.vnet import HEADER_SIZE as VNET_HEADER

from .. import metrics
from ..app import TunnelContext
from ..tunnels import next_id
from . import STOP_TIMEOUT, OnrampUnusable, Wiring, register
from . import drain as drain_tasks

if TYPE_CHECKING:
    from ..tunnels import Tunnel
    from . import Onramp

BATCH = 64
READ_SIZE = 65535
IDLE = 300.0  # a sender with no traffic and no flows for this long is forgotten
MAX_CACHED = 4096  # sources and contexts remembered (allowed or not) before starting over
MAX_TUNNELS = 10_000  # senders (address, port, context) per worker and on-ramp
MAX_PENDING = 256  # contexts an async parse_context is deciding at once


class GueTunnel:
    """One sender and context on a GUE on-ramp, as flows see a tunnel."""

    local = True
    steered = True  # the kernel delivered it to its flow's owner: never forwarded
    site: str | None = None  # the configured site it is (see GueOnramp.site_tunnel)

    def __init__(self, onramp: str, origin: int, sock: socket.socket, peer: tuple,
                 context: TunnelContext, vnet: bool = False, anycast: bool = False) -> None:
        self.vnet = vnet  # the sender's datagrams carry the offload option (see gue)
        self.anycast = anycast  # other nodes share the on-ramp's address (ECMP)
        self.lands = False  # (steered instead: the kernel delivers each flow to its owner)
        self.id = next_id()
        self.onramp = onramp
        self.origin = origin
        self.sock = sock
        self.peer = peer
        self.context = context
        # The largest plain packet a reply datagram carries (superframes are kept smaller).
        head = gue.vnet_reply_header(4) if vnet else gue.reply_header(4)
        self.mtu = gue.room(head, vnet, sock.family == socket.AF_INET6)
        self.packets_in = 0
        self.packets_out = 0
        self.last_seen = time.monotonic()
        self.closed = False

    @property
    def device(self) -> tuple[int, int]:
        return (self.origin, self.id)

    @property
    def tenant(self) -> str:
        return self.context.tenant

    def send(self, data: bytes | bytearray) -> None:
        try:
            if self.vnet:  # data: a virtio-net header, then the packet
                head = gue.vnet_reply_header(data[VNET_HEADER] >> 4)
                self.sock.sendmsg([head, memoryview(data)[:VNET_HEADER], b"\0\0",
                                   memoryview(data)[VNET_HEADER:]], [], 0, self.peer)
            else:
                self.sock.sendto(gue.reply_header(data[0] >> 4) + data, self.peer)
        except BlockingIOError:
            metrics.DROPS.labels("gue_send_full").inc()  # datagram semantics: TCP resends
        except OSError:
            metrics.DROPS.labels("gue_send_failed").inc()
        else:
            self.packets_out += 1

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "onramp": self.onramp, "kind": "gue", "offload": self.vnet,
                "tenant": self.tenant,
                "peer": f"{self.peer[0]}:{self.peer[1]}", "context": self.context.extra,
                "packets_in": self.packets_in, "packets_out": self.packets_out}

    def close(self) -> None:
        self.closed = True  # the socket is the on-ramp's: nothing else to free


def _sender(host: str, port: int) -> tuple[str, int]:
    """A GUE sender as sites name it: its address (IPv4 as itself, even seen through an IPv6
    socket) and port."""
    address = ipaddress.ip_address(host.partition("%")[0])
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return str(address), port


def _endpoint(host: str, port: int) -> tuple[bytes | None, int]:
    """An on-ramp's (address, port) as flows see it; None for a wildcard address."""
    address = ipaddress.ip_address(host)
    return (None if address.is_unspecified else address.packed), port


@register("gue")
class GueOnramp:
    kind: ClassVar[str]

    def __init__(self, name: str, sock: socket.socket, wiring: Wiring) -> None:
        # The supervisor's settings of the on-ramp as it was bound: never serve a GUE socket
        # without its allow and tenant lists.
        conf = wiring.settings.gue.get(name)
        if conf is None:
            raise OnrampUnusable(f"GUE on-ramp {name}: no settings came with its socket")
        self.name = name
        self.worker = wiring.worker
        self.sock = sock
        self.log = wiring.log
        self.allow = [ipaddress.ip_network(n) for n in conf.allow]
        self.tenants = set(conf.tenants)
        self.anycast = conf.anycast
        self.endpoints = (_endpoint(*conf.address),)
        self.parse_context = wiring.app_parse_context  # the application's (sync or async)
        self.on_packet = wiring.on_packet
        self._tunnels: dict[tuple, GueTunnel] = {}
        self._sites: dict[tuple[str, int], GueTunnel] = {}  # by sender: flows routed there
        self._sources: dict[str, bool] = {}
        self._contexts: dict[bytes, TunnelContext | str] = {}  # or the reason it was refused
        self._pending: set[bytes] = set()
        self._tasks: set[asyncio.Task] = set()  # async parse_context calls deciding
        self._loop = asyncio.get_running_loop()
        self._started = False

    def start(self) -> None:
        self.sock.setblocking(False)
        self._loop.add_reader(self.sock.fileno(), self._read)
        self._started = True

    def tunnels(self) -> Collection[GueTunnel]:
        return self._tunnels.values()

    def find(self, tunnel_id: int) -> None:
        """None: a GUE tunnel is steered (its flows are owned where the kernel delivered them),
        so no other worker answers it over the mesh."""
        return None

    def _read(self) -> None:
        for _ in range(BATCH):
            try:
                datagram, peer = self.sock.recvfrom(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. an ICMP error for a reply we sent: not fatal
                metrics.DROPS.labels("gue_receive_error").inc()
                self.log.debug("gue_receive_error", onramp=self.name, error=exc.strerror)
                continue
            self._datagram(datagram, peer)

    def _datagram(self, datagram: bytes, peer: tuple) -> None:
        allowed = self._sources.get(peer[0])
        if allowed is None:
            allowed = self._allowed(peer[0])
        if not allowed:
            metrics.DROPS.labels("gue_source_denied").inc()
            return
        try:
            raw, packet = gue.decapsulate(datagram)
        except gue.BadGue:
            metrics.DROPS.labels("bad_gue").inc()
            return
        tunnel = self._tunnels.get((peer, raw))
        if tunnel is None:
            if len(self._tunnels) >= MAX_TUNNELS:
                metrics.DROPS.labels("gue_tunnel_limit").inc()
                return
            tunnel = self._open(peer, raw)
            if tunnel is None:
                return
        tunnel.packets_in += 1
        tunnel.last_seen = time.monotonic()
        self.on_packet(tunnel, packet)

    def _allowed(self, host: str) -> bool:
        if len(self._sources) >= MAX_CACHED:
            self._sources.clear()
        address = ipaddress.ip_address(host.partition("%")[0])
        if address.version == 6 and address.ipv4_mapped:
            address = address.ipv4_mapped
        ok = not self.allow or any(address in net for net in self.allow)
        self._sources[host] = ok
        return ok

    def _open(self, peer: tuple, raw: bytes) -> GueTunnel | None:
        context = self._contexts.get(raw)
        if context is None:
            context = self._decide(raw)
            if context is None:
                metrics.DROPS.labels("gue_context_pending").inc()  # an async hook decides
                return None
        if isinstance(context, str):
            metrics.DROPS.labels(context).inc()
            return None
        tunnel = GueTunnel(self.name, self.worker, self.sock, peer, context,
                           vnet=raw.startswith(gue.VNET_MAGIC), anycast=self.anycast)
        site = self._sites.get(_sender(peer[0], peer[1])) if self._sites else None
        if site is not None and site.tenant == tunnel.tenant:
            tunnel.site = site.site  # the site's device: its answers are its routes' flows'
            site.vnet = tunnel.vnet  # and it speaks this framing: so do we, to it
        self._tunnels[(peer, raw)] = tunnel
        metrics.GUE_TUNNELS.inc()
        self.log.debug("gue_tunnel_open", tunnel=tunnel.id, onramp=self.name,
                       tenant=context.tenant, peer=f"{peer[0]}:{peer[1]}")
        return tunnel

    def site_tunnel(self, name: str, tenant: str, sender: tuple[str, int]) -> GueTunnel:
        """The tunnel flows routed to the configured site ``name`` are sent into: GUE from this
        worker's socket to ``sender``. Plain GUE until the site has spoken (then its framing)."""
        host, port = sender
        family = self.sock.family
        peer: tuple = (host, port) if family == socket.AF_INET else (host, port, 0, 0)
        if family == socket.AF_INET6 and ":" not in host:
            peer = (f"::ffff:{host}", port, 0, 0)
        tunnel = GueTunnel(self.name, self.worker, self.sock, peer,
                           TunnelContext(tenant, {"site": name}), anycast=self.anycast)
        tunnel.site = name
        self._sites[_sender(host, port)] = tunnel
        return tunnel

    def _decide(self, raw: bytes) -> TunnelContext | str | None:
        """The context of ``raw`` (cached), the drop reason, or None while an async hook runs."""
        try:
            # The offload option's mark is the transport's, not the application's.
            result = self.parse_context(raw.removeprefix(gue.VNET_MAGIC))
        except Exception as exc:
            return self._remember(raw, exc)
        if inspect.isawaitable(result):
            if raw not in self._pending and len(self._pending) < MAX_PENDING:
                self._pending.add(raw)
                task = self._loop.create_task(self._decide_later(raw, result))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif inspect.iscoroutine(result):
                result.close()  # already being decided: never awaited, never warned about
            return None
        return self._remember(raw, result)

    async def _decide_later(self, raw: bytes, pending) -> None:
        try:
            result = await pending
        except Exception as exc:
            result = exc
        finally:
            self._pending.discard(raw)
        self._remember(raw, result)

    def _remember(self, raw: bytes, result) -> TunnelContext | str:
        if len(self._contexts) >= MAX_CACHED:
            self._contexts.clear()
        if not isinstance(result, TunnelContext):
            reason = str(result) if isinstance(result, Exception) else f"not a context: {result!r}"
            self.log.info("gue_context_refused", onramp=self.name, reason=reason)
            outcome: TunnelContext | str = "gue_bad_context"
        elif self.tenants and result.tenant not in self.tenants:
            self.log.info("gue_unknown_tenant", onramp=self.name, tenant=result.tenant)
            outcome = "gue_unknown_tenant"
        else:
            outcome = result
        self._contexts[raw] = outcome
        return outcome

    def sweep(self, in_use: Callable[[], Set[int]]) -> None:
        """Forget the senders idle for ``IDLE`` seconds that no flow refers to (``in_use()``:
        their ids, asked for only when some sender is idle)."""
        cutoff = time.monotonic() - IDLE
        idle = [(key, t) for key, t in self._tunnels.items() if t.last_seen < cutoff]
        if not idle:
            return
        used = in_use()
        for key, tunnel in idle:
            if tunnel.id not in used:
                del self._tunnels[key]
                tunnel.close()
                metrics.GUE_TUNNELS.dec()
                metrics.TUNNELS_CLOSED.labels("gue_idle").inc()

    def reset_contexts(self) -> None:
        """A new application (reload): contexts are judged again."""
        self._contexts.clear()

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self._started:
            self._loop.remove_reader(self.sock.fileno())
            self._started = False
        for tunnel in self._tunnels.values():
            tunnel.close()
        metrics.GUE_TUNNELS.dec(len(self._tunnels))
        self._tunnels.clear()
        if left := await drain_tasks(self._tasks, timeout):
            self.log.warning("onramp_tasks_left", onramp=self.name, tasks=left)


if TYPE_CHECKING:  # mypy checks that both keep to their Protocols
    def _conforms(onramp: GueOnramp, tunnel: GueTunnel) -> tuple[Onramp, Tunnel]:
        return onramp, tunnel
