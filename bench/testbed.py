"""The isolated testbed: a server namespace and the transports that give a client a way into it.

Everything runs in network namespaces made here, so nothing can leave the machine:

- the **server namespace** (``ipfbench-<pid>-srv``) holds the servers (iperf3, ``rr.py serve``) on
  198.18.0.1, the ipferry daemons, and pasta/slirp4netns. Its only non-loopback device is one end
  of a veth pair whose other end is in the same namespace: it gives the namespace the default
  route pasta wants to copy, and anything sent to an unknown address dies there.
- every **transport** opens a client namespace for one MTU: ``ipferry connect`` (its sandbox),
  ``pasta`` and ``slirp4netns`` attached to a keeper made with ``unshare --user --net`` (they run
  in the server namespace, so *it* is their "host"), or a veth pair into the server namespace
  (the kernel's own forwarding: the limit). Clients run in it with ``nsenter --net``.

Every process is started in a session of its own and registered with :class:`Reaper`, which kills
those sessions and deletes the namespaces on exit, on errors and on Ctrl-C.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers import IPFERRY, NO_CAPS, Daemon, NetNs, proc_children  # noqa: E402

SERVER_ADDR = "198.18.0.1"
IPERF_PORT = 5201
RR_PORT = 5300
KEEPER = ["sleep", "infinity"]  # what holds a client namespace open while workloads run in it
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() \
    else sys.executable
RR = str(REPO / "bench" / "rr.py")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def sh(*cmd: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")


class Reaper:
    """Whatever the run started, ended however the run ends."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.namespaces: list[NetNs] = []
        self.daemons: list[Daemon] = []
        self.dirs: list[Path] = []
        atexit.register(self.close)

    def popen(self, cmd: list[str], log: Path | None = None, **kw) -> subprocess.Popen:
        out = open(log, "ab") if log else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, **kw)
        finally:
            if log:
                out.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 5) -> None:
        """SIGTERM the process's session, then SIGKILL what is left of it."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # the session may outlive its leader (a keeper whose proxy died first)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc in self.procs:
            self.procs.remove(proc)

    def netns(self, name: str) -> NetNs:
        ns = NetNs(name)
        self.namespaces.append(ns)
        return ns

    def tmpdir(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix="ipfbench-"))
        self.dirs.append(path)
        return path

    def close(self) -> None:
        while self.procs:
            self.stop(self.procs[-1], grace=2)
        while self.daemons:
            self.daemons.pop().destroy()
        while self.namespaces:
            self.namespaces.pop().delete()
        while self.dirs:
            shutil.rmtree(self.dirs.pop(), ignore_errors=True)


def in_netns(netns: str, *cmd: str) -> list[str]:
    return ["nsenter", f"--net={netns}", *cmd]


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLK_TCK


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = proc_children(todo.pop())
        out += kids
        todo += kids
    return out


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def wait_for_keeper(launcher: subprocess.Popen, timeout: float = 20) -> int:
    """The pid of the KEEPER somewhere below ``launcher`` (its namespace is the client's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            raise RuntimeError(f"exited with status {launcher.returncode} before its namespace "
                               f"was up")
        for pid in [launcher.pid, *descendants(launcher.pid)]:
            if cmdline(pid) == KEEPER:
                return pid
        time.sleep(0.02)
    raise RuntimeError(f"no namespace keeper after {timeout}s")


class ServerNamespace:
    """The namespace the servers, the daemons and the userspace proxies live in."""

    def __init__(self, reaper: Reaper, tmp: Path) -> None:
        self.reaper = reaper
        self.tmp = tmp
        self.ns = reaper.netns(f"ipfbench-{os.getpid()}-srv")
        self.path = self.ns.path
        name = self.ns.name
        # A veth pair with both ends here: a default route for pasta to copy, and a dead end.
        sh("ip", "-n", name, "link", "add", "ipfb0", "type", "veth", "peer", "name", "ipfb1")
        sh("ip", "-n", name, "addr", "add", f"{SERVER_ADDR}/24", "dev", "ipfb0")
        for dev in ("ipfb0", "ipfb1"):
            sh("ip", "-n", name, "link", "set", dev, "up")
        sh("ip", "-n", name, "route", "add", "default", "via", "198.18.0.254", "dev", "ipfb0")
        # Thousands of short connections a run, many closed here by the proxies: a wide port
        # range and TIME_WAIT reuse so that no cell runs out of ports.
        sysctl(self.path, {"net.ipv4.ip_local_port_range": "1024 65535",
                           "net.ipv4.tcp_tw_reuse": "1"})
        self.iperf: subprocess.Popen | None = None
        self.start_iperf()
        self.rr = reaper.popen(in_netns(self.path, PYTHON, RR, "serve", "--host", SERVER_ADDR,
                                        "--port", str(RR_PORT)), log=tmp / "rr-server.log")
        time.sleep(0.3)

    def start_iperf(self) -> None:
        if self.iperf is not None:
            self.reaper.stop(self.iperf, grace=1)
        self.iperf = self.reaper.popen(in_netns(self.path, "iperf3", "-s", "-B", SERVER_ADDR,
                                                "-p", str(IPERF_PORT)),
                                       log=self.tmp / "iperf3-server.log")
        time.sleep(0.3)


