"""The supervisor's main loop: start nsd and the workers, keep them alive, reload, drain.

As in gunicorn's arbiter, one loop takes events off a queue and hands each to its
``handle_<event>``; those handlers are the only code that changes the supervisor's state (the
slots, the running config). Whoever else has news posts an event and waits, if it needs an
answer, for the handler's: signal handlers, a child's exit (its pidfd), what a child says on its
control channel, the outcome of nsd's handshake or of an equip's request for an nsd link, the
timer of a backoff, and the admin API's reload and worker restart (:meth:`Supervisor.call`).
Tasks may read the state and do I/O; they never write it. Reads (status, metrics, flows) need no
event.

The duties, one module each, as uvicorn splits its supervisors:

- ``nsdkeeper.py``: nsd and its namespace, rebuilt when nsd dies;
- ``pool.py``: the workers: start, equip, restart after a backoff, and asking them things;
  their claims of routes, and telling them of every change of routes;
- ``reload.py``: re-reading the config, all or nothing;
- ``routes.py``: the route registry of private networks (pure: its changes are made by
  ``pool.py``'s handlers of what workers say, so in this loop too).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import structlog

from ipferry.runtime.settings import WorkerSettings

from . import config as configmod
from .admin import AdminServer
from .children import ChildProcess, Restarts, State
from .listeners import Listener, ListenerError, open_onramps
from .metrics import ProcessInfo, SupervisorMetrics
from .notify import Notifier
from .nsdkeeper import Namespace, NsdKeeper
from .pool import WorkerPool, WorkerSlot
from .reload import Reloader
from .routes import RouteRegistry

LOOP_ERROR_INTERVAL = 10.0  # seconds between two loop_exception lines of one message


class StartupError(Exception):
    """The daemon cannot start; ``str()`` is the one line to print."""


class Supervisor:
    def __init__(self, config: configmod.Config, config_path: str | None, *,
                 workers: int | None = None, admin_listen: str | None = None,
                 log_overrides: dict | None = None) -> None:
        # The config the daemon runs: a reload changes its live keys only (see config.Reload),
        # so that a worker restarted after a reload runs like its siblings.
        self.config = config
        self.log_overrides = log_overrides or {}  # --log-level/--log-format outlive reloads
        self.config_path = config_path
        self.admin_listen_override = admin_listen
        self.worker_count = config.worker_count(workers)
        self.log = structlog.get_logger()
        self.notifier = Notifier()
        self.events: asyncio.Queue[tuple] = asyncio.Queue()
        self.onramps: list[Listener] = []
        self.nsd = NsdKeeper(self)
        self.pool = WorkerPool(self, config.namespace.blocks(self.worker_count))
        # Networks and sites are kept until a restart (config.KEPT_ROUTES): built once.
        self.routes = RouteRegistry(config.networks, [(s.name, s.tenant, [str(p) for p in s.prefixes])
                                                      for s in config.sites])
        self.workers = self.pool.slots
        self.reloader = Reloader(self)
        self.metrics = SupervisorMetrics(self.processes, self.pool.ready_count,
                                         lambda: 1 if self.nsd.ready else 0,
                                         node=self.config.node)
        self.metrics.workers_configured.set(self.worker_count)
        for slot in self.workers:
            self.metrics.worker_restarts.labels(str(slot.index))
        self.stop_timeout = config.supervision.stop_timeout
        self.exit_code = 0
        self.stopping = False
        self.started = False  # READY=1 sent
        self.started_at = time.time()
        self.admin: AdminServer | None = None
        self.tasks: set[asyncio.Task] = set()
        self._loop_errors: dict[str, tuple[float, int]] = {}  # message: (last logged, since)

    def restarts(self) -> Restarts:
        s = self.config.supervision
        return Restarts(s.backoff_initial, s.backoff_max, s.crash_loop_limit, s.crash_loop_window)

    # -- what the admin API, the metrics and the children read --------------------------------

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
        line = f"nsd {self.nsd.state}, {self.pool.ready_count()}/{len(self.workers)} workers ready"
        if failing := self.audit_failures():
            error = next(iter(failing.values()))
            audit = self.config.audit
            line += (f"; audit sink {audit.sink} failing on worker"
                     f"{'s' if len(failing) > 1 else ''} {', '.join(map(str, sorted(failing)))}: "
                     f"{error} (audit.on_error = {audit.on_error})")
        return line

    def log_args(self) -> list[str]:
        node = ["--node", self.config.node] if self.config.node else []
        return ["--log-format", self.config.logging.format, "--log-level",
                self.config.logging.level, *node]

    def worker_settings(self) -> WorkerSettings:
        """What workers are given of the running config (on-ramps as bound: they change only
        at a restart)."""
        return self.config.worker_settings(self.worker_count)

    # -- events ---------------------------------------------------------------------------------

    def post(self, event: str, *args) -> None:
        """Queue ``event`` for the loop, which calls ``handle_<event>(*args)``."""
        self.events.put_nowait((event, *args))

    async def call(self, event: str, *args):
        """Post ``event`` with a future for the handler's answer and wait for it: how the admin
        API changes state. None when the daemon stops first."""
        if self.stopping:
            return None
        reply = asyncio.get_running_loop().create_future()
        self.post(event, *args, reply)
        return await asyncio.shield(reply)  # a client that goes away does not cancel the change

    def on_child_exit(self, child: ChildProcess) -> None:
        self.post("exit", child)

    async def dispatch(self, event: str, *args) -> None:
        try:
            await getattr(self, f"handle_{event}")(*args)
        finally:  # a handler that failed, or had nothing to say, still answers its caller
            for arg in args:
                if isinstance(arg, asyncio.Future) and not arg.done():
                    arg.set_result(None)

    # -- the main loop ----------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.post, "signal", sig)
        loop.set_exception_handler(self._loop_exception)
        try:
            await self.start()
            if not self.stopping:
                self.spawn(self.notifier.watchdog(lambda: not self.stopping))
            while not self.stopping:
                await self.dispatch(*await self.events.get())
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
            self.pool.start(slot)
        try:
            self.nsd.start()
        except OSError as exc:
            raise StartupError(f"cannot start nsd: {exc}") from None
        # nsd's handshake bounds each of its steps; then the workers have start_timeout.
        await self._until(lambda: self.nsd.state is not State.STARTING)
        deadline = self.config.supervision.start_timeout
        try:
            await asyncio.wait_for(self._until(self.is_ready), deadline)
        except TimeoutError:
            raise StartupError(f"not ready after {deadline:g}s: {self.status_line()}") from None
        if self.stopping:
            return  # asked to stop (or a crash loop) while starting
        self.log.info("ready", workers=len(self.workers), seconds=round(time.monotonic() - t0, 3),
                      onramps={o.name: str(o.path or o.address) for o in self.onramps},
                      admin=self.admin.addresses())
        self.started = True
        self.notifier.ready(self.status_line())

    async def _until(self, done) -> None:
        """Handle events until ``done()`` (or a stop)."""
        while not done() and not self.stopping:
            await self.dispatch(*await self.events.get())

    # -- event handlers: every state change happens in one of these -------------------------------

    async def handle_signal(self, sig: int) -> None:
        if sig == signal.SIGHUP:
            await self.reloader.reload()
        else:
            self.log.info("stop_requested", signal=signal.Signals(sig).name)
            self.stopping = True

    async def handle_exit(self, child: ChildProcess) -> None:
        """A child exited (its pidfd said so)."""
        if self.stopping:
            return
        if self.nsd.child is child:
            self.nsd.died(child)
        else:
            self.pool.died(child)

    async def handle_respawn(self, slot: WorkerSlot) -> None:
        """A dead worker's backoff is over."""
        self.pool.respawn(slot)

    async def handle_rebuild_namespace(self) -> None:
        """nsd's backoff is over."""
        self.nsd.rebuild()

    async def handle_nsd_handshake(self, child: ChildProcess,
                                   result: Namespace | Exception) -> None:
        if isinstance(result, Exception) and not self.started and not self.stopping:
            raise StartupError(str(result))
        if self.nsd.handshake_done(child, result):
            self.pool.renew()

    async def handle_nsd_link(self, slot: WorkerSlot, child: ChildProcess, nsd: ChildProcess,
                              result: int | Exception) -> None:
        """nsd answered an equip's request for a link (or failed to)."""
        self.pool.linked(slot, child, nsd, result)

    async def handle_child_said(self, child: ChildProcess, kind: str, body: dict) -> None:
        """A worker's message on its control channel: ``ready``, ``audit``, ``claim_routes``
        (a request: answered), ``release_routes``."""
        self.pool.heard(child, kind, body)

    async def handle_reload(self, reply: asyncio.Future | None = None) -> None:
        """The admin API's reload (SIGHUP's comes as a signal)."""
        if self.stopping:
            return  # (dispatch answers None)
        result = await self.reloader.reload()
        if reply is not None and not reply.done():
            reply.set_result(result)

    async def handle_restart_worker(self, index: int, reply: asyncio.Future) -> None:
        """The admin API's restart of one worker: its slot, or None if it has no process."""
        slot = self.pool.restart(index)
        if not reply.done():
            reply.set_result(slot)

    def crash_loop(self, who: str, slot) -> None:
        s = self.config.supervision
        slot.state = State.FAILED
        self.log.critical("crash_loop", process=who, limit=s.crash_loop_limit,
                          window=s.crash_loop_window)
        self.exit_code = 1
        self.stopping = True

    def apply_supervision(self, sup: configmod.Supervision) -> None:
        self.stop_timeout = sup.stop_timeout
        for r in [self.nsd.restarts, *(w.restarts for w in self.workers)]:
            r.initial, r.maximum = sup.backoff_initial, sup.backoff_max
            r.limit, r.window = sup.crash_loop_limit, sup.crash_loop_window

    # -- tasks and the loop's own errors ----------------------------------------------------------

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("task_failed", task=getattr(task.get_coro(), "__qualname__", None),
                           exc_info=task.exception())

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

    # -- the end ----------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Drain: stop workers (bounded), then nsd, then the listeners and their socket files."""
        self.stopping = True
        await self.nsd.abandon_handshake()
        self.notifier.stopping()
        self.log.info("stopping", timeout=self.stop_timeout)
        await self.pool.stop(self.stop_timeout)
        await self.nsd.stop(self.stop_timeout)
        for listener in self.onramps:
            listener.close()
        self.pool.release()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self._drain()
        if self.admin:
            await self.admin.stop()
        self.log.info("stopped", exit_code=self.exit_code)

    async def _drain(self) -> None:
        """The events still queued, handled knowing that the daemon stops: fds they carry are
        closed, callers waiting for an answer get None."""
        while not self.events.empty():
            try:
                await self.dispatch(*self.events.get_nowait())
            except Exception:
                self.log.error("drain_failed", exc_info=True)
