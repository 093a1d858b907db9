"""Real-kernel test helpers: network namespaces, the daemon as a process tree, its admin API."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from ipferry.nsd.namespace import CLONE_NEWNET, setns
from ipferry.supervisor.adminclient import UnixHTTPConnection

VENV_BIN = Path(sys.executable).parent
IPFERRY = str(VENV_BIN / "ipferry")
NO_CAPS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all",
           "--no-new-privs", "--"]


def require_kernel_features() -> str | None:
    if os.geteuid() != 0:
        return "run the tests as root (they create network namespaces with ip netns)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (modprobe tun)"
    for tool in ("ip", "nsenter", "setpriv", "unshare"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"{tool} is not installed (apt-get install iproute2 util-linux)"
    return None


class DaemonExited(AssertionError):
    """The daemon is gone: no point in polling on."""


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except DaemonExited:
            raise
        except Exception as exc:  # keep polling; report the last failure if we time out
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f" (last error: {last_exc!r})" if last_exc else ""))


class NetNs:
    """A named network namespace (``ip netns``) with loopback up; deleted on teardown."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = f"/run/netns/{name}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        try:
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        except BaseException:
            self.delete()
            raise

    def run(self, fn, *args):
        """Run ``fn`` in a thread that has entered this namespace (sockets it makes live here)."""
        def inside():
            fd = os.open(self.path, os.O_RDONLY)
            try:
                setns(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
            return fn(*args)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(inside).result(timeout=30)

    def http(self, method: str, host: str, port: int, path: str,
             headers: dict | None = None) -> tuple[int, bytes]:
        return self.run(lambda: exchange(http.client.HTTPConnection(host, port, timeout=10),
                                         method, path, headers))

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def exchange(conn: http.client.HTTPConnection, method: str, path: str,
             headers: dict | None = None) -> tuple[int, bytes]:
    """One request on a fresh connection: (status, body)."""
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def proc_children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(entry))
    return out


def proc_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


class Daemon:
    """``ipferry run`` inside a test namespace, in its own process group, logs to a file."""

    def __init__(self, netns: NetNs, runtime_dir: Path, tmp: Path, *, config: str | None,
                 no_caps: bool, env: dict | None) -> None:
        self.netns = netns
        self.runtime_dir = runtime_dir
        self.config_path = tmp / "ipferry.toml" if config is not None else None
        if config is not None:
            self.config_path.write_text(config)
        self.no_caps = no_caps
        self.env = {**os.environ, "RUNTIME_DIRECTORY": str(runtime_dir), **(env or {})}
        self.log_path = tmp / f"daemon-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen | None = None
        self.seen_pids: set[int] = set()

    @property
    def admin_socket(self) -> str:
        return str(self.runtime_dir / "admin.sock")

    def command(self, *args: str, sh_prefix: str | None = None) -> list[str]:
        cmd = ["nsenter", f"--net={self.netns.path}"]
        if self.no_caps:
            cmd += NO_CAPS
        if sh_prefix is not None:  # e.g. to set LISTEN_PID=$$ for socket activation
            cmd += ["bash", "-c", f'{sh_prefix} exec "$@"', "bash"]
        cmd += [IPFERRY, "run", "--log-format", "json"]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd + list(args)

    def start(self, *args: str, sh_prefix: str | None = None, pass_fds=()) -> None:
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command(*args, sh_prefix=sh_prefix), stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, start_new_session=True, pass_fds=pass_fds)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> str:
        return self.log_path.read_text()

    def log_events(self) -> list[dict]:
        out = []
        for line in self.logs().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def request(self, method: str, path: str, headers: dict | None = None) -> tuple[int, bytes]:
        return exchange(UnixHTTPConnection(self.admin_socket, 10), method, path, headers)

    def get_json(self, path: str):
        status, body = self.request("GET", path)
        assert status == 200, (path, status, body)
        return json.loads(body)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise DaemonExited(f"daemon exited with {self.proc.returncode}:\n{self.logs()}")
        try:
            return self.request("GET", "/readyz")[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 30) -> None:
        wait_for(self.ready, timeout, f"/readyz 200; logs:\n{self.logs()[-3000:]}")
        self.seen_pids.update(self.children())

    def workers(self) -> list[dict]:
        return self.get_json("/api/workers")

    def status(self) -> dict:
        return self.get_json("/api/status")

    def nsd_pid(self) -> int:
        return self.status()["nsd"]["pid"]

    def metrics(self) -> dict[tuple[str, tuple], float]:
        status, body = self.request("GET", "/metrics")
        assert status == 200, body
        out = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def children(self) -> list[int]:
        kids = proc_children(self.pid)
        self.seen_pids.update(kids)
        return kids

    def in_namespace(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command inside nsd's network namespace (as the test's root)."""
        return subprocess.run(["nsenter", "-t", str(self.nsd_pid()), "-n", "--", *cmd],
                              capture_output=True, text=True, timeout=30, check=check)

    def terminate(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def destroy(self) -> None:
        """Leave nothing behind, whatever state the test left the daemon in."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.seen_pids.update(proc_children(self.pid))
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in self.seen_pids:
            if alive(pid) and proc_cmdline(pid).startswith("ipferry:"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


def run_script(argv: list[str], timeout: float, what: str, grace: float = 20) -> str:
    """Run a bench/ script as a process of its own (as by hand) and return its output; one that
    overruns ``timeout`` is asked to stop (SIGTERM: its own cleanup of daemons and namespaces),
    killed after ``grace`` seconds more, and fails the test; one that fails, fails it."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            log, _ = proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
        raise AssertionError(f"{what} overran:\n{log.decode()[-3000:]}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.decode()
    assert proc.returncode == 0, text[-4000:]
    return text


def namespaces(prefix: str) -> set[str]:
    """The network namespaces whose names start with ``prefix`` (a script's leftovers)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith(prefix)}