def sysctl(netns: str, values: dict[str, str]) -> None:
    for key, value in values.items():
        sh(*in_netns(netns, "sysctl", "-q", "-w", f"{key}={value}"))


@dataclass
class Client:
    """A client namespace for one MTU; ``proxy_pids`` are the processes whose CPU is the cost."""

    netns: str  # a path nsenter --net takes
    proxy_pids: Callable[[], list[int]]
    close: Callable[[], None]
    server: str = SERVER_ADDR  # where the workloads' iperf3 and rr.py servers listen
    restart_iperf: Callable[[], None] | None = None  # None: the server namespace's

    def cmd(self, *argv: str) -> list[str]:
        return in_netns(self.netns, *argv)


class Transport:
    id: str = ""
    label: str = ""
    needs: tuple[str, ...] = ()  # commands it runs

    def start(self) -> None:
        """Once per benchmark run (daemons)."""

    def open(self, mtu: int) -> Client:
        raise NotImplementedError


class IpferryDaemon:
    """``ipferry run --workers N`` in the server namespace, no capabilities (as the tests run it)."""

    def __init__(self, server: ServerNamespace, reaper: Reaper, workers: int,
                 gue_listen: str | None, extra_config: str = "") -> None:
        self.server, self.reaper, self.workers = server, reaper, workers
        self.gue_listen = gue_listen
        self.extra_config = extra_config  # e.g. [[networks]] and [[rules]] (bench/devices.py)
        self.daemon: Daemon | None = None

    def start(self) -> None:
        if self.daemon is not None:
            return
        tmp = self.reaper.tmpdir()
        run = tmp / "run"
        run.mkdir()
        config = f'[audit]\nsink = "{tmp / "audit.jsonl"}"\n\n[[onramps]]\nkind = "tunnel"\n'
        if self.gue_listen:
            config += f'\n[[onramps]]\nkind = "gue"\nlisten = "{self.gue_listen}"\n'
        config += self.extra_config
        self.daemon = Daemon(self.server.ns, run, tmp, config=config, no_caps=True, env=None)
        self.reaper.daemons.append(self.daemon)
        self.daemon.start("--workers", str(self.workers), "--admin-listen", "")
        self.daemon.wait_ready()

    @property
    def tunnel(self) -> str:
        return str(self.daemon.runtime_dir / "tunnel.sock")

    def pids(self) -> list[int]:
        return [self.daemon.pid, *proc_children(self.daemon.pid)]


class IpferryConnect(Transport):
    """``ipferry connect`` over the connected tunnel (or, with ``gue``, the GUE on-ramp)."""

    needs = ("nsenter", "setpriv")

    def __init__(self, daemon: IpferryDaemon, reaper: Reaper, tmp: Path, gue: bool = False) -> None:
        self.daemon, self.reaper, self.tmp, self.gue = daemon, reaper, tmp, gue
        self.id = "ipferry-gue" if gue else f"ipferry-w{daemon.workers}"
        self.label = f"ipferry GUE w={daemon.workers}" if gue else f"ipferry w={daemon.workers}"

    def start(self) -> None:
        self.daemon.start()

    def open(self, mtu: int) -> Client:
        how = ["--gue", self.daemon.gue_listen] if self.gue else ["--tunnel", self.daemon.tunnel]
        # Run in the server namespace: the GUE on-ramp listens on its loopback.
        launcher = self.reaper.popen(
            in_netns(self.daemon.server.path, *NO_CAPS, IPFERRY, "connect", *how,
                     "--tenant", "bench", "--mtu", str(mtu), "--", *KEEPER),
            log=self.tmp / f"{self.id}-connect.log")
        try:
            keeper = wait_for_keeper(launcher)
        except RuntimeError as exc:
            self.reaper.stop(launcher)
            raise RuntimeError(f"ipferry connect {exc}: "
                               f"{(self.tmp / f'{self.id}-connect.log').read_text()[-500:]}") from None

        def pids() -> list[int]:
            # the daemon, the connect process (its pump threads) and its sandbox keeper
            own = [launcher.pid, *(p for p in proc_children(launcher.pid) if p != keeper)]
            return self.daemon.pids() + own

        return Client(f"/proc/{keeper}/ns/net", pids, lambda: self.reaper.stop(launcher))


