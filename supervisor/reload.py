"""Reload: re-read the config file, then apply what of it is live in every process, or nothing.

What a reload does with each key is declared next to the key (``config.Reload``): the running
config takes the new file's live keys and keeps the others, which the reply names as waiting for
a restart when the file changed them (compared with what runs, not with the file read last).

It is all or nothing, in two steps. A file that fails validation, or ``check_runtime`` (the token
file, importing the application class, opening the audit sink), is refused. Then every equipped
worker is asked to ``prepare`` the new settings: to build the new application and keep it aside.
Only when all have, each is told to ``commit`` (switch to it) and the supervisor takes the new
config; if one cannot (its application's constructor raises, it does not answer within
:data:`PREPARE_TIMEOUT`), they are told to ``abort`` and the reload is refused with its error:
every process runs on as before, and a worker started later gets the old settings.

A reload is one event of the supervisor's loop: nothing else changes state while it waits for the
workers (a worker that is not yet equipped gets the settings that are running when it is).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipferry.runtime import fdpass, logs

from . import config as configmod

if TYPE_CHECKING:
    from .arbiter import Supervisor

PREPARE_TIMEOUT = 10.0  # seconds every worker has to build the new application


class Reloader:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.log = sup.log

    async def reload(self) -> tuple[bool, str]:
        """(applied, the message for the operator)."""
        sup = self.sup
        if sup.config_path is None:
            return True, "running on the built-in default config; nothing to reload"
        sup.notifier.reloading()
        try:
            return await self._reload()
        finally:
            if sup.started:
                sup.notifier.ready(sup.status_line())

    async def _reload(self) -> tuple[bool, str]:
        sup = self.sup
        try:
            new = self.read()
        except configmod.ConfigError as exc:
            return self.refuse(str(exc))
        running, needs_restart = sup.config.reloaded(new)
        asked = [(w.index, w.child) for w in sup.pool.slots
                 if w.child and w.child.alive and w.equipped]
        settings = running.worker_settings(sup.worker_count).dump()
        replies = await sup.pool.ask_workers("prepare", {"settings": settings},
                                             timeout=PREPARE_TIMEOUT, workers=asked)
        failures = [f"worker {i}: {_failure(replies[i])}" for i, _ in asked
                    if replies[i] is None or replies[i].type != "prepared"]
        if failures:
            _tell([child for _, child in asked], "abort")
            return self.refuse("\n".join(failures))
        self.commit(running)
        self.log.info("reloaded", config=sup.config_path, needs_restart=needs_restart)
        msg = "reloaded"
        if needs_restart:
            msg += f"; changes to {', '.join(needs_restart)} take effect at the next restart"
        return True, msg

    def read(self) -> configmod.Config:
        """The file as a config the daemon could run, else a ConfigError."""
        new = configmod.load(self.sup.config_path)
        if self.sup.log_overrides:  # --log-level/--log-format outlive reloads
            new = new.model_copy(update={"logging": new.logging.model_copy(
                update=self.sup.log_overrides)})
        new.check_runtime()
        return new

    def commit(self, running: configmod.Config) -> None:
        """Every process switches: the workers to what they prepared (a worker not yet equipped
        gets it with its equipment), nsd and all to the new log level, the supervisor to the
        new config."""
        sup = self.sup
        sup.config = running
        sup.apply_supervision(running.supervision)
        logs.set_level(running.logging.level)
        if sup.admin:
            sup.admin.settings = running.admin
        level = running.logging.level
        _tell([w.child for w in sup.pool.slots], "commit", {"log_level": level})
        _tell([sup.nsd.child], "reconfigure", {"log_level": level})
        sup.metrics.reloads.labels("applied").inc()

    def refuse(self, errors: str) -> tuple[bool, str]:
        self.sup.metrics.reloads.labels("refused").inc()
        self.log.error("reload_refused", config=self.sup.config_path, errors=errors.splitlines())
        return False, errors


def _failure(reply: fdpass.Message | None) -> str:
    if reply is None:
        return f"no answer (it exited, or took over {PREPARE_TIMEOUT:g}s)"
    return str(reply.get("error") or f"answered {reply.type!r}")


def _tell(children: list, message: str, body: dict | None = None) -> None:
    for child in children:
        if child is not None and child.alive:
            try:
                child.channel.send(message, body)
            except fdpass.ChannelClosed:
                pass  # exiting: its replacement starts with whatever config runs then
