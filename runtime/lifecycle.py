"""What every ipferry child does first: a name people recognise and a death tied to its parent."""

from __future__ import annotations

import os
import resource
import signal

import prctl


def set_title(title: str) -> None:
    """What ``ps`` and ``top`` show for this process, e.g. ``ipferry: worker 2``."""
    prctl.set_name(title.replace("ipferry: ", "ipf-")[:15])
    prctl.set_proctitle(title)


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit: every relayed flow holds six fds (two sockets,
    two pipes), and 1024, the usual soft default, would cap a worker at ~165 flows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def become_child(title: str, parent_pid: int) -> None:
    """Set the process title (``ipferry: worker 2``) and die with the supervisor.

    The death signal is checked against the parent pid afterwards: if the parent died before
    ``PR_SET_PDEATHSIG`` took effect we were already re-parented and must go now.
    """
    set_title(title)
    raise_fd_limit()
    prctl.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)
