"""Keep-alive connections to upstreams, kept per (tenant, address, port) and bounded.

The HTTP layer's off-ramps are streams the data path dials as flows of the tenant (decided by
the flow rules and hooks, audited, downgraded into a device's tunnel when the address is one).
A connection whose exchange ended cleanly comes back here and serves the tenant's next request
to the same upstream; at most ``per_upstream`` wait per upstream and ``total`` in all (the
oldest goes first), each at most ``idle_timeout`` seconds. One that the upstream closed while it
waited is found out before it is used (a peek), never handed out.
"""

from __future__ import annotations

import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import h11

from .conn import HttpConn

__all__ = ["Dialed", "UpstreamKey", "Upstreams", "alive"]


class UpstreamKey(NamedTuple):
    tenant: str
    address: str
    port: int


class Dialed(NamedTuple):
    """A connected stream to an upstream, and the flow that carries it (its identity fields).
    ``release``, if given, hands the socket back to its owner (the data path, which closes it and
    ends the flow) instead of closing it."""

    sock: socket.socket
    flow: dict
    release: Callable[[], None] | None = None


class _Idle(NamedTuple):
    conn: HttpConn
    flow: dict
    since: float


# (tenant, client, upstream) -> a connected stream; raises Refused or OSError
Dial = Callable[[str, tuple[str, int], tuple[str, int]], Awaitable[Dialed]]


class Upstreams:
    def __init__(self, dial: Dial, *, per_upstream: int, total: int, idle_timeout: float,
                 max_head: int) -> None:
        self.dial = dial
        self.per_upstream = per_upstream
        self.total = total
        self.idle_timeout = idle_timeout
        self.max_head = max_head
        self._idle: OrderedDict[tuple[UpstreamKey, int], _Idle] = OrderedDict()  # oldest first
        self._by_key: dict[UpstreamKey, list[int]] = {}
        self._serial = 0
        self.reused = 0
        self.opened = 0

    def __len__(self) -> int:
        return len(self._idle)

    async def get(self, key: UpstreamKey, client: tuple[str, int]) -> tuple[HttpConn, dict, bool]:
        """A connection to ``key``'s upstream: an idle one (True) or a new one (False)."""
        now = time.monotonic()
        serials = self._by_key.get(key)
        while serials:
            idle = self._idle.pop((key, serials.pop()))
            if not serials:
                del self._by_key[key]
            if now - idle.since < self.idle_timeout and alive(idle.conn.sock):
                self.reused += 1
                return idle.conn, idle.flow, True
            idle.conn.close()
        dialed = await self.dial(key.tenant, client, (key.address, key.port))
        self.opened += 1
        return (HttpConn(dialed.sock, h11.CLIENT, max_head=self.max_head,
                         release=dialed.release), dialed.flow, False)

    def put(self, key: UpstreamKey, conn: HttpConn, flow: dict) -> None:
        """Keep ``conn`` (its exchange done) for the next request, or close it past the limits."""
        if not conn.reusable or self.per_upstream == 0 or self.total == 0:
            conn.close()
            return
        conn.h11.start_next_cycle()
        serials = self._by_key.setdefault(key, [])
        if len(serials) >= self.per_upstream:
            self._idle.pop((key, serials.pop(0))).conn.close()
        while len(self._idle) >= self.total:
            (old_key, serial), idle = self._idle.popitem(last=False)
            self._by_key[old_key].remove(serial)
            if not self._by_key[old_key]:
                del self._by_key[old_key]
            idle.conn.close()
        self._serial += 1
        serials = self._by_key.setdefault(key, [])
        serials.append(self._serial)
        self._idle[(key, self._serial)] = _Idle(conn, flow, time.monotonic())

    def sweep(self) -> int:
        """Close the connections idle past ``idle_timeout``; how many were."""
        cutoff = time.monotonic() - self.idle_timeout
        closed = 0
        while self._idle:
            (key, serial), idle = next(iter(self._idle.items()))
            if idle.since >= cutoff:
                break
            del self._idle[(key, serial)]
            self._by_key[key].remove(serial)
            if not self._by_key[key]:
                del self._by_key[key]
            idle.conn.close()
            closed += 1
        return closed

    def close(self) -> None:
        for idle in self._idle.values():
            idle.conn.close()
        self._idle.clear()
        self._by_key.clear()


def alive(sock: socket.socket) -> bool:
    """An idle connection the upstream has neither closed nor written to (a peek): bytes it
    sent unasked, or its EOF, make it useless for a next request."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return True  # nothing to read: open, and nothing unexpected
    except OSError:
        return False
    return False