class KeptNamespace:
    """A client namespace made by ``unshare --user --net`` in the server namespace, which a
    rootless proxy then attaches to by pid (how podman uses both pasta and slirp4netns)."""

    def __init__(self, server: ServerNamespace, reaper: Reaper) -> None:
        self.reaper = reaper
        self.keeper = reaper.popen(in_netns(server.path, *NO_CAPS, "unshare", "--user", "--net",
                                            "--", *KEEPER))
        self.pid = wait_for_keeper(self.keeper)

    def close(self) -> None:
        self.reaper.stop(self.keeper, grace=1)


class Pasta(Transport):
    id, label, needs = "pasta", "pasta", ("pasta", "unshare", "nsenter", "setpriv")

    def __init__(self, server: ServerNamespace, reaper: Reaper, tmp: Path) -> None:
        self.server, self.reaper, self.tmp = server, reaper, tmp

    def open(self, mtu: int) -> Client:
        kept = KeptNamespace(self.server, self.reaper)
        # --runas 0: pasta would otherwise switch to "nobody", which cannot open this machine's
        # 0600 /dev/net/tun; it runs as root *without capabilities* instead, like the daemon.
        # An address of its own for the guest (the host's would make 198.18.0.1 local there),
        # no port forwarding in either direction, IPv4 only, the gateway not mapped to the host.
        proxy = self.reaper.popen(
            in_netns(self.server.path, *NO_CAPS, "pasta", "--runas", "0", "--config-net", "-f",
                     "-q", "-4", "-m", str(mtu), "-a", "10.0.3.2", "-n", "24", "-g", "10.0.3.1",
                     "--no-map-gw", "-t", "none", "-u", "none", "-T", "none", "-U", "none",
                     str(kept.pid)),
            log=self.tmp / "pasta.log")

        def close() -> None:
            self.reaper.stop(proxy, grace=1)
            kept.close()

        return Client(f"/proc/{kept.pid}/ns/net", lambda: [proxy.pid], close)


class Slirp4netns(Transport):
    id, label, needs = "slirp4netns", "slirp4netns", ("slirp4netns", "unshare", "nsenter", "setpriv")

    def __init__(self, server: ServerNamespace, reaper: Reaper, tmp: Path) -> None:
        self.server, self.reaper, self.tmp = server, reaper, tmp

    def open(self, mtu: int) -> Client:
        kept = KeptNamespace(self.server, self.reaper)
        # --configure: tap0 10.0.2.100/24, default route via 10.0.2.2 (slirp's gateway), which
        # connects out of the server namespace; --disable-host-loopback: 10.0.2.2 is not the
        # server namespace's 127.0.0.1.
        proxy = self.reaper.popen(
            in_netns(self.server.path, *NO_CAPS, "slirp4netns", "--configure", "--mtu", str(mtu),
                     "--disable-host-loopback", str(kept.pid), "tap0"),
            log=self.tmp / "slirp4netns.log")

        def close() -> None:
            self.reaper.stop(proxy, grace=1)
            kept.close()

        return Client(f"/proc/{kept.pid}/ns/net", lambda: [proxy.pid], close)


RELAY_ADDR = "10.96.0.1"  # the relay's listening address in the server namespace

HAPROXY_CONFIG = """\
global
    maxconn 4000
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option splice-auto
listen iperf3
    bind {relay}:{iperf}
    server iperf3 {server}:{iperf}
listen rr
    bind {relay}:{rr}
    server rr {server}:{rr}
"""


