"""Publishing a device's service: a TCP listener whose connections go, whole, to one upstream.

The on-ramp of config kind ``tcp``. Every worker accepts on the one listener the supervisor bound
(the kernel gives each connection to one of them). A connection from a source outside the
on-ramp's ``allow`` list is closed at once. With ``proxy_protocol``, a PROXY v2 header
(:mod:`ipferry.wire.proxy`) must come first: its source is the client that hooks, rules and audit
see (a LOCAL header, a balancer's health check, leaves the connection's own). The header is read
without taking a byte of what follows: at most what :func:`~ipferry.wire.proxy.parse_v2` says it
still needs, so the client's first bytes stay in the socket for the relay. Connections waiting for
their header are capped (:data:`MAX_PENDING`) and timed out (:data:`HEADER_TIMEOUT`).

Then the socket is handed to the data path, ``Wiring.on_stream(tenant, sock, client, upstream,
onramp)``, whose it is from then on. This on-ramp holds no IP tunnel. Refusals are counted in
``ipferry_tunnels_closed_total`` (reasons ``tcp_*``) and logged at most once a minute each.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import TYPE_CHECKING, ClassVar

from ipferry.wire import proxy

from .. import metrics
from . import STOP_TIMEOUT, OnrampUnusable, Wiring, register
from .listening import ListeningOnramp

if TYPE_CHECKING:
    from . import Onramp

BATCH = 64
HEADER_TIMEOUT = 5.0  # a connection whose PROXY header is not all there by then is closed
MAX_PENDING = 1024  # per worker and on-ramp: connections waiting for their PROXY header


def _endpoint(host: str, port: int) -> tuple[bytes | None, int]:
    """An on-ramp's (address, port) as flows see it; None for a wildcard address."""
    address = ipaddress.ip_address(host)
    return (None if address.is_unspecified else address.packed), port


def _plain(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as rules see it: no IPv6 scope, an IPv4-mapped IPv6 address as IPv4."""
    address = ipaddress.ip_address(host.partition("%")[0])
    if address.version == 6 and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class _Pending:
    """An accepted connection whose PROXY header is not all there yet."""

    __slots__ = ("sock", "peer", "buf", "need", "timer")

    def __init__(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        self.sock = sock
        self.peer = peer
        self.buf = bytearray()
        self.need = proxy.FIXED  # bytes of header, in all, to read before asking the parser again
        self.timer: asyncio.TimerHandle | None = None


@register("tcp")
class TcpOnramp(ListeningOnramp):
    """Accepts on a shared TCP listener; each connection becomes one stream to ``upstream``."""

    kind: ClassVar[str]
    refused_counter = metrics.TUNNELS_CLOSED
    refused_event = "tcp_connection_refused"

    def __init__(self, name: str, listener: socket.socket, wiring: Wiring, *,
                 header_timeout: float = HEADER_TIMEOUT, max_pending: int = MAX_PENDING) -> None:
        super().__init__()
        # The supervisor's settings of the on-ramp as it was bound: never serve a listener
        # without its tenant, upstream and allow list.
        conf = wiring.settings.tcp.get(name)
        if conf is None:
            raise OnrampUnusable(f"TCP on-ramp {name}: no settings came with its socket")
        self.name = name
        self.listener = listener
        self.log = wiring.log
        self.tenant = conf.tenant
        self.upstream = conf.upstream
        self.proxy_protocol = conf.proxy_protocol
        self.allow = [ipaddress.ip_network(n) for n in conf.allow]
        self.endpoints = (_endpoint(*conf.address),)
        self.on_stream = wiring.on_stream
        self.header_timeout = header_timeout
        self.max_pending = max_pending
        self._pending: dict[int, _Pending] = {}  # by fd

    # -- the Onramp protocol (start, tunnels, find, sweep: ListeningOnramp) ----------------

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Accept no more and close the connections still waiting for a header (those handed
        over are the data path's). No task of its own to wait for."""
        self._stop_accepting()
        for pending in list(self._pending.values()):
            self._drop(pending)

    @property
    def pending(self) -> int:
        """Connections waiting for their PROXY header."""
        return len(self._pending)

    # -- accepting -------------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(BATCH):
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # another worker took it
            except ConnectionAbortedError:
                continue  # reset before we took it
            except OSError as exc:  # e.g. out of fds: the connection waits in the backlog
                self._refused("tcp_accept_failed", error=exc.strerror)
                return
            sock.setblocking(False)
            client = (str(_plain(peer[0])), peer[1])
            if self.allow and not any(_plain(peer[0]) in net for net in self.allow):
                sock.close()
                self._refused("tcp_source_denied", source=client[0])
                continue
            if not self.proxy_protocol:
                self._hand(sock, client)
                continue
            if len(self._pending) >= self.max_pending:
                sock.close()
                self._refused("tcp_pending_limit", limit=self.max_pending)
                continue
            pending = _Pending(sock, client)
            self._pending[sock.fileno()] = pending
            self._loop.add_reader(sock.fileno(), self._read_header, pending)
            pending.timer = self._loop.call_later(self.header_timeout, self._overdue, pending)

    def _read_header(self, pending: _Pending) -> None:
        """Read what the header still needs (never past it) and parse what came so far."""
        while True:
            try:
                chunk = pending.sock.recv(pending.need - len(pending.buf))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._drop(pending)
                self._refused("tcp_no_proxy_header", source=pending.peer[0], error=exc.strerror)
                return
            if not chunk:
                self._drop(pending)
                self._refused("tcp_no_proxy_header", source=pending.peer[0],
                              error="closed before its PROXY header")
                return
            pending.buf += chunk
            try:
                header = proxy.parse_v2(pending.buf)
            except proxy.BadProxyHeader as exc:
                self._drop(pending)
                self._refused("tcp_bad_proxy_header", source=pending.peer[0], error=str(exc))
                return
            if isinstance(header, proxy.NeedMore):
                pending.need = header.total
                continue
            self._forget(pending)
            client = pending.peer
            if header.command == proxy.Command.PROXY and header.src is not None:
                client = (str(_plain(header.src[0])), header.src[1])
            self._hand(pending.sock, client)
            return

    def _overdue(self, pending: _Pending) -> None:
        if self._pending.get(pending.sock.fileno()) is pending:
            got = len(pending.buf)
            self._drop(pending)
            self._refused("tcp_header_timeout", source=pending.peer[0],
                          error=f"{got} bytes of a PROXY header in {self.header_timeout:g} s")

    def _forget(self, pending: _Pending) -> None:
        """Stop watching a waiting connection (its socket stays open)."""
        del self._pending[pending.sock.fileno()]
        self._loop.remove_reader(pending.sock.fileno())
        if pending.timer is not None:
            pending.timer.cancel()

    def _drop(self, pending: _Pending) -> None:
        self._forget(pending)
        pending.sock.close()

    def _hand(self, sock: socket.socket, client: tuple[str, int]) -> None:
        """The connection to the data path, whose it is from now on."""
        if self.on_stream is None:
            sock.close()
            self._refused("tcp_no_datapath")
            return
        try:
            self.on_stream(self.tenant, sock, client, self.upstream, self.name)
        except Exception as exc:  # the data path's bug: this connection only
            sock.close()
            self._refused("tcp_datapath_error", source=client[0], error=str(exc), exc_info=True)


if TYPE_CHECKING:  # mypy checks that it keeps to the Protocol
    def _conforms(onramp: TcpOnramp) -> Onramp:
        return onramp
