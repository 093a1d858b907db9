"""Keeping nsd: start it, walk its handshake, rebuild its namespace when it dies.

nsd builds the private namespace (user + network) with a TUN device and two upgrade listeners per
worker block, and hands those to the supervisor, which keeps them for the workers. If nsd dies, the
namespace is rebuilt by a new nsd (same blocks, same device names) after a backoff, and every live
worker is re-equipped in place (see ``WorkerPool.renew``); flows that lived in the old namespace
are lost with it. Too many deaths in a window: a crash loop, which stops the daemon.

As in the pool, whatever changes this state runs in the supervisor's loop; the handshake is a task
that only posts its outcome (``nsd_handshake``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import TYPE_CHECKING

from ipferry.nsd.namespace import HostError
from ipferry.runtime import fdpass

from .children import ChildProcess, State

if TYPE_CHECKING:
    from .arbiter import Supervisor

# What a handshake gives: nsd's namespaces (for the status) and each worker index's new fds.
Namespace = tuple[dict[str, str], dict[int, dict[str, int]]]


class NsdKeeper:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.log = sup.log
        self.restarts = sup.restarts()
        self.child: ChildProcess | None = None
        self.state = State.STARTING
        self.restart_count = 0
        self.started_at: float | None = None
        self.namespaces: dict[str, str] = {}
        self.handshake: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.state is State.READY and self.child is not None

    # -- starting (event handlers and the handshake they start) ------------------------------

    def start(self) -> None:
        """Spawn nsd and start its handshake; an OSError (e.g. EMFILE) leaves nothing behind."""
        self.state = State.STARTING
        self.child = ChildProcess(["ipferry.nsd", *self.sup.log_args()], self.sup.on_child_exit)
        self.handshake = self.sup.spawn(self._handshake(self.child))

    async def _handshake(self, child: ChildProcess) -> None:
        try:
            result: Namespace | Exception = await self._walk(child)
        except Exception as exc:  # HostError, ProtocolError, ChannelClosed; a bug, said as one
            result = exc
        self.sup.post("nsd_handshake", child, result)

    async def _walk(self, child: ChildProcess) -> Namespace:
        """nsd's handshake: hello, setup -> namespace_ready, a worker_equipment per worker,
        network_ready. Every step bounded by ``supervision.start_timeout``."""
        timeout = self.sup.config.supervision.start_timeout
        slots = self.sup.pool.slots

        async def expect(*types: str) -> fdpass.Message:
            try:
                msg = await asyncio.wait_for(child.channel.inbox.get(), timeout)
            except TimeoutError:
                raise HostError(f"nsd sent no {types[0]!r} within {timeout:g}s",
                                "see nsd's log lines; raise supervision.start_timeout on a "
                                "slow host") from None
            if msg is None:  # nsd exited, or spoke something that is not our protocol
                child.signal(signal.SIGKILL)
                await child.wait(5)
                raise HostError(f"nsd failed during start-up (exit status {child.returncode})",
                                "see nsd's log lines above")
            if msg.type == "error":
                raise HostError(msg["cause"], msg["fix"])
            if msg.type not in types:
                msg.close_fds()
                raise HostError(f"nsd sent {msg.type!r}, expected {types}", "a version mismatch?")
            return msg

        new: dict[int, dict[str, int]] = {}  # worker index -> its fds, ours once taken
        try:
            await expect("hello")
            ns = self.sup.config.namespace
            child.channel.send("setup", {"blocks": [w.block.as_dict() for w in slots],
                                         "mtu": ns.mtu, "offload": ns.offload,
                                         "sysctls": ns.sysctls})
            namespaces = (await expect("namespace_ready")).body
            for _ in slots:
                msg = await expect("worker_equipment")
                try:
                    index = int(msg["block"]["index"])
                    if set(msg.fds) != {"tun", "upgrade4", "upgrade6"} or index in new:
                        raise ValueError
                except (KeyError, TypeError, ValueError):
                    msg.close_fds()
                    raise fdpass.ProtocolError(f"malformed worker_equipment: {msg.body}") from None
                new[index] = dict(msg.fds)
            if set(new) != {w.index for w in slots}:
                raise fdpass.ProtocolError(f"nsd equipped workers {sorted(new)}")
            await expect("network_ready")
        except BaseException:  # cancelled at stop too: a half-started nsd is killed
            child.signal(signal.SIGKILL)
            _close(new)
            raise
        return dict(namespaces), new

    def handshake_done(self, child: ChildProcess, result: Namespace | Exception) -> bool:
        """The handshake's outcome; True when nsd is ready (then every worker is renewed)."""
        if isinstance(result, Exception):
            # Its exit event schedules the next try (and counts toward the crash loop).
            self.log.error("nsd_restart_failed", error=str(result))
            return False
        namespaces, new = result
        if child is not self.child or not child.alive or self.sup.stopping:
            _close(new)  # died since, or we are stopping: its exit event says the rest
            return False
        for w in self.sup.pool.slots:
            for fd in w.equipment.values():
                os.close(fd)  # the old namespace's devices go once the worker lets go too
            w.equipment = new[w.index]
        if self.started_at is not None:
            self.restart_count += 1
            self.sup.metrics.nsd_restarts.inc()
        self.state = State.READY
        self.started_at = time.time()
        self.namespaces = namespaces
        self.log.info("nsd_ready", pid=child.pid, **namespaces)
        self.sup.spawn(self._read(child))
        return True

    async def _read(self, child: ChildProcess) -> None:
        while (msg := await child.channel.inbox.get()) is not None:
            msg.close_fds()  # nsd says nothing the supervisor acts on after its handshake

    # -- deaths ------------------------------------------------------------------------------

    def died(self, child: ChildProcess) -> None:
        self.child = None
        delay = self.restarts.record_death()
        self.log.warning("nsd_died", pid=child.pid, status=child.returncode, restart_in=delay)
        self.backoff(delay)

    def backoff(self, delay: float | None) -> None:
        self.state = State.BACKOFF
        if delay is None:
            return self.sup.crash_loop("nsd", self)
        self.sup.notifier.status(self.sup.status_line())
        asyncio.get_running_loop().call_later(delay, self.sup.post, "rebuild_namespace")

    def rebuild(self) -> None:
        if self.sup.stopping or self.child is not None:
            return
        try:
            self.start()
        except OSError as exc:
            # Not spawned at all (e.g. EMFILE): no exit event comes, so count and retry here.
            self.child = None
            delay = self.restarts.record_death()
            self.log.error("nsd_start_failed", error=str(exc), errno=exc.errno, restart_in=delay)
            self.backoff(delay)

    # -- the end -----------------------------------------------------------------------------

    async def abandon_handshake(self) -> None:
        """At stop, first: a half-started nsd is killed (by _walk, on its way out)."""
        if self.handshake is not None and not self.handshake.done():
            self.handshake.cancel()
            await asyncio.gather(self.handshake, return_exceptions=True)

    async def stop(self, timeout: float) -> None:
        if self.child:
            await self.child.stop(timeout)


def _close(equipment: dict[int, dict[str, int]]) -> None:
    for fds in equipment.values():
        for fd in fds.values():
            os.close(fd)