class Relay(Transport):
    """The floor of ipferry's TCP design, without ipferry: a veth pair from a client namespace
    into the server namespace, where HAProxy (one thread, splice) terminates the client's TCP in
    the kernel and relays to the servers over a second kernel TCP connection. That is ipferry's
    upgrade path minus the TUN hop, with a relay written in C: what no Python can beat. TCP only
    (HAProxy relays no UDP): the UDP rows show ``-``."""

    id, label, needs = "haproxy", "haproxy (relay floor)", ("haproxy", "ip", "nsenter")
    without = ("udp",)  # workload groups it does not carry

    def __init__(self, server: ServerNamespace, reaper: Reaper, tmp: Path) -> None:
        self.server, self.reaper, self.tmp = server, reaper, tmp
        self.ns: NetNs | None = None
        self.proxy: subprocess.Popen | None = None
        tag = os.getpid()
        self.devs = (f"ipfr{tag}c", f"ipfr{tag}s")

    def start(self) -> None:
        self.ns = self.reaper.netns(f"ipfbench-{os.getpid()}-relay")
        cli, srv = self.devs
        sh("ip", "link", "add", cli, "netns", self.ns.name, "type", "veth", "peer", "name", srv,
           "netns", self.server.ns.name)
        sh("ip", "-n", self.ns.name, "addr", "add", "10.96.0.2/30", "dev", cli)
        sh("ip", "-n", self.server.ns.name, "addr", "add", f"{RELAY_ADDR}/30", "dev", srv)
        sh("ip", "-n", self.ns.name, "link", "set", cli, "up")
        sh("ip", "-n", self.server.ns.name, "link", "set", srv, "up")
        sh("ip", "-n", self.ns.name, "route", "add", "default", "via", RELAY_ADDR)
        sysctl(self.ns.path, {"net.ipv4.ip_local_port_range": "1024 65535",
                              "net.ipv4.tcp_tw_reuse": "1"})
        config = self.tmp / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(relay=RELAY_ADDR, server=SERVER_ADDR,
                                                iperf=IPERF_PORT, rr=RR_PORT))
        self.proxy = self.reaper.popen(in_netns(self.server.path, "haproxy", "-db", "-f",
                                                str(config)), log=self.tmp / "haproxy.log")
        time.sleep(0.5)
        if self.proxy.poll() is not None:
            raise RuntimeError(f"haproxy exited: {(self.tmp / 'haproxy.log').read_text()[-300:]}")

    def open(self, mtu: int) -> Client:
        cli, srv = self.devs
        sh("ip", "-n", self.ns.name, "link", "set", cli, "mtu", str(mtu))
        sh("ip", "-n", self.server.ns.name, "link", "set", srv, "mtu", str(mtu))
        proxy = self.proxy
        return Client(self.ns.path, lambda: [proxy.pid] if proxy else [], lambda: None,
                      server=RELAY_ADDR)


class Veth(Transport):
    """A veth pair from a client namespace into the server namespace, routed: the kernel's path."""

    id, label, needs = "veth", "veth (limit)", ("ip", "nsenter")

    def __init__(self, server: ServerNamespace, reaper: Reaper) -> None:
        self.server, self.reaper = server, reaper
        self.ns: NetNs | None = None
        tag = os.getpid()
        self.devs = (f"ipfb{tag}c", f"ipfb{tag}s")

    def start(self) -> None:
        self.ns = self.reaper.netns(f"ipfbench-{os.getpid()}-veth")
        cli, srv = self.devs
        sh("ip", "link", "add", cli, "netns", self.ns.name, "type", "veth", "peer", "name", srv,
           "netns", self.server.ns.name)
        sh("ip", "-n", self.ns.name, "addr", "add", "10.97.0.2/30", "dev", cli)
        sh("ip", "-n", self.server.ns.name, "addr", "add", "10.97.0.1/30", "dev", srv)
        sh("ip", "-n", self.ns.name, "link", "set", cli, "up")
        sh("ip", "-n", self.server.ns.name, "link", "set", srv, "up")
        sh("ip", "-n", self.ns.name, "route", "add", "default", "via", "10.97.0.1")
        sysctl(self.ns.path, {"net.ipv4.ip_local_port_range": "1024 65535",
                              "net.ipv4.tcp_tw_reuse": "1"})

    def open(self, mtu: int) -> Client:
        cli, srv = self.devs
        sh("ip", "-n", self.ns.name, "link", "set", cli, "mtu", str(mtu))
        sh("ip", "-n", self.server.ns.name, "link", "set", srv, "mtu", str(mtu))
        return Client(self.ns.path, lambda: [], lambda: None)
