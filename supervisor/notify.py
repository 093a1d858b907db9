"""systemd readiness protocol: READY=1, STATUS=, STOPPING=1, RELOADING=1 and the watchdog."""

from __future__ import annotations

import asyncio
import os
import time

import sdnotify

# Children must never talk to systemd as if they were the service.
SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_interval = (int(usec) / 1e6 / 2
                                  if usec and usec.isdigit() and pid in (None, str(os.getpid()))
                                  else None)
        self._last_status = ""
        for var in SYSTEMD_VARS:
            os.environ.pop(var, None)

    def send(self, *lines: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(lines))

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def reloading(self) -> None:
        # Type=notify-reload (systemd 253+) wants the CLOCK_MONOTONIC time of the reload.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    async def watchdog(self, healthy) -> None:
        """Pet the watchdog at half its interval while ``healthy()`` says so."""
        if self.watchdog_interval is None:
            return
        while True:
            if healthy():
                self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)
