"""A child that cannot be started (EMFILE at any step) leaves no fd and no process behind."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess

import pytest

from ipferry.supervisor import children


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def emfile(*args, **kwargs):
    raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


@pytest.mark.parametrize("step", ["socketpair", "popen", "pidfd_open"])
def test_a_failed_start_raises_and_leaks_nothing(monkeypatch, step):
    started: list[subprocess.Popen] = []

    class Popen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(children.subprocess, "Popen", emfile if step == "popen" else Popen)
    if step == "socketpair":
        monkeypatch.setattr(children.fdpass, "channel_pair", emfile)
    if step == "pidfd_open":
        monkeypatch.setattr(children.os, "pidfd_open", emfile)

    async def start() -> None:
        before = open_fds()
        with pytest.raises(OSError) as info:
            children.ChildProcess(["this_module_is_never_run"], lambda child: None)
        assert info.value.errno == errno.EMFILE
        assert open_fds() == before

    asyncio.run(start())
    if step == "pidfd_open":
        [proc] = started
        assert proc.returncode is not None  # killed and reaped
    else:
        assert started == []
