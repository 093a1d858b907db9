"""The worker pool: a slot per worker index, each with the process it has now (or none).

A slot's process is started, equipped (the on-ramps, its block's TUN and upgrade listeners, a
link to nsd, links to every other worker), restarted after an exponential backoff when it dies
(too many deaths in a window: a crash loop, which stops the daemon) and restarted at once when
an operator asks. A worker that dies (even ``kill -9``) gets the same on-ramp listeners, TUN and
upgrade listeners back (the supervisor holds them), a fresh nsd link and fresh mesh links to every
other worker; the others are not touched.

Whatever changes a slot runs in the supervisor's loop, as the handler of an event (see
``arbiter.py``); the tasks started here (an equip's request for an nsd link, reading a child's
messages) only post events. :meth:`WorkerPool.ask_workers` is the one way to ask the workers
something.

Routes of private networks (``routes.py``): a worker asks for a tunnel's prefixes with the
request ``claim_routes`` {tunnel, tenant, prefixes, vnet} and is answered ``routes_claimed``
{prefixes} or ``error`` {error}; it lets them go with ``release_routes`` {tunnel} (no answer).
Every change is then told to every equipped worker, the claimant too, in ``routes`` {add,
remove} messages (route dicts {tenant, prefix, worker, tunnel, vnet}; a worker applies
``remove`` before ``add``); a worker that exits loses its routes, told to the others the same
way. ``equip`` carries ``routes``: every tunnel route (those that do not fit follow at once in
``routes`` messages). Route messages to one worker go out in order (:class:`Feed`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ipferry.nsd.addressing import WorkerBlock
from ipferry.runtime import fdpass

from .children import ChildProcess, Restarts, State
from .routes import Route, RouteRefused

ROUTES_PER_MESSAGE = 1000  # route dicts in one ``routes`` message (at most ~200 bytes each)
FEED_TIMEOUT = 10.0  # seconds a worker may leave its route messages unread, then it is restarted

if TYPE_CHECKING:
    from .arbiter import Supervisor


@dataclass
class WorkerSlot:
    index: int
    block: WorkerBlock
    restarts: Restarts
    equipment: dict[str, int] = field(default_factory=dict)  # tun, upgrade4, upgrade6: ours to keep
    child: ChildProcess | None = None
    state: State = State.STARTING
    restart_count: int = 0
    started_at: float | None = None
    planned_restart: bool = False
    equipped: bool = False  # holds its fds and mesh links (a replacement starts without)
    audit_error: str | None = None  # its audit sink fails (the worker said so), else None
    feed: Feed | None = None  # route messages to its process, in order

    def as_dict(self) -> dict:
        return {"index": self.index, "pid": self.child.pid if self.child else None,
                "state": str(self.state), "restarts": self.restart_count,
                "started_at": self.started_at, "tun": self.block.tun_name,
                "audit_error": self.audit_error}


Body = dict | Callable[[int], dict] | None  # one body for every worker, or one by worker index


class Feed:
    """Messages to one worker process that must arrive in order (route updates, the answers to
    its claims): sent at once while its channel takes them, else queued and sent by a task as
    room comes. A worker that takes none for :data:`FEED_TIMEOUT` is killed (and restarted with
    a fresh ``equip``): its routes would be wrong."""

    def __init__(self, sup: Supervisor, child: ChildProcess) -> None:
        self.sup = sup
        self.child = child
        self.queue: deque[tuple[str, dict]] = deque()
        self.task: asyncio.Task | None = None

    def send(self, type_: str, body: dict) -> None:
        if not self.queue:
            try:
                return self.child.channel.send(type_, body)
            except fdpass.ChannelBusy:
                pass
            except fdpass.ChannelClosed:
                return  # it is dying: its exit withdraws its routes
        self.queue.append((type_, body))
        if self.task is None:
            self.task = self.sup.spawn(self._drain())

    async def _drain(self) -> None:
        try:
            while self.queue:
                type_, body = self.queue[0]
                await self.child.channel.send_when_ready(type_, body, FEED_TIMEOUT)
                self.queue.popleft()
        except fdpass.ChannelBusy:
            self.sup.log.error("worker_stuck", worker=self._index(), queued=len(self.queue))
            self.child.signal(signal.SIGKILL)
        except fdpass.ChannelClosed:
            pass
        finally:
            self.queue.clear()
            self.task = None

    def _index(self) -> int | None:
        slot = self.sup.pool.slot_of(self.child)
        return slot.index if slot else None


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63


def route_messages(add: list[Route], remove: list[Route]) -> list[dict]:
    """``routes`` bodies for a change, each of at most :data:`ROUTES_PER_MESSAGE` routes: the
    removals first (a route removed and added again, e.g. its ``vnet`` changed, ends added)."""
    items = [("remove", r.wire()) for r in remove] + [("add", r.wire()) for r in add]
    out = []
    for i in range(0, len(items), ROUTES_PER_MESSAGE):
        body: dict[str, list] = {"add": [], "remove": []}
        for key, route in items[i:i + ROUTES_PER_MESSAGE]:
            body[key].append(route)
        out.append(body)
    return out


def _fitting(routes: list[dict], budget: int) -> int:
    """How many of ``routes`` fit ``budget`` bytes of JSON (and one message's count)."""
    used = 0
    for n, route in enumerate(routes[:ROUTES_PER_MESSAGE]):
        used += len(json.dumps(route, separators=(",", ":"))) + 1
        if used > budget:
            return n
    return min(len(routes), ROUTES_PER_MESSAGE)


class WorkerPool:
    def __init__(self, sup: Supervisor, blocks: list[WorkerBlock]) -> None:
        self.sup = sup
        self.log = sup.log
        self.slots = [WorkerSlot(i, b, sup.restarts()) for i, b in enumerate(blocks)]

    # -- what others read --------------------------------------------------------------------

    def live(self) -> list[tuple[int, ChildProcess]]:
        """The ready workers, in index order, with the process each has now."""
        return [(w.index, w.child) for w in self.slots
                if w.child and w.child.alive and w.state is State.READY]

    def ready_count(self) -> int:
        return sum(w.state is State.READY for w in self.slots)

    def slot_of(self, child: ChildProcess) -> WorkerSlot | None:
        return next((w for w in self.slots if w.child is child), None)

    # -- asking the workers ------------------------------------------------------------------

    async def ask_workers(self, request: str, body: Body = None, *, timeout: float = 2.0,
                          parts: str | None = None,
                          workers: list[tuple[int, ChildProcess]] | None = None) -> dict[int, Any]:
        """One request to every ready worker (or to ``workers``), concurrently: by index, the
        reply (maybe an ``error``), or with ``parts`` the list collected under that key (see
        :meth:`ask_worker`); None for a worker that did not answer."""
        workers = self.live() if workers is None else workers

        async def one(index: int, child: ChildProcess) -> tuple[int, Any]:
            each = body(index) if callable(body) else body
            return index, await self.ask_worker(child, request, each, timeout=timeout, parts=parts)

        return dict(await asyncio.gather(*(one(i, c) for i, c in workers)))

    async def ask_worker(self, child: ChildProcess, request: str, body: dict | None = None, *,
                         timeout: float = 2.0, parts: str | None = None,
                         max_parts: int = 10_000) -> Any:
        """One request to one worker: its reply (maybe an ``error``), or None (gone, too slow).

        With ``parts``: a list the worker hands out in parts (tunnels, metrics: see
        ``worker/views.py``), asked for one part at a time so that no reply can outgrow a control
        message; the list under key ``parts`` of every part, or None when a part did not come
        within ``timeout``."""
        if parts is None:
            try:
                return await child.channel.request(request, body, timeout=timeout)
            except (fdpass.ChannelClosed, fdpass.ProtocolError, TimeoutError):
                return None
        out: list = []
        body = dict(body or {})
        for _ in range(max_parts):
            reply = await self.ask_worker(child, request, body, timeout=timeout)
            if reply is None or reply.type != request:
                return None
            out += reply.get(parts) or []
            if reply.get("next") is None:
                return out
            body = {**body, "snapshot": reply.get("snapshot"), "start": reply["next"]}
        return None

    async def mesh_report(self, timeout: float = 5.0) -> dict:
        """Ask each ready worker to ping its peers over the mesh; whole when all answer right."""
        replies = await self.ask_workers("mesh_check", timeout=timeout)
        report = {i: r["peers"] if r is not None and r.type == "mesh" else None
                  for i, r in replies.items()}
        n = len(self.slots)
        whole = len(report) == n and all(
            peers is not None and {int(p): a for p, a in peers.items()}
            == {j: j for j in range(n) if j != i}
            for i, peers in report.items())
        return {"whole": whole, "workers": {str(i): peers for i, peers in report.items()}}

    # -- starting and equipping (event handlers and what they start) -------------------------

    def start(self, slot: WorkerSlot) -> None:
        """Start the slot's process; it is equipped once nsd can give it a link."""
        slot.state = State.STARTING
        slot.equipped = False
        slot.audit_error = None  # a new process opens the sink afresh
        try:
            slot.child = ChildProcess(["ipferry.worker", "--index", str(slot.index),
                                       *self.sup.log_args()], self.sup.on_child_exit)
        except OSError as exc:
            # E.g. EMFILE: our fds are exhausted for now. A failed start, counted as a death.
            slot.child = None
            delay = slot.restarts.record_death()
            self.log.error("worker_start_failed", worker=slot.index, error=str(exc),
                           errno=exc.errno, restart_in=delay)
            if delay is None:
                return self.sup.crash_loop(f"worker {slot.index}", slot)
            self.schedule_respawn(slot, delay)
            return
        slot.started_at = time.time()
        self.sup.spawn(self._read(slot.child))
        if self.sup.nsd.ready:
            self.equip(slot)

    def renew(self) -> None:
        """nsd is ready (started, or rebuilt): start every slot without a process, re-equip the
        others in place with the new TUN, upgrade listeners and nsd link (they keep their pids,
        on-ramps and mesh)."""
        for w in self.slots:
            if w.child is None:
                if w.state is State.BACKOFF:
                    w.restart_count += 1
                    self.sup.metrics.worker_restarts.labels(str(w.index)).inc()
                self.start(w)
            else:
                w.state = State.STARTING
                self.equip(w)

    def equip(self, slot: WorkerSlot) -> None:
        """Ask nsd for a link for the slot's worker; the answer comes back as an event."""
        child, nsd = slot.child, self.sup.nsd.child
        if child is not None and nsd is not None:
            self.sup.spawn(self._open_nsd_link(slot, child, nsd))

    async def _open_nsd_link(self, slot: WorkerSlot, child: ChildProcess,
                             nsd: ChildProcess) -> None:
        try:
            reply = await nsd.channel.request("open_channel", {"worker": slot.index})
            result: int | Exception = reply.take_fd("nsd")
        except (fdpass.ChannelClosed, TimeoutError, KeyError) as exc:
            result = exc
        self.sup.post("nsd_link", slot, child, nsd, result)

    def linked(self, slot: WorkerSlot, child: ChildProcess, nsd: ChildProcess,
               result: int | Exception) -> None:
        """An nsd link for ``child`` (or why there is none): send it its equipment."""
        if isinstance(result, Exception):
            if nsd is self.sup.nsd.child and nsd.alive and slot.child is child:
                # nsd is alive yet did not answer: the worker would never be ready. Count it as
                # a death, restarted with backoff (and a crash loop if it keeps happening).
                self.log.error("equip_failed", worker=slot.index, error=repr(result))
                child.signal(signal.SIGKILL)
            return
        try:
            # A newer process, or a newer nsd (which re-equips every worker): not this link's.
            if (slot.child is child and child.alive and nsd is self.sup.nsd.child
                    and self.sup.nsd.ready and not self.sup.stopping):
                self._send_equipment(slot, child, result)
        finally:
            os.close(result)

    def _send_equipment(self, slot: WorkerSlot, child: ChildProcess, nsd_fd: int) -> None:
        """On-ramps, TUN, upgrade listeners, the nsd link and, for a worker that has none yet,
        mesh links to every equipped worker (those equipped later link to it themselves)."""
        fds = {name: fd for o in self.sup.onramps for name, fd in o.fds_for(slot.index).items()}
        fds.update(slot.equipment)
        fds["nsd"] = nsd_fd
        peers: list[tuple[ChildProcess, Any, Any]] = []
        try:
            if not slot.equipped:
                for other in self.slots:
                    if other is slot or not (other.equipped and other.child
                                             and other.child.alive):
                        continue
                    ours, theirs = fdpass.channel_pair()
                    fds[f"mesh:{other.index}"] = ours.fileno()
                    peers.append((other.child, ours, theirs))
            body = {"block": slot.block.as_dict(), "onramps": [o.name for o in self.sup.onramps],
                    "settings": self.sup.worker_settings().dump()}
            routes = self.sup.routes.entries()
            first = _fitting(routes, fdpass.MAX_MESSAGE - len(json.dumps(body)) - 4096)
            child.channel.send("equip", {**body, "routes": routes[:first]}, fds)
            slot.equipped = True
            for i in range(first, len(routes), ROUTES_PER_MESSAGE):
                self.feed(slot).send("routes", {"add": routes[i:i + ROUTES_PER_MESSAGE],
                                                "remove": []})
            for peer, _, theirs in peers:
                try:
                    peer.channel.send("mesh_peer", {"peer": slot.index},
                                             {f"mesh:{slot.index}": theirs.fileno()})
                except fdpass.ChannelClosed:
                    pass  # that peer is dying; its replacement gets a new link
        except fdpass.ChannelClosed:
            child.signal(signal.SIGKILL)  # a worker that cannot take its fds is restarted
        except OSError as exc:
            # E.g. EMFILE making its mesh links: it would never be whole. Restarted with backoff.
            self.log.error("equip_failed", worker=slot.index, error=str(exc), errno=exc.errno)
            child.signal(signal.SIGKILL)
        finally:
            for _, ours, theirs in peers:
                ours.close()
                theirs.close()

    async def _read(self, child: ChildProcess) -> None:
        """What a worker says on its control channel, posted as events (``ready``, ``audit``)."""
        while (msg := await child.channel.inbox.get()) is not None:
            msg.close_fds()
            self.sup.post("child_said", child, msg.type, dict(msg.body))

    def heard(self, child: ChildProcess, kind: str, body: dict) -> None:
        slot = self.slot_of(child)
        if slot is None:
            return  # a process the slot no longer has
        if kind == "claim_routes":
            return self.claim_routes(slot, body)
        if kind == "release_routes":
            return self.release_routes(slot, body)
        if kind == "ready" and slot.state is State.STARTING:
            slot.state = State.READY
            self.log.info("worker_ready", worker=slot.index, pid=child.pid)
            self.sup.notifier.status(self.sup.status_line())
        elif kind == "audit":
            error = body.get("error")
            slot.audit_error = str(error)[:200] if error is not None else None
            self.log.warning("audit_sink_state", worker=slot.index,
                             sink=self.sup.config.audit.sink, error=slot.audit_error)
            self.sup.notifier.status(self.sup.status_line())

    # -- routes of private networks ----------------------------------------------------------

    def feed(self, slot: WorkerSlot) -> Feed:
        """The ordered feed of route messages to the slot's process now."""
        assert slot.child is not None
        if slot.feed is None or slot.feed.child is not slot.child:
            slot.feed = Feed(self.sup, slot.child)
        return slot.feed

    def claim_routes(self, slot: WorkerSlot, body: dict) -> None:
        """A worker's request for a tunnel's prefixes: answered, then told to every worker."""
        request_id = body.get("id")
        if not _int(request_id):
            self.log.warning("bad_route_message", worker=slot.index, type="claim_routes",
                             error="no request id")
            return
        tunnel: Any = body.get("tunnel")
        tenant: Any = body.get("tenant")
        prefixes: Any = body.get("prefixes")
        vnet: Any = body.get("vnet", False)
        if not _int(tunnel):
            problem = "tunnel must be an integer >= 0"
        elif not isinstance(tenant, str):
            problem = "tenant must be a string"
        elif not (isinstance(prefixes, list) and all(isinstance(p, str) for p in prefixes)):
            problem = "prefixes must be a list of strings"
        elif not isinstance(vnet, bool):
            problem = "vnet must be true or false"
        else:
            problem = None
        feed = self.feed(slot)
        if problem is not None:
            feed.send("error", {"error": f"bad claim_routes: {problem}", "reply_to": request_id})
            return
        old = self.sup.routes.held(slot.index, tunnel)
        try:
            new = self.sup.routes.claim(slot.index, tunnel, tenant, prefixes, vnet)
        except RouteRefused as exc:
            self.log.info("routes_refused", worker=slot.index, tunnel=tunnel, tenant=tenant[:64],
                          reason=str(exc))
            feed.send("error", {"error": str(exc), "reply_to": request_id})
            return
        self.log.info("routes_claimed", worker=slot.index, tunnel=tunnel, tenant=tenant,
                      prefixes=[r.prefix for r in new])
        feed.send("routes_claimed", {"prefixes": [r.prefix for r in new], "reply_to": request_id})
        self.tell_routes([r for r in new if r not in old], [r for r in old if r not in new])

    def release_routes(self, slot: WorkerSlot, body: dict) -> None:
        """A worker lets a tunnel's routes go (it closed): told to every worker."""
        tunnel: Any = body.get("tunnel")
        if not _int(tunnel):
            self.log.warning("bad_route_message", worker=slot.index, type="release_routes",
                             error="tunnel must be an integer >= 0")
            return
        removed = self.sup.routes.withdraw(slot.index, tunnel)
        if removed:
            self.log.info("routes_released", worker=slot.index, tunnel=tunnel,
                          prefixes=[r.prefix for r in removed])
        self.tell_routes([], removed)

    def tell_routes(self, add: list[Route], remove: list[Route]) -> None:
        """A change of routes, to every equipped worker (those equipped later get them all)."""
        if not add and not remove:
            return
        bodies = route_messages(add, remove)
        for w in self.slots:
            if w.equipped and w.child is not None and w.child.alive:
                for body in bodies:
                    self.feed(w).send("routes", body)

    # -- deaths and restarts -----------------------------------------------------------------

    def died(self, child: ChildProcess) -> None:
        slot = self.slot_of(child)
        if slot is None:
            return
        slot.child = None
        slot.equipped = False
        slot.feed = None
        if removed := self.sup.routes.withdraw_worker(slot.index):
            self.log.info("routes_withdrawn", worker=slot.index, routes=len(removed))
            self.tell_routes([], removed)
        if slot.planned_restart:
            slot.planned_restart = False
            self.log.info("worker_restarting", worker=slot.index, pid=child.pid)
            self.schedule_respawn(slot, 0.0)
            return
        delay = slot.restarts.record_death()
        self.log.warning("worker_died", worker=slot.index, pid=child.pid,
                         status=child.returncode, restart_in=delay)
        if delay is None:
            return self.sup.crash_loop(f"worker {slot.index}", slot)
        self.schedule_respawn(slot, delay)

    def schedule_respawn(self, slot: WorkerSlot, delay: float) -> None:
        slot.state = State.BACKOFF
        self.sup.notifier.status(self.sup.status_line())
        asyncio.get_running_loop().call_later(delay, self.sup.post, "respawn", slot)

    def respawn(self, slot: WorkerSlot) -> None:
        if self.sup.stopping or slot.child is not None:
            return
        if not self.sup.nsd.ready:
            return  # nsd's success path (renew) starts every worker that has no process
        slot.restart_count += 1
        self.sup.metrics.worker_restarts.labels(str(slot.index)).inc()
        self.start(slot)

    def restart(self, index: int) -> WorkerSlot | None:
        """Admin-requested restart: a graceful stop, then an immediate start (no backoff).

        None when the worker has no running process to restart (it is in backoff or stopping).
        """
        slot = self.slots[index]
        if (slot.child is None or not slot.child.alive or slot.planned_restart
                or self.sup.stopping):
            return None
        slot.planned_restart = True
        slot.state = State.STOPPING
        self.sup.spawn(slot.child.stop(self.sup.stop_timeout, message="stop"))
        return slot

    # -- the end -----------------------------------------------------------------------------

    async def stop(self, timeout: float) -> None:
        """Stop every worker (bounded by ``timeout``, then SIGKILL) and let go of their fds."""
        children = [w.child for w in self.slots if w.child and w.child.alive]
        for w in self.slots:
            if w.state is not State.FAILED:
                w.state = State.STOPPING
        await asyncio.gather(*(c.stop(timeout, message="stop") for c in children))

    def release(self) -> None:
        for w in self.slots:
            for fd in w.equipment.values():
                os.close(fd)
            w.equipment = {}
            if w.state is not State.FAILED:
                w.state = State.STOPPED
