"""The soak: churn everything for a while, kill workers now and then, watch memory and fds.

    .venv/bin/python bench/soak.py --duration 1800 [--workers 2] [--kill-every 60] [--json out]

In a network namespace of its own, with ``ipferry run`` there (no capabilities) and the test
servers of tests/e2e, it runs at once, for ``--duration`` seconds:

- **TCP**: ``ipferry connect`` sessions (connected tunnels with and without offload, and GUE)
  whose client makes short connections one after another: GETs and PUTs of 1 KiB to 8 MiB,
  each checked by SHA-256. A stream that ends cleanly with other bytes than sent is
  *corrupted*; one cut by a reset is *cut* (expected only around a worker kill);
- **UDP**: sessions whose client opens a flow after another (a new socket each time) and
  checks every echo (one that comes after its wait ran out is *late*, not the next one's);
- **tunnels**: raw connected tunnels opened and closed (with and without the vnet mark), a few
  packets each, their answers checked;
- **admin**: scrapes of ``/metrics``, ``/api/flows`` paged to the end by cursor and by offset,
  ``/api/tunnels``, ``/api/status`` (every ``/api/*`` answer must be strict JSON);
- **kills**: every ``--kill-every`` seconds a worker is restarted, alternately by ``POST
  /api/workers/N/restart`` on the admin unix socket and by SIGKILL, alternately worker 0 and 1.
  A connected session whose tunnel went with it must end (``ipferry connect`` ends its
  command); one that runs on 3 s after its tunnel left ``/api/tunnels`` is ended here and
  counted in ``sessions`` as ``connect missed the close of its tunnel`` (a race in
  nsd/connect.py, not the daemon's), not judged.

A sampler reads VmRSS and the open fds of the supervisor, nsd and every worker from /proc every
``--sample-every`` seconds, tracking them by role and index (a restarted worker is a new pid,
another incarnation of the same slot). At the end the load stops, flows drain, and the fds of
the idle daemon are compared with those it had idle at the start.

Growth is measured per incarnation after warm-up (``--warmup`` seconds into the run, and
``--restart-warmup`` seconds into a restarted worker's life): for RSS the median of the last
fifth of its samples minus the median of the first fifth; for open fds, which follow the flows
of the moment (a TCP flow holds two sockets, a UDP flow one), the same with the floor (minimum)
of each fifth. The exact fd leak check is idle against idle: the fds of each process with no
flow and no tunnel, before the load and after it drained. The run fails (exit 1) on RSS growth
above ``--max-rss-growth`` MiB, fd growth above ``--max-fd-growth`` under load or above
``--max-idle-fd-growth`` idle, any corrupted transfer or echo, a cut stream away from any kill,
an ``/api/*`` answer that is not strict JSON, restarts other than those it made, or a daemon
not ready at the end. It prints a table and writes the whole record (every sample) as JSON with
``--json``. Everything it starts is stopped and its namespace deleted on any exit (SIGTERM and
^C included).

The clients run inside ``ipferry connect`` as ``python bench/soak.py --client tcp|udp ...``
(standard library only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVER_ADDR, SERVER_ADDR6 = "198.18.0.1", "fd18::1"
STREAM_PORT, UDP_PORT = 9000, 7007
GUE = "127.0.0.1:6080"
TENANT = "soak"
# A client waiting for data from a flow whose owner was killed sends nothing, so nothing tells it
# (datapath.md: the client learns on its next packet): it gives up after this long.
CLIENT_TIMEOUT = 10.0

# -- the clients (inside ipferry connect: standard library only) ------------------------------------

_BLOCK = hashlib.sha256(b"ipferry").digest() * 2048  # tests/e2e/streams.py's pattern, 64 KiB
_SHA: dict[int, str] = {}


def _expected(n: int) -> str:
    if n not in _SHA:
        h = hashlib.sha256()
        for _ in range(n // len(_BLOCK)):
            h.update(_BLOCK)
        h.update(_BLOCK[:n % len(_BLOCK)])
        _SHA[n] = h.hexdigest()
    return _SHA[n]


class _Tally:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.counts: dict[str, int] = {}
        self.bytes = 0
        self.cuts: list[tuple[float, str]] = []  # (wall-clock time, what) of cut streams
        self.corrupt: list[str] = []
        self.lock = threading.Lock()

    def add(self, outcome: str, n: int = 0, what: str = "") -> None:
        with self.lock:
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
            self.bytes += n
            if outcome in ("cut", "lost"):
                self.cuts.append((round(time.time(), 3), what))
            elif outcome == "corrupted" and len(self.corrupt) < 20:
                self.corrupt.append(what)

    def dump(self) -> str:
        with self.lock:
            return json.dumps({"kind": self.kind, "counts": self.counts, "bytes": self.bytes,
                               "cuts": self.cuts[-500:], "corrupt": self.corrupt})


def _tcp_one(rng: random.Random, tally: _Tally, addr: str) -> None:
    n = rng.choice([1 << 10] * 3 + [64 << 10] * 3 + [1 << 20] * 3 + [8 << 20])
    put = rng.random() < 0.3
    got = 0
    started = time.time()
    where = "connecting"
    try:
        with socket.create_connection((addr, STREAM_PORT), timeout=CLIENT_TIMEOUT) as s:
            where = f"connected from port {s.getsockname()[1]} at {time.time():.3f}"
            if put:
                s.sendall(f"PUT {n}\n".encode())
                sent = 0
                view = memoryview(_BLOCK)
                while sent < n:
                    off = sent % len(_BLOCK)
                    sent += s.send(view[off:min(len(_BLOCK), off + n - sent)])
                reply = s.makefile().readline().strip()
                if not reply:
                    tally.add("cut", 0, f"PUT {n}: no reply")
                elif reply != _expected(n):
                    tally.add("corrupted", 0, f"PUT {n}: server saw {reply}")
                else:
                    tally.add("ok", n)
                return
            s.sendall(f"GET {n}\n".encode())
            h, got = hashlib.sha256(), 0
            while chunk := s.recv(1 << 20):
                h.update(chunk)
                got += len(chunk)
        if got == n and h.hexdigest() == _expected(n):
            tally.add("ok", n)
        else:  # a clean end with other bytes: the one thing that must never happen
            tally.add("corrupted", got, f"GET {n}: {got} bytes, sha256 {h.hexdigest()}")
    except (OSError, TimeoutError) as exc:
        tally.add("cut", 0, f"{'PUT' if put else 'GET'} {n} to {addr} after {got} bytes, "
                            f"started {started:.3f}, {where}: {type(exc).__name__} {exc}")


def _udp_one(rng: random.Random, tally: _Tally, addr: str) -> None:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:  # a new source port: a new flow
        s.settimeout(1.0)
        try:
            s.connect((addr, UDP_PORT))
            # Echoes given up on: one may still come, late (e.g. held in the owner's socket
            # while a killed worker restarts), and is not the next datagram's.
            late: set[bytes] = set()
            for i in range(rng.randrange(1, 20)):
                payload = i.to_bytes(4, "big") + rng.randbytes(rng.randrange(0, 1400))
                s.send(payload)
                try:
                    echo = s.recv(2048)
                    while echo in late:
                        late.discard(echo)
                        tally.add("late")
                        echo = s.recv(2048)
                except TimeoutError:
                    tally.add("lost")
                    late.add(payload)
                    continue
                if echo == payload:
                    tally.add("ok", len(payload))
                else:
                    tally.add("corrupted", 0, f"echo {echo[:16].hex()} for {payload[:16].hex()}")
        except OSError:
            tally.add("lost")


def client(kind: str, seconds: float, threads: int) -> int:
    """Loop ``kind`` operations for ``seconds`` on ``threads`` threads; print the tally (also
    when ``ipferry connect`` ends us with SIGTERM because its tunnel closed)."""
    tally = _Tally(kind)
    stop = threading.Event()

    def on_term(signum, frame):
        print(tally.dump(), flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    deadline = time.monotonic() + seconds

    def loop(i: int) -> None:
        rng = random.Random(os.getpid() * 100 + i)
        while not stop.is_set() and time.monotonic() < deadline:
            addr = SERVER_ADDR6 if rng.random() < 0.25 else SERVER_ADDR
            (_tcp_one if kind == "tcp" else _udp_one)(rng, tally, addr)

    workers = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(seconds + 60)
    print(tally.dump(), flush=True)
    return 0


# -- the soak ----------------------------------------------------------------------------------------

class Soak:
    def __init__(self, args) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.procs: list[subprocess.Popen] = []  # each in a session of its own: killpg'd
        self.threads: list[threading.Thread] = []
        self.samples: list[dict] = []  # {"t", "role", "index", "pid", "rss", "fds"}
        self.kills: list[dict] = []
        self.tallies: dict[str, dict] = {"tcp": {}, "udp": {}}
        self.bytes = {"tcp": 0, "udp": 0}
        self.cuts: list[tuple[float, str]] = []  # (wall-clock time, what) of cut TCP streams
        self.sessions: dict[str, int] = {}
        self.live: dict[str, dict] = {}  # connected sessions running: sid -> proc, since, missing
        self.tunnels: dict[str, int] = {}
        self.admin: dict[str, int] = {}
        self.idle: dict[str, dict] = {}
        self.ns = None
        self.daemon = None
        self.tmp = None
        self.t0 = 0.0

    def problem(self, text: str) -> None:
        with self.lock:
            if len(self.problems) < 100:
                self.problems.append(text)

    def count(self, table: dict, key: str, n: int = 1) -> None:
        with self.lock:
            table[key] = table.get(key, 0) + n

    # -- set-up and teardown -------------------------------------------------------------------

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL, **kw)
        with self.lock:
            self.procs.append(proc)
        return proc

    def start(self) -> None:
        import tempfile

        from tests.helpers import Daemon, NetNs
        self.tmp = Path(tempfile.mkdtemp(prefix="ipferry-soak-"))
        self.ns = NetNs(self.args.netns or f"ipfsoak-{os.getpid()}")
        for cmd in (["addr", "add", f"{SERVER_ADDR}/32", "dev", "lo"],
                    ["-6", "addr", "add", f"{SERVER_ADDR6}/128", "dev", "lo", "nodad"]):
            subprocess.run(["ip", "-n", self.ns.name, *cmd], check=True)
        subprocess.run(["ip", "netns", "exec", self.ns.name, "sysctl", "-qw",
                        "net.ipv4.ping_group_range=0 2147483647",
                        "net.ipv4.ip_local_port_range=1024 65535",
                        "net.ipv4.tcp_tw_reuse=1"], check=True, capture_output=True)
        streams = str(REPO / "tests" / "e2e" / "streams.py")
        datagrams = str(REPO / "tests" / "e2e" / "datagrams.py")
        for argv in ([streams, "serve", SERVER_ADDR, str(STREAM_PORT)],
                     [streams, "serve", SERVER_ADDR6, str(STREAM_PORT)],
                     [datagrams, "echo-server", SERVER_ADDR, str(UDP_PORT)],
                     [datagrams, "echo-server", SERVER_ADDR6, str(UDP_PORT)]):
            proc = self.popen(["nsenter", f"--net={self.ns.path}", sys.executable, *argv],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            if proc.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"server {argv} did not start")
        run = self.tmp / "run"
        run.mkdir()
        os.chmod(run, 0o755)
        config = f"""\
