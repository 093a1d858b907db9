"""Entering a fresh, unprivileged user + network namespace, and the host facts that allow it.

The same code serves nsd, ``ipferry connect`` and the tests: unshare, map our own uid/gid to root
inside (so the namespace's root may configure its network), and write the namespace's sysctls.
Python 3.11 has no ``os.unshare``, hence ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class HostError(Exception):
    """The host lacks something ipferry needs; ``str()`` is one line naming the cause and the fix."""

    def __init__(self, cause: str, fix: str) -> None:
        super().__init__(f"{cause}; fix: {fix}")
        self.cause = cause
        self.fix = fix


@dataclass(frozen=True)
class IdMap:
    """Who we are outside: mapped to root inside the new user namespace."""

    uid: int
    gid: int

    @classmethod
    def current(cls) -> IdMap:
        return cls(os.geteuid(), os.getegid())


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def setns(fd: int, nstype: int = 0) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def userns_disabled_reason() -> str | None:
    """Why unprivileged user namespaces are off on this host, or None if no knob says so."""
    knobs = {
        "/proc/sys/kernel/unprivileged_userns_clone": ("0", "sysctl -w kernel.unprivileged_userns_clone=1"),
        "/proc/sys/user/max_user_namespaces": ("0", "sysctl -w user.max_user_namespaces=15000"),
        "/proc/sys/kernel/apparmor_restrict_unprivileged_userns": (
            "1", "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0 "
                 "(or an AppArmor profile for ipferry)"),
    }
    for path, (bad, fix) in knobs.items():
        try:
            if Path(path).read_text().strip() == bad:
                return fix
        except OSError:
            continue
    return None


def enter_user_and_net_namespace(ids: IdMap | None = None) -> IdMap:
    """Move the calling (single-threaded) process into a new user + network namespace.

    Maps ``ids`` (default: our own) to uid/gid 0 inside, which gives the process every capability
    over the new namespace and nothing outside it. Raises :class:`HostError` when the host forbids it.
    """
    ids = ids or IdMap.current()
    try:
        unshare(CLONE_NEWUSER | CLONE_NEWNET)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.ENOSPC, errno.EUSERS, errno.EACCES):
            fix = userns_disabled_reason() or "enable unprivileged user namespaces on this host"
            raise HostError(f"cannot create a user namespace ({exc.strerror})", fix) from None
        if exc.errno == errno.EINVAL:
            raise HostError("cannot create a user namespace from a multi-threaded or chrooted process",
                            "start ipferry's namespace helper as a fresh process") from None
        raise
    # setgroups must be denied before an unprivileged gid_map write is accepted.
    Path("/proc/self/setgroups").write_text("deny")
    try:
        Path("/proc/self/uid_map").write_text(f"0 {ids.uid} 1")
    except PermissionError:
        # Since Linux 5.12 mapping host uid 0 needs CAP_SETFCAP (so that file capabilities
        # cannot be smuggled in). Root without capabilities keeps an unmapped uid instead:
        # the namespace's capabilities, all we need, come from creating it, not from the map.
        if ids.uid != 0:
            raise
    Path("/proc/self/gid_map").write_text(f"0 {ids.gid} 1")
    return ids


def write_sysctls(values: dict[str, str]) -> dict[str, str]:
    """Write net sysctls of the current namespace; returns those that failed, with the reason."""
    failed: dict[str, str] = {}
    for key, value in values.items():
        path = Path("/proc/sys") / key.replace(".", "/")
        try:
            path.write_text(value)
        except OSError as exc:
            failed[key] = exc.strerror or str(exc)
    return failed


def namespace_ids(pid: int | str = "self") -> dict[str, str]:
    """The namespace identities (``user``, ``net``) of a process, as the kernel names them."""
    return {ns: os.readlink(f"/proc/{pid}/ns/{ns}") for ns in ("user", "net")}
