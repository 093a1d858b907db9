"""On-ramps: where a worker's IP tunnels come in; one class per ``kind`` of the config's on-ramps.

Each kind registers its class under the config's ``kind`` string (``@register("tunnel")``). The
supervisor passes every on-ramp's fd named ``onramp:<kind>:<name>`` (:mod:`ipferry.runtime.fdnames`);
:func:`resolve` reads the name and finds the kind's class, which the worker makes with what it
offers on-ramps (:class:`Wiring`) and from then on uses only through :class:`Onramp`. An fd of a
kind this worker does not know is refused (logged and closed), never guessed at.

Kinds: ``tunnel`` (:mod:`.seqpacket`, connected SOCK_SEQPACKET tunnels), ``gue`` (:mod:`.gue`,
GUE datagrams on a UDP socket) and ``tcp`` (:mod:`.tcp`, a device's service published: accepted
TCP connections, each handed whole to the data path as a stream, no IP tunnel).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Collection, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from ipferry.runtime import fdnames

if TYPE_CHECKING:
    from ipferry.runtime.settings import WorkerSettings

    from ..app import TunnelContext
    from ..tunnels import Tunnel

STOP_TIMEOUT = 2.0  # at stop, how long an on-ramp's own tasks (context hooks) may take to end


class OnrampRefused(ValueError):
    """An on-ramp fd this worker cannot take: a malformed name or an unknown kind."""


class OnrampUnusable(Exception):
    """An on-ramp that cannot be served as passed (e.g. a GUE socket without its settings)."""


# on_stream(tenant, sock, client, upstream, onramp): see Wiring.on_stream.
OnStream = Callable[[str, socket.socket, tuple[str, int], tuple[str, int], str], None]


@dataclass(frozen=True, slots=True)
class Wiring:
    """What the worker offers its on-ramps."""

    worker: int  # this worker's index: the ``origin`` of the tunnels it holds
    log: Any
    settings: WorkerSettings  # the worker's settings when the on-ramp was made
    # The application's parse_context, awaited and checked to return a TunnelContext.
    parse_context: Callable[[bytes], Awaitable[TunnelContext]]
    # The same hook as the application wrote it (sync or async), for an on-ramp that would rather
    # decide at once when it can (GUE decides on a packet's arrival).
    app_parse_context: Callable[[bytes], Any]
    on_packet: Callable[[Tunnel, bytes], None]  # a packet from a tunnel, for the flows
    on_close: Callable[[Tunnel, str], None]  # a tunnel flows used is gone (reason)
    # A TCP on-ramp's accepted connection, as on_stream(tenant, sock, client, upstream, onramp):
    # the socket (non-blocking, nothing of the client's stream read) becomes the callee's, to
    # close; ``client`` is who hooks, rules and audit see (the PROXY header's source, if one
    # came). None: no data path takes streams (the on-ramp closes them, counted).
    on_stream: OnStream | None = None
    # Claim the routes a tunnel's context names (``extra["routes"]``) before it opens; raises
    # ipferry.worker.routing.RouteRefused with the reason (the tunnel is refused). None: no claims.
    claim_routes: Callable[[Tunnel], Awaitable[None]] | None = None
    # An HTTP on-ramp's accepted connection, as serve_http(sock, served): served by the HTTP
    # layer until the client is done; True when the socket was handed on (a CONNECT's flow).
    serve_http: Callable[[socket.socket, Any], Awaitable[bool]] | None = None
    # A tunnel whose client passed its TUN: give the other workers one queue each, as
    # share_queues(tunnel, fds) (the fds become the callee's); returns those nobody took.
    share_queues: Callable[[Any, list[int]], list[int]] | None = None


class Onramp(Protocol):
    """An on-ramp as the worker uses it."""

    kind: ClassVar[str]  # the config's kind, its key in the registry

    @property
    def name(self) -> str: ...
    @property
    def endpoints(self) -> Collection[tuple[bytes | None, int]]:
        """(address, port) of the on-ramp itself, a None address for any: flows never go there."""

    def start(self) -> None:
        """Start taking tunnels (its socket is read from now on)."""

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Take no more; close every tunnel; cancel its own tasks and wait up to ``timeout`` for
        them to end. The socket stays open: it is the worker's (a re-equip reuses it)."""

    def tunnels(self) -> Collection[Tunnel]:
        """The tunnels it holds now."""

    def find(self, tunnel_id: int) -> Tunnel | None:
        """Its tunnel ``tunnel_id`` that other workers' flows may answer over the mesh."""

    def sweep(self, in_use: Callable[[], Set[int]]) -> None:
        """Forget idle tunnels no flow refers to (``in_use()``: the ids flows use, computed only
        if asked: it walks every flow)."""

    def reset_contexts(self) -> None:
        """A new application (reload): contexts already judged are judged again."""


OnrampClass = Callable[[str, socket.socket, Wiring], Onramp]
_KINDS: dict[str, OnrampClass] = {}
_C = TypeVar("_C")


def register(kind: str) -> Callable[[_C], _C]:
    """Class decorator: the on-ramp class of config ``kind``."""
    def add(cls: _C) -> _C:
        if kind in _KINDS and _KINDS[kind] is not cls:
            raise ValueError(f"on-ramp kind {kind!r} is registered twice")
        cls.kind = kind  # type: ignore[attr-defined]
        _KINDS[kind] = cls  # type: ignore[assignment]
        return cls
    return add


def kinds() -> list[str]:
    return sorted(_KINDS)


def resolve(fdname: str) -> tuple[str, OnrampClass]:
    """The on-ramp name and class an fd named ``fdname`` is for; :class:`OnrampRefused` if its
    name is malformed or its kind unknown here."""
    try:
        kind, name = fdnames.parse_onramp(fdname)
    except fdnames.BadFdName as exc:
        raise OnrampRefused(str(exc)) from None
    cls = _KINDS.get(kind)
    if cls is None:
        raise OnrampRefused(f"fd {fdname!r}: unknown on-ramp kind {kind!r} "
                            f"(this worker knows {', '.join(kinds())})")
    return name, cls


async def drain(tasks: set[asyncio.Task], timeout: float) -> int:
    """Cancel ``tasks`` and wait up to ``timeout`` for them to end; how many did not."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return 0
    _, pending = await asyncio.wait(set(tasks), timeout=timeout)
    return len(pending)


# The kinds register themselves on import.
from . import gue, http, seqpacket, tcp  # noqa: E402,F401,I001
