"""On-ramp listeners: bound once by the supervisor (or taken from systemd) and shared by workers.

A tunnel on-ramp is one SOCK_SEQPACKET listener every worker accepts on; a TCP on-ramp (a
published service) or an HTTP on-ramp (a forward proxy) one TCP listener, likewise. A GUE on-ramp
is a
SO_REUSEPORT group of UDP sockets, one per worker, bound in worker order: the group's steering
program returns a worker index, which is the socket's place in the group. The supervisor holds
every socket for the daemon's life, so a restarted worker gets its predecessor's socket (and the
datagrams queued on it) and the group's order never changes.

Each kind of the config's on-ramps is a :class:`Listener` subclass registered under the config's
``kind`` (as the workers register their on-ramp classes, :mod:`ipferry.worker.onramps`); a worker
gets each on-ramp's fd named ``onramp:<kind>:<name>`` (:mod:`ipferry.runtime.fdnames`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, TypeVar

from ipferry.runtime import fdnames
from ipferry.wire.steering import Insn, program

from .config import GueOnramp, HttpOnramp, TcpOnramp, TunnelOnramp

SD_LISTEN_FDS_START = 3
SO_ATTACH_REUSEPORT_CBPF = 51  # asm-generic/socket.h; the socket module does not name it


class ListenerError(Exception):
    """A listener that cannot be had; ``str()`` names the path, the cause and the fix."""


_KINDS: dict[str, type[Listener]] = {}
_L = TypeVar("_L", bound="type[Listener]")


def register(kind: str) -> Callable[[_L], _L]:
    """Class decorator: the listener class of the config's on-ramp ``kind``."""
    def add(cls: _L) -> _L:
        cls.kind = kind
        _KINDS[kind] = cls
        return cls
    return add


def listener_class(kind: str) -> type[Listener]:
    try:
        return _KINDS[kind]
    except KeyError:
        raise ListenerError(f"on-ramp kind {kind!r}: not one of {', '.join(sorted(_KINDS))}") from None


@dataclass
class Listener:
    """A bound on-ramp, held for the daemon's life; one subclass per config ``kind``."""

    kind: ClassVar[str]
    name: str
    sock: socket.socket
    path: Path | None = None  # a unix socket file we created and must remove
    inode: int | None = None
    from_systemd: bool = False
    address: str | None = None  # where it listens, for the status (a path says it otherwise)

    @classmethod
    def open(cls, onramp, workers: int, passed: dict[str, socket.socket]) -> Listener:
        """Bind the on-ramp ``onramp`` (its config) for ``workers`` workers, or take its socket
        from ``passed`` (systemd's, by name) if the kind can."""
        raise NotImplementedError

    @staticmethod
    def where(onramp) -> str:
        """Where the on-ramp ``onramp`` (its config) listens, for people."""
        raise NotImplementedError

    def fd_for(self, worker: int) -> int:
        """The fd worker ``worker`` gets of this on-ramp: by default the one shared socket."""
        return self.sock.fileno()

    def fds_for(self, worker: int) -> dict[str, int]:
        """The fds worker ``worker`` gets of this on-ramp, by name."""
        return {fdnames.onramp(self.kind, self.name): self.fd_for(worker)}

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


# -- steering a GUE on-ramp's group (the program: ipferry.wire.steering) -----------------

class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def attach(sock: socket.socket, workers: int) -> None:
    """Steer the reuseport group ``sock`` belongs to; one program serves the whole group.

    Bind first (with SO_REUSEPORT); any member will do, the last one attached wins::

        socks = []
        for _ in range(workers):  # in worker order: the index is the bind order
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("0.0.0.0", 6080))
            socks.append(s)
        attach(socks[0], workers)
    """
    attach_program(sock, program(workers))


def attach_program(sock: socket.socket, insns: Sequence[Insn]) -> None:
    """Give the reuseport group of ``sock`` any cBPF program (its return value = socket index)."""
    filters = (_SockFilter * len(insns))(*(_SockFilter(*insn) for insn in insns))
    fprog = _SockFprog(len(insns), filters)  # `filters` stays referenced until setsockopt returns
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))
    except OSError as exc:
        # EINVAL is either cause: the kernel's checker says no more than that.
        raise OSError(exc.errno, f"the kernel refused the reuseport steering program ({len(insns)} "
                      f"instructions): {exc.strerror}; it needs a socket bound with SO_REUSEPORT, "
                      "Linux >= 4.5 and a program its checker accepts") from exc


@register("tunnel")
@dataclass
class SeqpacketListener(Listener):
    """A connected tunnel on-ramp: one SOCK_SEQPACKET listener every worker accepts on."""

    @classmethod
    def open(cls, onramp: TunnelOnramp, workers: int,
             passed: dict[str, socket.socket]) -> SeqpacketListener:
        if onramp.name in passed:
            return cls(onramp.name, passed.pop(onramp.name), from_systemd=True)
        path = onramp.socket_path()
        sock, inode = bind_unix(path, socket.SOCK_SEQPACKET, onramp.mode, onramp.backlog)
        return cls(onramp.name, sock, path, inode)

    @staticmethod
    def where(onramp: TunnelOnramp) -> str:
        return str(onramp.socket_path())


