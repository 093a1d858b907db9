"""The supervisor's main loop: start nsd and the workers, keep them alive, reload, drain.

As in gunicorn's arbiter, signal handlers only queue an event; the loop dispatches
``handle_<event>`` and nothing else changes state. What it guarantees:

- A worker that dies (even ``kill -9``) is restarted after an exponential backoff with the same
  on-ramp listeners and the same TUN and upgrade listeners (the supervisor holds them), a fresh nsd
  link and fresh mesh links to every other worker. The others are not touched. More than
  ``crash_loop_limit`` deaths within ``crash_loop_window`` seconds stop the daemon (exit 1).
- If nsd dies, its namespace is rebuilt by a new nsd (same blocks, same device names), and every
  live worker is re-equipped in place with the new TUN, upgrade listeners and nsd link; workers keep
  their pids, on-ramps and mesh. Flows that lived in the old namespace are lost with it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field

import structlog

from ipferry.nsd.addressing import WorkerBlock
from ipferry.nsd.namespace import HostError
from ipferry.runtime import fdpass, logs
from ipferry.runtime.settings import WorkerSettings

from . import config as configmod
from .admin import AdminServer
from .children import ChildProcess, Restarts, State
from .listeners import Listener, ListenerError, open_onramps
from .metrics import ProcessInfo, SupervisorMetrics
from .notify import Notifier

LOOP_ERROR_INTERVAL = 10.0  # seconds between two loop_exception lines of one message


class StartupError(Exception):
    """The daemon cannot start; ``str()`` is the one line to print."""


@dataclass
class NsdSlot:
    restarts: Restarts
    child: ChildProcess | None = None
    state: State = State.STARTING
    restart_count: int = 0
    started_at: float | None = None
    namespaces: dict[str, str] = field(default_factory=dict)


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

    def as_dict(self) -> dict:
        return {"index": self.index, "pid": self.child.pid if self.child else None,
                "state": str(self.state), "restarts": self.restart_count,
                "started_at": self.started_at, "tun": self.block.tun_name,
                "audit_error": self.audit_error}


class Supervisor:
    def __init__(self, config: configmod.Config, config_path: str | None, *,
                 workers: int | None = None, admin_listen: str | None = None,
                 log_overrides: dict | None = None) -> None:
        # The config the daemon runs: a reload changes its live keys only (see config.Reload),
        # so that a worker restarted after a reload runs like its siblings.
        self.config = config
        self.log_overrides = log_overrides or {}  # --log-level/--log-format outlive reloads
        self.config_path = config_path
        self.workers_override = workers
        self.admin_listen_override = admin_listen
        self.worker_count = config.worker_count(workers)
        self.log = structlog.get_logger()
        self.notifier = Notifier()
        self.events: asyncio.Queue[tuple] = asyncio.Queue()
        self.onramps: list[Listener] = []
        sup = config.supervision
        self.nsd = NsdSlot(self._restarts())
        blocks = config.namespace.blocks(self.worker_count)
        self.workers = [WorkerSlot(i, b, self._restarts()) for i, b in enumerate(blocks)]
        self.metrics = SupervisorMetrics(self.processes)
        self.metrics.workers_configured.set(self.worker_count)
        for slot in self.workers:
            self.metrics.worker_restarts.labels(str(slot.index))
        self.stop_timeout = sup.stop_timeout
        self.exit_code = 0
        self.stopping = False
        self.started = False  # READY=1 sent
        self.rebuild: asyncio.Task | None = None
        self.started_at = time.time()
        self.admin = None
        self.nsd_reconfigure: dict | None = None  # the live settings after a reload
        self.tasks: set[asyncio.Task] = set()
        self._loop_errors: dict[str, tuple[float, int]] = {}  # message: (last logged, since)

    def _restarts(self) -> Restarts:
        s = self.config.supervision
        return Restarts(s.backoff_initial, s.backoff_max, s.crash_loop_limit, s.crash_loop_window)

    # -- what the admin API and the metrics read ------------------------------------------------

    def processes(self) -> list[ProcessInfo]:
        out = [ProcessInfo("supervisor", "", os.getpid())]
        if self.nsd.child and self.nsd.child.alive:
            out.append(ProcessInfo("nsd", "", self.nsd.child.pid))
        out += [ProcessInfo("worker", str(w.index), w.child.pid)
                for w in self.workers if w.child and w.child.alive]
        return out

    def is_ready(self) -> bool:
        return (not self.stopping and self.nsd.state is State.READY
                and all(w.state is State.READY for w in self.workers)
                and not self.audit_failures())

    def audit_failures(self) -> dict[int, str]:
        """Workers whose audit sink fails now, with the error."""
        return {w.index: w.audit_error for w in self.workers
                if w.audit_error is not None and w.child is not None}

    def status_line(self) -> str:
        ready = sum(w.state is State.READY for w in self.workers)
        line = f"nsd {self.nsd.state}, {ready}/{len(self.workers)} workers ready"
        if failing := self.audit_failures():
            error = next(iter(failing.values()))
            audit = self.config.audit
            line += (f"; audit sink {audit.sink} failing on worker"
                     f"{'s' if len(failing) > 1 else ''} {', '.join(map(str, sorted(failing)))}: "
                     f"{error} (audit.on_error = {audit.on_error})")
        return line

    async def gather_worker_metrics(self, timeout: float = 1.0) -> None:
        # Capture the child now: by the time a request goes out, the slot may hold none.
        live = [(w.index, w.child) for w in self.workers
                if w.child and w.child.alive and w.state is State.READY]

        async def one(index: int, child: ChildProcess):
            return index, await self.collect(child, "metrics", "families", timeout)

        results = await asyncio.gather(*(one(i, c) for i, c in live))
        self.metrics.workers.snapshots = {i: fams for i, fams in results if fams is not None}
        self.metrics.workers_ready.set(sum(w.state is State.READY for w in self.workers))
        self.metrics.nsd_up.set(1 if self.nsd.state is State.READY else 0)

    async def mesh_report(self, timeout: float = 5.0) -> dict:
        """Ask each ready worker to ping its peers over the mesh; whole when all answer right."""
        live = [(w.index, w.child) for w in self.workers
                if w.child and w.child.alive and w.state is State.READY]

        async def one(index: int, child: ChildProcess):
            try:
                return index, (await child.channel.request("mesh_check", timeout=timeout))["peers"]
            except (fdpass.ChannelClosed, TimeoutError):
                return index, None

        report = dict(await asyncio.gather(*(one(i, c) for i, c in live)))
        n = len(self.workers)
        whole = len(report) == n and all(
            peers is not None and {int(p): a for p, a in peers.items()}
            == {j: j for j in range(n) if j != i}
            for i, peers in report.items())
        return {"whole": whole, "workers": {str(i): peers for i, peers in report.items()}}

    # -- the main loop ---------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.events.put_nowait, ("signal", sig))
        loop.set_exception_handler(self._loop_exception)
        try:
            await self.start()
            if not self.stopping:
                self.spawn(self.notifier.watchdog(lambda: not self.stopping))
            while not self.stopping:
                event, *args = await self.events.get()
                await getattr(self, f"handle_{event}")(*args)
        except StartupError:
            self.exit_code = 1
            raise
        except Exception:
            # A bug, not a condition we handle: say so loudly, then still drain and clean up.
            self.log.critical("supervisor_failed", exc_info=True)
            self.exit_code = 1
        finally:
            await self.shutdown()
        return self.exit_code

    def _loop_exception(self, loop, context: dict) -> None:
        # Rate-limited per message: a listener out of fds reports every failed accept (asyncio
        # retries them), thousands a second, which must not become a log flood.
        message = str(context.get("message"))[:200]
        now = time.monotonic()
        last, suppressed = self._loop_errors.get(message, (-LOOP_ERROR_INTERVAL, 0))
        if now - last < LOOP_ERROR_INTERVAL:
            self._loop_errors[message] = (last, suppressed + 1)
            return
        if len(self._loop_errors) > 100:
            self._loop_errors.clear()
        self._loop_errors[message] = (now, 0)
        self.log.error("loop_exception", message=message, suppressed_since_last=suppressed,
                       exc_info=context.get("exception"))

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("task_failed", task=task.get_coro().__qualname__,
                           exc_info=task.exception())

    async def start(self) -> None:
        t0 = time.monotonic()
        try:
            self.onramps = open_onramps(self.config.onramps, self.worker_count)
        except Exception as exc:
            raise StartupError(str(exc)) from None
        self.admin = AdminServer(self, self.config.admin, self.admin_listen_override)
        try:
            await self.admin.start()
        except ListenerError as exc:
            raise StartupError(f"admin API: {exc}") from None
        except OSError as exc:
            raise StartupError(f"admin API: cannot listen on {self.admin.listen} "
                               f"({exc.strerror or exc})") from None
        # Workers start (and import) while nsd builds the namespace; they are equipped after.
        for slot in self.workers:
            self.start_worker(slot, equip=False)
        try:
            await self.start_nsd()
        except (HostError, fdpass.ProtocolError, fdpass.ChannelClosed) as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"cannot start nsd: {exc}") from None
        for slot in self.workers:
            self.spawn(self.equip(slot, with_mesh=True))
        deadline = self.config.supervision.start_timeout
        try:
            await asyncio.wait_for(self._all_ready(), deadline)
        except TimeoutError:
            raise StartupError(f"not ready after {deadline:g}s: {self.status_line()}") from None
        if self.stopping:
            return  # asked to stop (or a crash loop) while starting
        self.log.info("ready", workers=len(self.workers), seconds=round(time.monotonic() - t0, 3),
                      onramps={o.name: str(o.path or o.address) for o in self.onramps},
                      admin=self.admin.addresses())
        self.started = True
        self.notifier.ready(self.status_line())

    async def _all_ready(self) -> None:
        while not self.is_ready() and not self.stopping:
            event, *args = await self.events.get()
            await getattr(self, f"handle_{event}")(*args)

    # -- nsd -------------------------------------------------------------------------------------

    async def start_nsd(self) -> None:
        """Spawn nsd and walk its handshake; on success every worker slot holds new equipment."""
        slot = self.nsd
        slot.state = State.STARTING
        child = ChildProcess(["ipferry.nsd", *self.log_args()], self.on_child_exit)
        slot.child = child
        timeout = self.config.supervision.start_timeout

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
            ns = self.config.namespace
            child.channel.send("setup", {"blocks": [w.block.as_dict() for w in self.workers],
                                         "mtu": ns.mtu, "offload": ns.offload,
                                         "sysctls": ns.sysctls})
            slot.namespaces = (await expect("namespace_ready")).body
            for _ in self.workers:
                msg = await expect("worker_equipment")
                try:
                    index = int(msg["block"]["index"])
                    if set(msg.fds) != {"tun", "upgrade4", "upgrade6"} or index in new:
                        raise ValueError
                except (KeyError, TypeError, ValueError):
                    msg.close_fds()
                    raise fdpass.ProtocolError(f"malformed worker_equipment: {msg.body}") from None
                new[index] = dict(msg.fds)
            if set(new) != {w.index for w in self.workers}:
                raise fdpass.ProtocolError(f"nsd equipped workers {sorted(new)}")
            await expect("network_ready")
        except BaseException:
            child.signal(signal.SIGKILL)
            for fds in new.values():
                for fd in fds.values():
                    os.close(fd)
            raise
        for w in self.workers:
            for fd in w.equipment.values():
                os.close(fd)  # the old namespace's devices go once the worker lets go too
            w.equipment = new[w.index]
        slot.state = State.READY
        slot.started_at = time.time()
        if self.nsd_reconfigure:
            child.channel.send("reconfigure", self.nsd_reconfigure)
        self.log.info("nsd_ready", pid=child.pid, **slot.namespaces)
        self.spawn(self.watch_child(child, None))

    def log_args(self) -> list[str]:
        return ["--log-format", self.config.logging.format, "--log-level", self.config.logging.level]

    # -- workers ---------------------------------------------------------------------------------

    def start_worker(self, slot: WorkerSlot, *, equip: bool = True) -> None:
        slot.state = State.STARTING
        slot.equipped = False
        slot.audit_error = None  # a new process opens the sink afresh
        try:
            slot.child = ChildProcess(["ipferry.worker", "--index", str(slot.index),
                                       *self.log_args()], self.on_child_exit)
        except OSError as exc:
            # E.g. EMFILE: our fds are exhausted for now. A failed start, counted as a death.
            slot.child = None
            delay = slot.restarts.record_death()
            self.log.error("worker_start_failed", worker=slot.index, error=str(exc),
                           errno=exc.errno, restart_in=delay)
            if delay is None:
                return self.crash_loop(f"worker {slot.index}", slot)
            self.schedule_respawn(slot, delay)
            return
        slot.started_at = time.time()
        if equip:
            self.spawn(self.equip(slot, with_mesh=True))
        self.spawn(self.watch_child(slot.child, slot))

    async def equip(self, slot: WorkerSlot, *, with_mesh: bool) -> None:
        """Send a worker its fds: on-ramps, TUN, upgrade listeners, a fresh nsd link (and mesh)."""
        child = slot.child
        nsd = self.nsd.child
        if child is None:
            return  # its start failed: a respawn is scheduled, and equips it
        if nsd is None or self.nsd.state is not State.READY:
            return  # nsd is down; every worker is re-equipped when it is back
        try:
            reply = await nsd.channel.request("open_channel", {"worker": slot.index})
            nsd_fd = reply.take_fd("nsd")
        except (fdpass.ChannelClosed, TimeoutError, KeyError) as exc:
            if nsd is self.nsd.child and nsd.alive:
                # nsd is alive yet did not answer: the worker would never be ready. Count it as
                # a death, restarted with backoff (and a crash loop if it keeps happening).
                self.log.error("equip_failed", worker=slot.index, error=repr(exc))
                child.signal(signal.SIGKILL)
            return
        fds = {name: fd for o in self.onramps for name, fd in o.fds_for(slot.index).items()}
        fds.update(slot.equipment)
        fds["nsd"] = nsd_fd
        peers: list[tuple[WorkerSlot, object]] = []
        try:
            if with_mesh:
                # A link to every worker equipped before this one; those equipped later link to
                # us themselves. No await from here to the sends: each pair is made exactly once.
                for other in self.workers:
                    if other is slot or not (other.equipped and other.child
                                             and other.child.alive):
                        continue
                    ours, theirs = fdpass.channel_pair()
                    fds[f"mesh:{other.index}"] = ours.fileno()
                    peers.append((other, ours, theirs))
            if child.alive:
                child.channel.send("equip", {"block": slot.block.as_dict(),
                                             "onramps": [o.name for o in self.onramps],
                                             "settings": self.worker_settings().dump()}, fds)
                slot.equipped = True
                for other, _, theirs in peers:
                    try:
                        other.child.channel.send("mesh_peer", {"peer": slot.index},
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
            os.close(nsd_fd)
            for _, ours, theirs in peers:
                ours.close()
                theirs.close()

    async def watch_child(self, child: ChildProcess, slot: WorkerSlot | None) -> None:
        """Read what a child says on its control channel (workers report ``ready``)."""
        while (msg := await child.channel.inbox.get()) is not None:
            msg.close_fds()
            if msg.type == "ready" and slot is not None and slot.child is child:
                slot.state = State.READY
                self.log.info("worker_ready", worker=slot.index, pid=child.pid)
                self.notifier.status(self.status_line())
                self.events.put_nowait(("progress",))
            elif msg.type == "audit" and slot is not None and slot.child is child:
                error = msg.get("error")
                slot.audit_error = str(error)[:200] if error is not None else None
                self.log.warning("audit_sink_state", worker=slot.index,
                                 sink=self.config.audit.sink, error=slot.audit_error)
                self.notifier.status(self.status_line())

    def on_child_exit(self, child: ChildProcess) -> None:
        self.events.put_nowait(("exit", child))

    # -- event handlers --------------------------------------------------------------------------

    async def handle_progress(self) -> None:
        pass  # wakes _all_ready()

    async def handle_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if sig == signal.SIGHUP:
            self.reload()
        else:
            self.log.info("stop_requested", signal=name)
            self.stopping = True

    async def handle_exit(self, child: ChildProcess) -> None:
        if self.stopping:
            return
        if self.nsd.child is child:
            await self.nsd_died(child)
            return
        slot = next((w for w in self.workers if w.child is child), None)
        if slot is None:
            return
        slot.child = None
        slot.equipped = False
        if slot.planned_restart:
            slot.planned_restart = False
            self.log.info("worker_restarting", worker=slot.index, pid=child.pid)
            delay = 0.0
        else:
            delay = slot.restarts.record_death()
            self.log.warning("worker_died", worker=slot.index, pid=child.pid,
                             status=child.returncode, restart_in=delay)
            if delay is None:
                return self.crash_loop(f"worker {slot.index}", slot)
        self.schedule_respawn(slot, delay)

    def schedule_respawn(self, slot: WorkerSlot, delay: float) -> None:
        slot.state = State.BACKOFF
        self.notifier.status(self.status_line())
        asyncio.get_running_loop().call_later(delay, self.events.put_nowait, ("respawn", slot))

    async def handle_respawn(self, slot: WorkerSlot) -> None:
        if self.stopping or slot.child is not None:
            return
        if self.nsd.state is not State.READY:
            return  # start_nsd's success path starts every worker that has no process
        slot.restart_count += 1
        self.metrics.worker_restarts.labels(str(slot.index)).inc()
        self.start_worker(slot)

    async def nsd_died(self, child: ChildProcess) -> None:
        slot = self.nsd
        slot.child = None
        delay = slot.restarts.record_death()
        self.log.warning("nsd_died", pid=child.pid, status=child.returncode, restart_in=delay)
        self.nsd_backoff(delay)

    def nsd_backoff(self, delay: float | None) -> None:
        slot = self.nsd
        slot.state = State.BACKOFF
        if delay is None:
            return self.crash_loop("nsd", slot)
        self.notifier.status(self.status_line())
        asyncio.get_running_loop().call_later(delay, self.events.put_nowait, ("rebuild_namespace",))

    async def handle_rebuild_namespace(self) -> None:
        if self.stopping or self.rebuild is not None:
            return
        # A task, so that SIGTERM is handled (and cancels it) while nsd walks its handshake.
        self.rebuild = self.spawn(self.rebuild_namespace())

    async def rebuild_namespace(self) -> None:
        try:
            await self.start_nsd()
        except (HostError, fdpass.ProtocolError, fdpass.ChannelClosed) as exc:
            self.log.error("nsd_restart_failed", error=str(exc))
            return  # its exit event schedules the next try (and counts toward the crash loop)
        except OSError as exc:
            # Not spawned at all (e.g. EMFILE): no exit event comes, so count and retry here.
            self.nsd.child = None
            delay = self.nsd.restarts.record_death()
            self.log.error("nsd_start_failed", error=str(exc), errno=exc.errno, restart_in=delay)
            self.nsd_backoff(delay)
            return
        finally:
            self.rebuild = None
        if self.stopping:
            return
        self.nsd.restart_count += 1
        self.metrics.nsd_restarts.inc()
        for w in self.workers:
            if w.child is None:
                if w.state is State.BACKOFF:
                    w.restart_count += 1
                    self.metrics.worker_restarts.labels(str(w.index)).inc()
                self.start_worker(w)
            else:
                w.state = State.STARTING
                self.spawn(self.equip(w, with_mesh=False))

    def crash_loop(self, who: str, slot) -> None:
        s = self.config.supervision
        slot.state = State.FAILED
        self.log.critical("crash_loop", process=who, limit=s.crash_loop_limit,
                          window=s.crash_loop_window)
        self.exit_code = 1
        self.stopping = True

    async def restart_worker(self, index: int) -> WorkerSlot | None:
        """Admin-requested restart: a graceful stop, then an immediate start (no backoff).

        None when the worker has no running process to restart (it is in backoff or stopping).
        """
        slot = self.workers[index]
        if slot.child is None or not slot.child.alive or slot.planned_restart or self.stopping:
            return None
        slot.planned_restart = True
        slot.state = State.STOPPING
        self.spawn(slot.child.stop(self.stop_timeout, message="stop"))
        return slot

    # -- reload and stop -------------------------------------------------------------------------

    def reload(self) -> tuple[bool, str]:
        """Re-read the config file; a broken one is refused and the running config stays.

        Live: logging.level (every process), admin.token/token_file, supervision.*. The rest
        (workers, onramps, namespace, admin listeners, logging.format) is reported as needing a
        restart and keeps its running value.
        """
        if self.config_path is None:
            return True, "running on the built-in default config; nothing to reload"
        self.notifier.reloading()
        try:
            new = configmod.load(self.config_path)
            if self.log_overrides:
                new = new.model_copy(update={"logging": new.logging.model_copy(
                    update=self.log_overrides)})
            new.check_runtime()
        except configmod.ConfigError as exc:
            self.metrics.reloads.labels("refused").inc()
            self.log.error("reload_refused", config=self.config_path, errors=str(exc).splitlines())
            if self.started:
                self.notifier.ready(self.status_line())
            return False, str(exc)
        # Compared with what runs, not with the file read last: a change undone is no change.
        new, needs_restart = self.config.reloaded(new)
        self.config = new
        self.apply_supervision(new.supervision)
        logs.set_level(new.logging.level)
        if self.admin:
            self.admin.settings = new.admin
        self.nsd_reconfigure = {"log_level": new.logging.level}
        settings = {**self.nsd_reconfigure, "settings": self.worker_settings().dump()}
        for child in [w.child for w in self.workers] + [self.nsd.child]:
            if child and child.alive:
                try:
                    child.channel.send("reconfigure", settings if child is not self.nsd.child
                                       else self.nsd_reconfigure)
                except fdpass.ChannelClosed:
                    pass
        self.metrics.reloads.labels("applied").inc()
        self.log.info("reloaded", config=self.config_path, needs_restart=needs_restart)
        if self.started:
            self.notifier.ready(self.status_line())
        msg = "reloaded"
        if needs_restart:
            msg += f"; changes to {', '.join(needs_restart)} take effect at the next restart"
        return True, msg

    def worker_settings(self) -> WorkerSettings:
        """What workers are given of the running config (on-ramps as bound: they change only
        at a restart)."""
        return self.config.worker_settings(self.worker_count)

    async def ask_workers(self, request: str, body: dict | None = None,
                          timeout: float = 2.0) -> dict[int, fdpass.Message | None]:
        """One request to every ready worker, concurrently; None for those that did not answer."""
        live = [(w.index, w.child) for w in self.workers
                if w.child and w.child.alive and w.state is State.READY]

        async def one(index: int, child: ChildProcess):
            return index, await self.ask_worker(child, request, body, timeout)

        return dict(await asyncio.gather(*(one(i, c) for i, c in live)))

    def live_workers(self) -> list[tuple[int, ChildProcess]]:
        """The ready workers, in index order, with the process each has now."""
        return [(w.index, w.child) for w in self.workers
                if w.child and w.child.alive and w.state is State.READY]

    async def ask_worker(self, child: ChildProcess, request: str, body: dict | None = None,
                         timeout: float = 2.0) -> fdpass.Message | None:
        """One request to one worker: its reply (maybe an ``error``), or None (gone, too slow)."""
        try:
            return await child.channel.request(request, body, timeout=timeout)
        except (fdpass.ChannelClosed, fdpass.ProtocolError, TimeoutError):
            return None

    async def collect(self, child: ChildProcess, request: str, key: str,
                      timeout: float = 2.0, max_parts: int = 10_000) -> list | None:
        """A list a worker hands out in parts (tunnels, metrics: see ``worker/views.py``),
        asked for one part at a time: no reply can outgrow a control message. None when the
        worker failed to answer a part in ``timeout``."""
        out: list = []
        body: dict = {}
        for _ in range(max_parts):
            reply = await self.ask_worker(child, request, body, timeout)
            if reply is None or reply.type != request:
                return None
            out += reply.get(key) or []
            if reply.get("next") is None:
                return out
            body = {"snapshot": reply.get("snapshot"), "start": reply["next"]}
        return None

    def apply_supervision(self, sup: configmod.Supervision) -> None:
        self.stop_timeout = sup.stop_timeout
        for r in [self.nsd.restarts, *(w.restarts for w in self.workers)]:
            r.initial, r.maximum = sup.backoff_initial, sup.backoff_max
            r.limit, r.window = sup.crash_loop_limit, sup.crash_loop_window

    async def shutdown(self) -> None:
        """Drain: stop workers (bounded), then nsd, then the listeners and their socket files."""
        self.stopping = True
        if self.rebuild is not None:
            self.rebuild.cancel()  # start_nsd kills a half-started nsd on its way out
            await asyncio.gather(self.rebuild, return_exceptions=True)
        self.notifier.stopping()
        self.log.info("stopping", timeout=self.stop_timeout)
        workers = [w.child for w in self.workers if w.child and w.child.alive]
        for w in self.workers:
            if w.state is not State.FAILED:
                w.state = State.STOPPING
        await asyncio.gather(*(c.stop(self.stop_timeout, message="stop") for c in workers))
        if self.nsd.child:
            await self.nsd.child.stop(self.stop_timeout)
        for listener in self.onramps:
            listener.close()
        for w in self.workers:
            for fd in w.equipment.values():
                os.close(fd)
            w.equipment = {}
            if w.state is not State.FAILED:
                w.state = State.STOPPED
        if self.admin:
            await self.admin.stop()
        for task in list(self.tasks):
            task.cancel()
        self.log.info("stopped", exit_code=self.exit_code)

