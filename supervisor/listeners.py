"""On-ramp listeners: bound once by the supervisor (or taken from systemd) and shared by workers."""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from .config import TunnelOnramp

SD_LISTEN_FDS_START = 3


class ListenerError(Exception):
    """A listener that cannot be had; ``str()`` names the path, the cause and the fix."""


@dataclass
class Listener:
    name: str
    sock: socket.socket
    path: Path | None  # a unix socket file we created and must remove
    inode: int | None = None
    from_systemd: bool = False

    def close(self) -> None:
        self.sock.close()
        if self.path is None or self.from_systemd:
            return
        try:  # only remove the file if it is still ours (a successor may have bound it)
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def systemd_sockets() -> dict[str, socket.socket]:
    """Sockets passed by systemd socket activation, by their FileDescriptorName=."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    count = int(os.environ.get("LISTEN_FDS", "0"))
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    out = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] else f"fd{i}"
        out[name] = socket.socket(fileno=fd)
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # never leak them to children
    return out


def bind_unix(path: Path, type_: int, mode: int, backlog: int) -> tuple[socket.socket, int]:
    """Bind a unix socket at ``path``, replacing a stale file but never a live listener."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    except OSError as exc:
        raise ListenerError(f"{path.parent}: cannot create ({exc.strerror}); set RUNTIME_DIRECTORY "
                            f"or the socket path in the config") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"{path}: exists and is not a socket; refusing to replace it "
                            f"(choose another path)")
    if st is not None:
        probe = socket.socket(socket.AF_UNIX, type_)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # stale: nobody listens there any more
        except OSError as exc:
            raise ListenerError(f"{path}: exists and cannot be probed ({exc.strerror}); "
                                f"remove it if no ipferry is running") from None
        else:
            raise ListenerError(f"{path}: another process is listening there "
                                f"(is ipferry already running?)")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, type_)
    # The umask makes the file born with at most ``mode``: no window in which others can connect.
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        hint = "; set its path in the config or run with RUNTIME_DIRECTORY set" \
            if exc.errno in (errno.EACCES, errno.EROFS) else ""
        raise ListenerError(f"{path}: cannot bind ({exc.strerror}){hint}") from None
    finally:
        os.umask(old_umask)
    return sock, os.stat(path).st_ino


def open_onramps(onramps: list[TunnelOnramp]) -> list[Listener]:
    passed = systemd_sockets()
    out: list[Listener] = []
    try:
        for onramp in onramps:
            if onramp.name in passed:
                out.append(Listener(onramp.name, passed.pop(onramp.name), None, from_systemd=True))
                continue
            path = onramp.socket_path()
            sock, inode = bind_unix(path, socket.SOCK_SEQPACKET, onramp.mode, onramp.backlog)
            out.append(Listener(onramp.name, sock, path, inode))
    except BaseException:
        for listener in out:
            listener.close()
        raise
    finally:
        for sock in passed.values():
            sock.close()
    for listener in out:
        listener.sock.setblocking(False)
    return out