@register("gue")
@dataclass
class GueListener(Listener):
    """A GUE on-ramp: a steered SO_REUSEPORT group of UDP sockets, worker i's socket at i."""

    group: list[socket.socket] = field(default_factory=list)

    @classmethod
    def open(cls, onramp: GueOnramp, workers: int,
             passed: dict[str, socket.socket]) -> GueListener:
        return bind_gue_group(onramp, workers)

    @staticmethod
    def where(onramp: GueOnramp) -> str:
        return f"udp {onramp.listen} (GUE)"

    def fd_for(self, worker: int) -> int:
        return self.group[worker].fileno()

    def close(self) -> None:
        super().close()
        for sock in self.group:
            sock.close()


def bind_gue_group(onramp: GueOnramp, workers: int) -> GueListener:
    """One UDP socket per worker in a SO_REUSEPORT group steered by the flow-hash program."""
    host, port = onramp.address()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        # Another process of our uid with a SO_REUSEPORT group there would take us in silently
        # (and share our traffic): a plain bind first must find the port free.
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise ListenerError(f"GUE on-ramp {onramp.name} at {onramp.listen}: cannot bind "
                                    f"({exc.strerror}); is another process (another ipferry?) "
                                    f"using the port?") from None
    group: list[socket.socket] = []
    try:
        for _ in range(workers):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            group.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # Bursts wait here while a worker is busy (capped by net.core.rmem_max).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, onramp.receive_buffer)
            sock.bind((host, port))
            port = sock.getsockname()[1]  # port 0: the first socket's port for the others
            sock.setblocking(False)
        attach(group[0], workers)  # the program belongs to the group, not to one socket
    except OSError as exc:
        for sock in group:
            sock.close()
        raise ListenerError(f"GUE on-ramp {onramp.name} at {onramp.listen}: cannot bind "
                            f"({exc.strerror or exc}); is another process using the port?") from None
    where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    return GueListener(onramp.name, group[0].dup(), address=where, group=group)


@register("tcp")
@dataclass
class TcpListener(Listener):
    """A TCP on-ramp (a published service): one TCP listener every worker accepts on."""

    label: ClassVar[str] = "TCP on-ramp"

    @classmethod
    def open(cls, onramp: TcpOnramp | HttpOnramp, workers: int,
             passed: dict[str, socket.socket]) -> TcpListener:
        if onramp.name in passed:
            sock = passed.pop(onramp.name)
            try:
                listening = (sock.type == socket.SOCK_STREAM
                             and sock.family in (socket.AF_INET, socket.AF_INET6)
                             and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
            except OSError:
                listening = False
            if not listening:
                sock.close()
                raise ListenerError(f"{cls.label} {onramp.name}: the socket systemd passed by "
                                    f"that name is not a listening TCP socket; give it "
                                    f"ListenStream={onramp.listen} in the .socket unit")
            return cls(onramp.name, sock, from_systemd=True, address=_tcp_where(sock))
        sock = bind_tcp(onramp, cls.label)
        return cls(onramp.name, sock, address=_tcp_where(sock))

    @staticmethod
    def where(onramp: TcpOnramp) -> str:
        return f"tcp {onramp.listen} -> {onramp.upstream} (tenant {onramp.tenant})"


@register("http")
@dataclass
class HttpListener(TcpListener):
    """An HTTP on-ramp (a forward proxy): one TCP listener every worker accepts on, bound (or
    taken from systemd by the on-ramp's name) as a TCP on-ramp's."""

    label: ClassVar[str] = "HTTP on-ramp"

    @staticmethod
    def where(onramp: HttpOnramp) -> str:  # type: ignore[override]
        """Who its clients are, never a token: ``http proxy 127.0.0.1:3128 (tenant acme, 2
        tokens)``."""
        who = [f"tenant {onramp.tenant}"] if onramp.tenant is not None else []
        if onramp.tokens:
            n = len(onramp.tokens)
            who.append(f"{n} token" if n == 1 else f"{n} tokens")
        return f"http proxy {onramp.listen} ({', '.join(who)})"


def bind_tcp(onramp: TcpOnramp | HttpOnramp, label: str = "TCP on-ramp") -> socket.socket:
    """A TCP (or HTTP) on-ramp's listener: bound, listening, non-blocking."""
    host, port = onramp.address()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past a restart's TIME_WAITs
        if family == socket.AF_INET6:  # [::] is IPv6 only: IPv4 clients are 0.0.0.0's
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(onramp.backlog)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"{label} {onramp.name} at {onramp.listen}: cannot listen "
                            f"({exc.strerror}); {_bind_fix(exc.errno, host, port)}") from None
    sock.setblocking(False)
    return sock


def _bind_fix(err: int | None, host: str, port: int) -> str:
    if err == errno.EADDRINUSE:
        return (f"another process (another ipferry?) listens on port {port}: stop it or choose "
                f"another port in `listen` (ss -ltnp 'sport = :{port}' shows who)")
    if err == errno.EADDRNOTAVAIL:
        return (f"{host} is not an address of this host: listen on one it has (ip -brief "
                f"address) or on 0.0.0.0 / [::]")
    if err == errno.EACCES:
        return (f"port {port} is privileged: run with CAP_NET_BIND_SERVICE (AmbientCapabilities= "
                f"in the unit) or choose a port from 1024")
    return "check the `listen` address"


def _tcp_where(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


def open_onramps(onramps: list[TunnelOnramp | GueOnramp | TcpOnramp | HttpOnramp],
                 workers: int = 1) -> list[Listener]:
    passed = systemd_sockets()
    out: list[Listener] = []
    try:
        for onramp in onramps:
            out.append(listener_class(onramp.kind).open(onramp, workers, passed))
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