[audit]
sink = "{self.tmp / 'audit.jsonl'}"

[flows]
tcp_syn_sent = 5
tcp_established = 30
tcp_fin_wait = 5
tcp_closing = 5
udp_unreplied = 5
udp_replied = 5
icmp = 5

[supervision]
crash_loop_limit = 1000

[[onramps]]
kind = "tunnel"

[[onramps]]
kind = "gue"
listen = "{GUE}"
"""
        self.daemon = Daemon(self.ns, run, self.tmp, config=config, no_caps=True, env=None)
        self.daemon.start("--workers", str(self.args.workers))
        self.daemon.wait_ready()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        with self.lock:
            procs = list(self.procs)
        for proc in procs:
            if proc.poll() is None:
                self.kill_tree(proc)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(3)
                    break
                except subprocess.TimeoutExpired:
                    continue
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # what the leader left behind
            except ProcessLookupError:
                pass
        if self.daemon is not None and self.daemon.proc is not None:
            self.daemon.destroy()
        if self.ns is not None:
            out = subprocess.run(["ip", "netns", "pids", self.ns.name], capture_output=True,
                                 text=True).stdout.split()
            for pid in out:  # anything still in our namespace
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            self.ns.delete()
        if self.tmp is not None and not self.args.keep:
            import shutil
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif self.tmp is not None:
            print(f"kept {self.tmp}", file=sys.stderr)

    # -- the process table -------------------------------------------------------------------------

    def processes(self) -> dict[tuple[str, int], int]:
        """(role, index) -> pid of the daemon's processes now (index -1 for supervisor, nsd)."""
        from tests.helpers import proc_children, proc_cmdline
        sup = self.daemon.pid
        out = {("supervisor", -1): sup}
        for pid in proc_children(sup):
            cmd = proc_cmdline(pid)
            if cmd.startswith("ipferry: worker "):
                out[("worker", int(cmd.split()[2]))] = pid
            elif cmd.startswith("ipferry: nsd"):
                out[("nsd", -1)] = pid
        return out

    @staticmethod
    def measure(pid: int) -> tuple[int, int] | None:
        """(VmRSS in KiB, open fds) of ``pid``, None if it is gone."""
        try:
            with open(f"/proc/{pid}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            return rss, len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, StopIteration, ValueError):
            return None

    def sample(self) -> dict[str, dict]:
        now = time.monotonic() - self.t0
        out = {}
        for (role, index), pid in self.processes().items():
            m = self.measure(pid)
            if m is None:
                continue
            rec = {"t": round(now, 2), "role": role, "index": index, "pid": pid, "rss": m[0],
                   "fds": m[1]}
            out[_name(role, index)] = rec
        return out

    def sampler(self) -> None:
        while not self.stop.is_set():
            recs = self.sample()
            with self.lock:
                self.samples.extend(recs.values())
            self.stop.wait(self.args.sample_every)

    # -- load ------------------------------------------------------------------------------------------

    def session(self, slot: str, kind: str) -> None:
        """Keep an ``ipferry connect`` client of ``kind`` running in this slot until the end."""
        from tests.helpers import IPFERRY, NO_CAPS
        n = 0
        while not self.stop.is_set():
            left = self.args.duration - (time.monotonic() - self.t0)
            if left < 3:
                return
            n += 1
            how = self.rng.choice(["tunnel", "tunnel", "plain", "gue"])
            where = (["--gue", GUE] if how == "gue" else
                     ["--tunnel", str(self.daemon.runtime_dir / "tunnel.sock")])
            if how == "plain":
                where.append("--no-offload")
            enter = ["nsenter", f"--net={self.ns.path}"] if how == "gue" else []
            seconds = min(self.args.session_seconds, left - 2)
            sid = f"{slot}-{n}"
            cmd = [*enter, *NO_CAPS, IPFERRY, "connect", *where, "--tenant", TENANT,
                   "--context", json.dumps({"session": sid}), "--",
                   sys.executable, str(Path(__file__).resolve()), "--client", kind,
                   "--seconds", f"{seconds:.1f}", "--threads", "3" if kind == "tcp" else "2"]
            proc = self.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if how != "gue":
                with self.lock:
                    self.live[sid] = {"proc": proc, "since": time.monotonic(), "missing": 0}
            try:
                out, err = proc.communicate(timeout=seconds + 90)
            except subprocess.TimeoutExpired:
                self.kill_tree(proc)
                try:
                    out, err = proc.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    out, err = b"", b""
                ended_here = self.live.get(sid, {}).get("ended_here")
                (self.notes.append if ended_here else self.problem)(
                    f"{slot}: a {seconds:.0f} s session did not end in time"
                    + (" (after it was ended for missing its tunnel's close)" if ended_here
                       else ""))
            with self.lock:
                self.procs.remove(proc)
                self.live.pop(sid, None)
            self.count(self.sessions, f"{kind} {how} exit {proc.returncode}")
            lines = [x for x in out.decode(errors="replace").splitlines() if x.startswith("{")]
            if not lines:
                if not self.stop.is_set():
                    self.count(self.sessions, f"{kind} no result")
                    self.notes.append(f"{slot}: no result (exit {proc.returncode}): "
                                      f"{err.decode(errors='replace')[-300:]}")
                continue
            r = json.loads(lines[-1])
            with self.lock:
                for k, v in r["counts"].items():
                    self.tallies[kind][k] = self.tallies[kind].get(k, 0) + v
                self.bytes[kind] += r["bytes"]
                self.cuts += [(t, f"{how}: {what}") for t, what in r["cuts"] if kind == "tcp"]
            for what in r["corrupt"]:
                self.problem(f"{kind} ({how}): corrupted: {what}")

    def watch_sessions(self) -> None:
        """Connected sessions whose tunnel the daemon closed (a killed or restarted worker held
        it) must end: ``ipferry connect`` ends its command. When its tunnel has been gone for 3 s
        and it still runs, it missed the close (nsd/connect.py: a send that fails first makes
        the EOF look like our own stop), and its command would run on with a dead network and
        time out: counted and noted, and the session ended here."""
        while not self.stop.wait(1.0):
            try:
                status, body = self.scrape("/api/tunnels")
                listed = {(t.get("context") or {}).get("session") for t in json.loads(body)}
            except (OSError, ValueError):
                continue
            if status != 200:
                continue
            now = time.monotonic()
            with self.lock:
                live = list(self.live.items())
            for sid, rec in live:
                if sid in listed or now - rec["since"] < 5 or rec["proc"].poll() is not None:
                    rec["missing"] = 0
                    continue
                rec["missing"] += 1
                if rec["missing"] == 3:
                    self.count(self.sessions, "connect missed the close of its tunnel")
                    self.notes.append(f"session {sid}: its tunnel was closed by the daemon, "
                                      f"ipferry connect went on (ended here)")
                    rec["ended_here"] = True
                    try:
                        os.killpg(rec["proc"].pid, signal.SIGTERM)  # the client says its tally
                    except ProcessLookupError:
                        pass
                elif rec["missing"] == 8:
                    self.kill_tree(rec["proc"])  # whatever did not go with SIGTERM

    def kill_tree(self, proc: subprocess.Popen) -> None:
        """SIGKILL a process, its process group and every descendant (ipferry connect's
        sandbox and command live in namespaces and groups of their own)."""
        from tests.helpers import proc_children
        todo, tree = [proc.pid], []
        while todo:
            kids = proc_children(todo.pop())
            tree += kids
            todo += kids
        for pid in [proc.pid, *tree]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def raw_tunnels(self) -> None:
        """Open and close connected tunnels, a few forbidden probes each (answered "prohibited")."""
        from tests.e2e.fuzzing import FORBIDDEN4, check_reply, icmp, ipv4
        from tests.e2e.fuzzing import vnet as vn
        i = 0
        while not self.stop.is_set():
            i += 1
            framed = i % 3 == 0
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(3)
            try:
                s.connect(str(self.daemon.runtime_dir / "tunnel.sock"))
                s.send((vn.TUNNEL_MAGIC if framed else b"") +
                       json.dumps({"tenant": "soak-raw", "n": i}).encode())
                probes = self.rng.randrange(0, 4)
                for k in range(probes):
                    packet = ipv4(socket.inet_aton("10.98.200.1"), FORBIDDEN4[0], 1,
                                  icmp(8, 0, (i & 0xFFFF).to_bytes(2, "big") + k.to_bytes(2, "big"),
                                       b"soak"))
                    s.send((vn.PLAIN if framed else b"") + bytes(packet))
                for _ in range(probes):
                    data = s.recv(1 << 16)
                    if not data:
                        self.count(self.tunnels, "closed by the daemon")
                        break
                    why = check_reply(data[vn.HEADER_SIZE:] if framed else data, partial_ok=False)
                    if why:
                        self.problem(f"raw tunnel: the daemon sent {why}")
                    self.count(self.tunnels, "answers")
                self.count(self.tunnels, "opened")
            except (OSError, TimeoutError) as exc:
                self.count(self.tunnels, f"error {type(exc).__name__}")
            finally:
                s.close()
            self.stop.wait(0.02)

    def scrape(self, path: str) -> tuple[int, bytes]:
        from ipferry.supervisor.adminclient import UnixHTTPConnection
        from tests.helpers import exchange
        return exchange(UnixHTTPConnection(self.daemon.admin_socket, 30), "GET", path)

    def admin_loop(self) -> None:
        from tests.e2e.fuzzing import strict_json
        while not self.stop.is_set():
            for path in ("/metrics", "/api/flows", "/api/tunnels", "/api/status", "/readyz",
                         "/api/flows?by=offset"):
                if self.stop.is_set():
                    return
                try:
                    if path.startswith("/api/flows"):
                        self.page_flows(by_offset="offset" in path)
                        continue
                    status, body = self.scrape(path)
                except OSError as exc:
                    self.problem(f"admin {path}: {exc}")
                    continue
                self.count(self.admin, f"{path} {status}")
                if path.startswith("/api/"):
                    if status != 200:
                        self.problem(f"admin {path}: {status} {body[:200]!r}")
                        continue
                    try:
                        strict_json(body)
                    except ValueError as exc:
                        self.problem(f"admin {path}: not strict JSON: {exc}")
                elif path == "/metrics" and status != 200:
                    self.problem(f"admin /metrics: {status}")
                self.stop.wait(0.1)

    def page_flows(self, by_offset: bool) -> None:
        from tests.e2e.fuzzing import strict_json
        cursor, offset, pages = None, 0, 0
        while not self.stop.is_set() and pages < 500:
            q = f"offset={offset}" if by_offset else (f"after={cursor}" if cursor else "")
            status, body = self.scrape(f"/api/flows?limit=200&{q}")
            pages += 1
            if status != 200:
                # A cursor of a worker gone since is answered 400 at worst: counted, not judged.
                self.count(self.admin, f"/api/flows {status}")
                if status != 400:
                    self.problem(f"admin /api/flows: {status} {body[:200]!r}")
                return
            try:
                page = strict_json(body)
            except ValueError as exc:
                self.problem(f"admin /api/flows: not strict JSON: {exc}")
                return
            self.count(self.admin, "/api/flows pages")
            if by_offset:
                offset += len(page["flows"])
                if not page["flows"]:
                    return
            else:
                cursor = page.get("next")
                if not cursor:
                    return

    def killer(self) -> None:
        n = 0
        while not self.stop.wait(self.args.kill_every):
            if time.monotonic() - self.t0 > self.args.duration - 5:
                return
            index = n % self.args.workers
            how = "api" if n % 2 == 0 else "sigkill"
            n += 1
            before = self.processes().get(("worker", index))
            t = time.monotonic() - self.t0
            wall = time.time()
            if how == "api":
                from ipferry.supervisor.adminclient import UnixHTTPConnection
                from tests.helpers import exchange
                status, body = exchange(UnixHTTPConnection(self.daemon.admin_socket, 30), "POST",
                                        f"/api/workers/{index}/restart")
                if status != 202:
                    self.problem(f"restart of worker {index}: {status} {body[:200]!r}")
                    continue
            else:
                try:
                    os.kill(before, signal.SIGKILL)
                except (ProcessLookupError, TypeError):
                    self.problem(f"no worker {index} to kill")
                    continue
            deadline = time.monotonic() + 30
            ready = None
            while time.monotonic() < deadline and not self.stop.is_set():
                now = self.processes().get(("worker", index))
                try:
                    ok = self.daemon.ready()
                except Exception:  # noqa: BLE001 - the daemon exited: judged at the end
                    ok = False
                if now and now != before and ok:
                    ready = time.monotonic() - self.t0 - t
                    break
                time.sleep(0.05)
            if ready is None and not self.stop.is_set():
                self.problem(f"worker {index} not back within 30 s of {how}")
            self.kills.append({"t": round(t, 2), "wall": wall, "index": index, "how": how,
                               "old_pid": before, "back_after": round(ready, 2) if ready else None})

    # -- the run ---------------------------------------------------------------------------------------

    def idle_fds(self) -> dict[str, int]:
        """Open fds of each process of an idle daemon: median of a few samples."""
        series: dict[str, list[int]] = {}
        for _ in range(5):
            for name, rec in self.sample().items():
                series.setdefault(name, []).append(rec["fds"])
            time.sleep(0.2)
        return {name: int(statistics.median(v)) for name, v in series.items()}

    def drain(self, timeout: float = 60) -> None:
        """Until no flow is left (short idle timeouts) and no tunnel is open."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                flows = json.loads(self.scrape("/api/flows?limit=1")[1])["total"]
                tunnels = [t for t in json.loads(self.scrape("/api/tunnels")[1])
                           if t.get("kind") != "gue"]
            except (OSError, ValueError):
                flows, tunnels = -1, []
            if flows == 0 and not tunnels:
                return
            time.sleep(0.5)
        self.notes.append(f"flows or tunnels still there {timeout} s after the load stopped")

    def run(self) -> dict:
        args = self.args
        self.start()
        self.t0 = time.monotonic()
        self.idle["start"] = self.idle_fds()
        status0 = self.daemon.status()
        jobs = [("sampler", self.sampler, ()), ("tunnels", self.raw_tunnels, ()),
                ("admin", self.admin_loop, ()), ("watch", self.watch_sessions, ())]
        jobs += [(f"tcp-{i}", self.session, (f"tcp-{i}", "tcp")) for i in range(args.tcp_sessions)]
        jobs += [(f"udp-{i}", self.session, (f"udp-{i}", "udp")) for i in range(args.udp_sessions)]
        if args.kill_every > 0:
            jobs.append(("killer", self.killer, ()))
        for name, fn, fargs in jobs:
            t = threading.Thread(target=self._guard, args=(name, fn, fargs), name=name, daemon=True)
            self.threads.append(t)
            t.start()
        last = 0.0
        while (elapsed := time.monotonic() - self.t0) < args.duration:
            if self.daemon.proc.poll() is not None:
                self.problem(f"the daemon exited with {self.daemon.proc.returncode}")
                break
            if elapsed - last >= args.progress_every:
                last = elapsed
                self.progress(elapsed)
            time.sleep(0.5)
        self.stop.set()
        for t in self.threads:
            t.join(120)
            if t.is_alive():
                self.problem(f"{t.name} did not stop")
        loaded_end = time.monotonic() - self.t0
        if self.daemon.proc.poll() is None:
            self.drain()
            self.idle["end"] = self.idle_fds()
            status1 = self.daemon.status()
            if not status1["ready"]:
                self.problem(f"not ready at the end: {status1['status']}")
            restarts = sum(w["restarts"] for w in status1["workers"]) - sum(
                w["restarts"] for w in status0["workers"])
            if restarts != len(self.kills):
                self.problem(f"{restarts} worker restarts, {len(self.kills)} kills made")
            if status1["nsd"]["restarts"] != status0["nsd"]["restarts"]:
                self.problem("nsd restarted")
        return self.result(loaded_end)

    def _guard(self, name: str, fn, fargs) -> None:
        try:
            fn(*fargs)
        except Exception as exc:  # noqa: BLE001 - a broken load thread is a failed soak
            if not self.stop.is_set():
                self.problem(f"{name}: {type(exc).__name__}: {exc}")

    def progress(self, elapsed: float) -> None:
        with self.lock:
            latest = {}
            for s in self.samples:
                latest[_name(s["role"], s["index"])] = s
            tcp, udp = dict(self.tallies["tcp"]), dict(self.tallies["udp"])
        procs = "  ".join(f"{k} {v['rss'] / 1024:.0f}M/{v['fds']}fd" for k, v in
                          sorted(latest.items()))
        print(f"{elapsed:6.0f}s  tcp {tcp}  udp {udp}  kills {len(self.kills)}  "
              f"problems {len(self.problems)}  {procs}", flush=True)

    # -- the verdict -----------------------------------------------------------------------------------

    def result(self, loaded_end: float) -> dict:
        args = self.args
        incarnations: dict[tuple[str, int], list[dict]] = {}
        for s in self.samples:
            key = (_name(s["role"], s["index"]), s["pid"])
            incarnations.setdefault(key, []).append(s)
        table = []
        for (name, pid), recs in sorted(incarnations.items(), key=lambda kv: (kv[0][0],
                                                                              kv[1][0]["t"])):
            born = recs[0]["t"]
            settle = args.warmup if born < 1 else born + args.restart_warmup
            window = [r for r in recs if r["t"] >= settle and r["t"] <= loaded_end]
            row = {"process": name, "pid": pid, "from": born, "to": recs[-1]["t"],
                   "samples": len(window), "rss_max_mib": round(max(r["rss"] for r in recs) / 1024,
                                                                1),
                   "fds_max": max(r["fds"] for r in recs)}
            if len(window) >= 5:
                k = max(1, len(window) // 5)
                # RSS: medians. Open fds follow the flows of the moment (two sockets a TCP
                # flow): their floor over each stretch, where a leak would show.
                for field, scale, pick in (("rss", 1024, statistics.median), ("fds", 1, min)):
                    first = pick(r[field] for r in window[:k])
                    last = pick(r[field] for r in window[-k:])
                    unit = "_mib" if field == "rss" else ""
                    row[f"{field}_after_warmup{unit}"] = round(first / scale, 1)
                    row[f"{field}_end{unit}"] = round(last / scale, 1)
                    row[f"{field}_growth{unit}"] = round((last - first) / scale, 1)
                if row["rss_growth_mib"] > args.max_rss_growth:
                    self.problem(f"{name} (pid {pid}): RSS grew {row['rss_growth_mib']} MiB "
                                 f"after warm-up (limit {args.max_rss_growth})")
                if row["fds_growth"] > args.max_fd_growth:
                    self.problem(f"{name} (pid {pid}): fds grew {row['fds_growth']} after "
                                 f"warm-up (limit {args.max_fd_growth})")
            table.append(row)
        idle = {}
        for name, start in self.idle.get("start", {}).items():
            end = self.idle.get("end", {}).get(name)
            idle[name] = {"start": start, "end": end}
            if end is not None and end - start > args.max_idle_fd_growth:
                self.problem(f"{name}: {end - start} more fds idle at the end than at the start "
                             f"({start} -> {end})")
        # A cut stream is expected from a worker kill (its flows and tunnels go), nowhere else.
        windows = [(k["wall"] - 1, k["wall"] + (k["back_after"] or 30) + CLIENT_TIMEOUT + 5)
                   for k in self.kills]
        stray = [c for c in self.cuts if not any(a <= c[0] <= b for a, b in windows)]
        t0_wall = time.time() - (time.monotonic() - self.t0)
        stray_info = [f"{t - t0_wall:.1f} s: {what}" for t, what in stray[:20]]
        if stray:
            self.problem(f"{len(stray)} TCP streams cut away from any worker kill: "
                         + "; ".join(stray_info[:5]))
        if not self.tallies["tcp"].get("ok") or not self.tallies["udp"].get("ok"):
            self.problem(f"no traffic went through: {self.tallies}")
        return {"duration": args.duration, "workers": args.workers, "seed": args.seed,
                "warmup": args.warmup, "table": table, "idle_fds": idle,
                "tcp": {**self.tallies["tcp"], "bytes": self.bytes["tcp"]},
                "udp": {**self.tallies["udp"], "bytes": self.bytes["udp"]},
                "cuts": len(self.cuts), "stray_cuts": len(stray), "stray_cut_info": stray_info,
                "sessions": self.sessions,
                "tunnels": self.tunnels, "admin": self.admin, "kills": self.kills,
                "problems": self.problems, "notes": self.notes[:50],
                "samples": self.samples if args.json else []}


def _name(role: str, index: int) -> str:
    return f"{role} {index}" if index >= 0 else role


def print_table(result: dict) -> None:
    head = (f"{'process':<10} {'pid':>7} {'from':>6} {'to':>6}  {'RSS MiB after warm-up':>21} "
            f"{'end':>6} {'growth':>7} {'max':>6}  {'fds after':>9} {'end':>5} {'growth':>6} "
            f"{'max':>5}  (fds: floors)")
    print(head)
    for r in result["table"]:
        if "rss_growth_mib" in r:
            print(f"{r['process']:<10} {r['pid']:>7} {r['from']:>6.0f} {r['to']:>6.0f}  "
                  f"{r['rss_after_warmup_mib']:>21.1f} {r['rss_end_mib']:>6.1f} "
                  f"{r['rss_growth_mib']:>+7.1f} {r['rss_max_mib']:>6.1f}  "
                  f"{r['fds_after_warmup']:>9.0f} {r['fds_end']:>5.0f} {r['fds_growth']:>+6.0f} "
                  f"{r['fds_max']:>5}")
        else:
            print(f"{r['process']:<10} {r['pid']:>7} {r['from']:>6.0f} {r['to']:>6.0f}  "
                  f"{'(too short to judge)':>21} {'':>6} {'':>7} {r['rss_max_mib']:>6.1f}  "
                  f"{'':>9} {'':>5} {'':>6} {r['fds_max']:>5}")
    print("idle fds (start -> end): " + ", ".join(
        f"{k} {v['start']}->{v['end']}" for k, v in result["idle_fds"].items()))
    tcp, udp = result["tcp"], result["udp"]
    print(f"tcp: {tcp}  (cut {result['cuts']}, away from kills {result['stray_cuts']})")
    print(f"udp: {udp}")
    print(f"sessions: {result['sessions']}")
    print(f"raw tunnels: {result['tunnels']}")
    print(f"admin: {result['admin']}")
    print("kills: " + ", ".join(f"{k['how']} worker {k['index']} at {k['t']:.0f} s "
                                f"(back after {k['back_after']} s)" for k in result["kills"]))
    for n in result["notes"]:
        print(f"note: {n}")
    for p in result["problems"]:
        print(f"PROBLEM: {p}")
    print("result: " + ("FAIL" if result["problems"] else "ok"), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=1800)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds before growth counts (default: a third of the run, at most 120)")
    ap.add_argument("--restart-warmup", type=float, default=None,
                    help="the same for a restarted worker, from its start (default: the "
                         "warm-up, at most 30 s)")
    ap.add_argument("--sample-every", type=float, default=1.0)
    ap.add_argument("--progress-every", type=float, default=10.0)
    ap.add_argument("--kill-every", type=float, default=60.0, help="0: never")
    ap.add_argument("--tcp-sessions", type=int, default=2)
    ap.add_argument("--udp-sessions", type=int, default=1)
    ap.add_argument("--session-seconds", type=float, default=20.0)
    ap.add_argument("--max-rss-growth", type=float, default=16.0, help="MiB per process")
    ap.add_argument("--max-fd-growth", type=float, default=1024.0,
                    help="per process, under load (growth of the floor; it follows the load: "
                         "the exact leak check is --max-idle-fd-growth)")
    ap.add_argument("--max-idle-fd-growth", type=int, default=2, help="per process, idle")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--netns", help="the name of the namespace to make (default ipfsoak-PID)")
    ap.add_argument("--json", type=Path, help="write the result (with every sample) there")
    ap.add_argument("--keep", action="store_true", help="keep the daemon's log and audit")
    # the clients, inside ipferry connect
    ap.add_argument("--client", choices=["tcp", "udp"], help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        return client(args.client, args.seconds, args.threads)
    if args.warmup is None:
        args.warmup = min(120.0, args.duration / 3)
    if args.restart_warmup is None:
        args.restart_warmup = min(30.0, args.warmup)
    if args.duration <= args.warmup or args.workers < 1:
        ap.error("--duration must exceed --warmup, --workers be positive")
    sys.path.insert(0, str(REPO))
    from tests.helpers import require_kernel_features
    problem = require_kernel_features()
    if problem:
        print(f"bench/soak.py: {problem}", file=sys.stderr)
        return 2

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    soak = Soak(args)
    print(f"bench/soak.py: {args.duration:.0f} s, {args.workers} workers, warm-up "
          f"{args.warmup:.0f} s, a worker killed every {args.kill_every:.0f} s", flush=True)
    try:
        result = soak.run()
    except KeyboardInterrupt:
        print("bench/soak.py: interrupted", file=sys.stderr)
        return 1
    finally:
        soak.close()
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
