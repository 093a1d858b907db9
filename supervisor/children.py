"""The supervisor's handles on its children: spawn with a control channel, watch, stop, kill.

A child is an ordinary ``python -m`` process that inherits one end of a SEQPACKET socketpair (its
control channel). Its exit is watched through a pidfd on the event loop: no SIGCHLD handler, no
watcher threads.
"""

from __future__ import annotations

import asyncio
import enum
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ipferry.runtime import fdpass


class State(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"  # dead, waiting to be restarted
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"  # crash loop: given up


class ChildProcess:
    """One running child process and its control channel."""

    def __init__(self, argv: list[str], on_exit: Callable[[ChildProcess], None]) -> None:
        # Any step may fail with an OSError (EMFILE when the supervisor's fds run out, EAGAIN
        # from fork, ...): then nothing is left behind, no fd and no process, and it propagates
        # for the caller to count as a failed start.
        self._loop = asyncio.get_running_loop()
        ours, theirs = fdpass.channel_pair()
        self._pidfd = -1
        proc: subprocess.Popen[bytes] | None = None
        try:
            with theirs:
                fd = theirs.fileno()
                self.proc = proc = subprocess.Popen(
                    [sys.executable, "-m", *argv, "--control-fd", str(fd),
                     "--parent-pid", str(os.getpid())],
                    pass_fds=[fd], stdin=subprocess.DEVNULL, close_fds=True)
            self.pid = self.proc.pid
            self._pidfd = os.pidfd_open(self.pid)
            self._loop.add_reader(self._pidfd, self._reap)
        except BaseException:
            ours.close()
            if self._pidfd >= 0:
                os.close(self._pidfd)
            if proc is not None:
                proc.kill()
                proc.wait()  # just started: it dies at once
            raise
        self.channel = fdpass.AsyncChannel(ours, f"{argv[0]}[{self.pid}]")
        self.returncode: int | None = None
        self._on_exit = on_exit
        self.exited = asyncio.Event()

    def _reap(self) -> None:
        if self.proc.poll() is None:
            return
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self.returncode = self.proc.returncode
        self.channel.close()
        self.exited.set()
        self._on_exit(self)

    @property
    def alive(self) -> bool:
        return self.returncode is None

    def signal(self, sig: int) -> None:
        if self.alive:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass

    async def wait(self, timeout: float) -> bool:
        """Wait for the exit; True if it exited in time."""
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def stop(self, timeout: float, *, message: str | None = None) -> None:
        """Ask politely (a ``stop`` message, else SIGTERM), then SIGKILL after ``timeout``."""
        if not self.alive:
            return
        try:
            if message:
                self.channel.send(message)
            else:
                self.signal(signal.SIGTERM)
        except fdpass.ChannelClosed:
            self.signal(signal.SIGTERM)
        if not await self.wait(timeout):
            self.signal(signal.SIGKILL)
            await self.wait(5)


@dataclass
class Restarts:
    """Exponential backoff with a crash-loop limit, per child slot."""

    initial: float
    maximum: float
    limit: int
    window: float
    recent: list[float] = field(default_factory=list)

    def record_death(self, now: float | None = None) -> float | None:
        """Count a death; returns the delay before the restart, or None: crash loop, give up."""
        now = time.monotonic() if now is None else now
        self.recent = [t for t in self.recent if now - t < self.window]
        if len(self.recent) >= self.limit:
            return None
        delay = min(self.initial * (2 ** len(self.recent)), self.maximum)
        self.recent.append(now)
        return delay
