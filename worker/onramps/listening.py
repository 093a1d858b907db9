"""What the on-ramps on a shared TCP listener (``tcp``, ``http``) have in common.

They hold no IP tunnel (the data path's flows show their connections), accept when the listener
is readable (every worker accepts on the one socket the supervisor bound: the kernel gives each
connection to one of them), and count every refused connection while warning of each reason at
most once a minute, with how many more were refused since (a flood must not flood the log).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Collection, Set
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..tunnels import Tunnel

LOG_EVERY = 60.0  # a refusal's warning, at most this often per reason (the counter has them all)


class ListeningOnramp:
    """The shared part: ``start``, the tunnel-less parts of the Onramp protocol, and
    :meth:`_refused`. A subclass sets the attributes below and writes ``_accept`` and
    ``stop`` (calling :meth:`_stop_accepting`)."""

    name: str
    listener: socket.socket
    log: Any
    refused_counter: Any  # a labelled Counter, by reason
    refused_event: str  # the warning's event name ("tcp_connection_refused", ...)

    def __init__(self) -> None:
        self._logged: dict[str, tuple[float, int]] = {}  # reason: (last warned, refused since)
        self._loop = asyncio.get_running_loop()
        self._started = False

    def start(self) -> None:
        self.listener.setblocking(False)
        self._loop.add_reader(self.listener.fileno(), self._accept)
        self._started = True

    def _stop_accepting(self) -> None:
        if self._started:
            self._loop.remove_reader(self.listener.fileno())
            self._started = False

    def _accept(self) -> None:
        raise NotImplementedError

    def tunnels(self) -> Collection[Tunnel]:
        return ()  # streams, not IP tunnels: the data path's flows show them

    def find(self, tunnel_id: int) -> None:
        return None

    def sweep(self, in_use: Callable[[], Set[int]]) -> None:
        """Nothing to forget: a connection is the data path's (or its task's) once taken."""

    def reset_contexts(self) -> None:
        """Nothing to judge again: the tenant is the config's, not a context's."""

    def _refused(self, reason: str, **fields: object) -> None:
        """Counted (``refused_counter``) every time; warned of at most once every :data:`LOG_EVERY`
        seconds per reason, with how many more were refused since the last warning."""
        self.refused_counter.labels(reason).inc()
        now = time.monotonic()
        last, since = self._logged.get(reason, (None, 0))
        if last is not None and now - last < LOG_EVERY:
            self._logged[reason] = (last, since + 1)
            return
        self._logged[reason] = (now, 0)
        self.log.warning(self.refused_event, onramp=self.name, reason=reason,
                         unlogged_since=since, **fields)
