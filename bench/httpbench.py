"""HTTP requests per second through ipferry's HTTP layer, plain splice and well-known proxies, in
the same run.

    .venv/bin/python bench/httpbench.py [--runs N] [--duration S] [--connections C] [--workers W]
    .venv/bin/python bench/httpbench.py --quick          # 1 run of 1 s a cell: a smoke test

Run as root: it makes a network namespace of its own (``ipfbench-http-<pid>``; its only device
besides loopback is a veth pair with both ends in it, 198.18.0.1 on one: a dead end, nothing
leaves the machine) and in it an nginx origin on 198.18.0.1:80 serving a 1 KiB and a 1 MiB file.
The same load generator (wrk: ``-t 1``, C connections, a Lua script that records what it got)
then requests a file for D seconds through every path, keep-alive and with ``Connection: close``
(one request per connection; a proxy may still pool its own connections to the origin):

- **direct**: wrk in the namespace, to the origin: the baseline;
- **splice**: wrk in ``ipferry connect`` (no capabilities, ``ipferry run --workers W`` as the
  daemon, default config): the tunnel's flow upgraded to a kernel TCP stream and spliced;
- **http layer**: the same with ``[[rules]] protocol = "tcp" ports = "80" layer = "http"``:
  every request parsed by ipferry's HTTP layer;
- **ipferry HTTP on-ramp**: wrk in the namespace, absolute-form requests to a daemon's
  ``[[onramps]] kind = "http"`` on 127.0.0.1:3128 (a forward proxy; tenant ``bench``);
- **squid**: the same requests to squid (Debian's) on 127.0.0.1:3129, ``cache deny all``;
- **nginx reverse proxy**: origin-form requests to a second nginx on 127.0.0.1:8080 that
  ``proxy_pass``-es to the origin over pooled keep-alive connections.

The rows take turns (every row's cell, then the next cell, run after run), so that the ratios
compare measurements taken minutes apart at most. Each figure is the median of ``--runs`` runs;
requests per second count only 2xx/3xx answers. Latency is wrk's: from a request's first byte
written to its answer's last byte read, so with ``Connection: close`` it leaves out the TCP
handshake. ``proxy CPU`` is the CPU time of the proxy's processes (the daemon, its workers and
``ipferry connect``; squid; nginx) per answered request. A row whose proxy cannot start, or does
not answer a probe with the file, is printed ``failed: <why>`` and the others still run; so is an
HTTP row whose daemon answered the probe but counted no HTTP request
(``ipferry_http_requests_total``): splice's figures under the HTTP layer's name otherwise.

(Not ``bench/http.py``: a module named ``http`` in bench/ would shadow the standard library's
``http`` package for every script there, which all import tests.helpers, which imports
``http.client``.)

Writes ``http.json`` and ``http.md`` to ``--out`` (default bench/published/http/, or
bench/results/http/ with ``--quick``). Every process runs in a session of its own and is killed,
and the namespace deleted, however the run ends (Ctrl-C and SIGTERM included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from testbed import (  # noqa: E402
    IPFERRY,
    KEEPER,
    NO_CAPS,
    REPO,
    Daemon,
    Reaper,
    cpu_seconds,
    descendants,
    in_netns,
    sh,
    sysctl,
    wait_for_keeper,
)

ORIGIN = "198.18.0.1"  # the origin nginx, on the namespace's veth (as testbed's SERVER_ADDR)
ONRAMP = "127.0.0.1:3128"  # ipferry's HTTP on-ramp
SQUID = "127.0.0.1:3129"
NGINX_RP = "127.0.0.1:8080"
TENANT = "bench"
FILES = {"1k": 1024, "1m": 1 << 20}
FILE_LABEL = {"1k": "1 KiB", "1m": "1 MiB"}
MODES = ("keepalive", "close")
MODE_LABEL = {"keepalive": "keep-alive", "close": "Connection: close"}
HTTP_RULE = '\n[[rules]]\naction = "allow"\nprotocol = "tcp"\nports = "80"\nlayer = "http"\n'
HTTP_ONRAMP = (f'\n[[onramps]]\nkind = "http"\nname = "proxy"\nlisten = "{ONRAMP}"\n'
               f'tenant = "{TENANT}"\n')
TOOLS = {"wrk": "wrk", "nginx": "nginx", "squid": "squid", "curl": "curl"}  # command: package
DEFAULT_OUT = BENCH / "published" / "http"
QUICK_OUT = BENCH / "results" / "http"
COUNTERS = re.compile(r"ipferry_(flows_started|flows_ended|upstream_failures)(_total)?"
                      r"|ipferry_(http|tls)_\w+")
# What the HTTP layer counts per request it carried (worker/metrics.py)
HTTP_COUNTED = ("ipferry_http_requests_total", "ipferry_http_request_duration_seconds_count")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class RowFailed(Exception):
    """Why a row cannot be measured (its proxy did not start, or did not answer)."""


# --- what the machine needs ------------------------------------------------------------------

def ensure_tools() -> list[str]:
    """Install the Debian packages of missing commands (deploy/debs.sh: apt-get, with no service
    started on the host); return the commands still missing."""
    missing = [c for c in TOOLS if shutil.which(c) is None]
    if missing and shutil.which("apt-get"):
        packages = sorted({TOOLS[c] for c in missing})
        say(f"installing {' '.join(packages)} (apt-get, deploy/debs.sh)")
        subprocess.run(["bash", "-c", '. deploy/debs.sh && ensure_debs bench/httpbench "$@"', "bash",
                        *packages], cwd=REPO, capture_output=True)
    return [c for c in TOOLS if shutil.which(c) is None]


def deb_version(package: str) -> str:
    res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True,
                         text=True)
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else "unknown"


# --- the namespace and the servers -------------------------------------------------------------

def bench_namespace(reaper: Reaper):
    """``ipfbench-http-<pid>``: loopback, and a veth pair with both ends here (ORIGIN on one end,
    a default route that dies on the other), as testbed.ServerNamespace builds its own."""
    ns = reaper.netns(f"ipfbench-http-{os.getpid()}")
    name = ns.name
    sh("ip", "-n", name, "link", "add", "ipfb0", "type", "veth", "peer", "name", "ipfb1")
    sh("ip", "-n", name, "addr", "add", f"{ORIGIN}/24", "dev", "ipfb0")
    for dev in ("ipfb0", "ipfb1"):
        sh("ip", "-n", name, "link", "set", dev, "up")
    sh("ip", "-n", name, "route", "add", "default", "via", "198.18.0.254", "dev", "ipfb0")
    # Connection: close makes tens of thousands of connections a cell.
    sysctl(ns.path, {"net.ipv4.ip_local_port_range": "1024 65535", "net.ipv4.tcp_tw_reuse": "1",
                     "net.core.somaxconn": "4096"})
    return ns


def wait_listening(netns: str, port: int, proc: subprocess.Popen, what: str, log: Path,
                   timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RowFailed(f"{what} exited with status {proc.returncode}: "
                            f"{tail(log.read_text(errors='replace'))}")
        res = subprocess.run(in_netns(netns, "ss", "-Hltn", f"sport = :{port}"),
                             capture_output=True, text=True)
        if res.returncode == 0 and res.stdout.strip():
            return
        time.sleep(0.05)
    raise RowFailed(f"{what} not listening on port {port} after {timeout:.0f} s: "
                    f"{tail(log.read_text(errors='replace'))}")


def tail(text: str, n: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else "..." + text[-n:]


def shared_dir(reaper: Reaper, owner: str | None = None) -> Path:
    """A temporary directory nginx's workers (www-data) and squid (proxy) can use."""
    path = reaper.tmpdir()
    path.chmod(0o755)
    if owner:
        shutil.chown(path, owner, owner)
    return path


def nginx_conf(d: Path, server: str) -> str:
    return f"""
worker_processes 1;
worker_rlimit_nofile 65536;
user www-data;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
{server}
}}
"""


def start_nginx(reaper: Reaper, netns: str, d: Path, server: str, port: int,
                what: str) -> subprocess.Popen:
    (d / "nginx.conf").write_text(nginx_conf(d, server))
    proc = reaper.popen(in_netns(netns, "nginx", "-c", str(d / "nginx.conf"), "-p", str(d)),
                        log=d / "stdout.log")
    wait_listening(netns, port, proc, what, d / "error.log")
    return proc


def start_origin(reaper: Reaper, netns: str) -> subprocess.Popen:
    d = shared_dir(reaper)
    www = d / "www"
    www.mkdir()
    www.chmod(0o755)
    for name, size in FILES.items():
        (www / name).write_bytes(bytes((i * 7 + 13) % 251 for i in range(size)))
        (www / name).chmod(0o644)
    server = f"""
    server {{
        listen {ORIGIN}:80 backlog=4096;
        root {www};
    }}"""
    return start_nginx(reaper, netns, d, server, 80, "nginx (origin)")


def start_nginx_rp(reaper: Reaper, netns: str) -> subprocess.Popen:
    host, port = NGINX_RP.split(":")
    server = f"""
    upstream origin {{
        server {ORIGIN}:80;
        keepalive 128;
    }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_max_temp_file_size 0;
        }}
    }}"""
    return start_nginx(reaper, netns, shared_dir(reaper), server, int(port), "nginx (reverse proxy)")


def start_squid(reaper: Reaper, netns: str) -> subprocess.Popen:
    d = shared_dir(reaper, owner="proxy")
    conf = d / "squid.conf"
    # Listens only on the private namespace's loopback: "allow all" reaches nobody else.
    conf.write_text(f"""
http_port {SQUID}
http_access allow all
cache deny all
cache_mem 0 MB
cache_effective_user proxy
pid_filename {d}/squid.pid
cache_log {d}/cache.log
access_log none
cache_store_log none
coredump_dir {d}
netdb_filename none
pinger_enable off
icp_port 0
htcp_port 0
dns_nameservers 127.0.0.1
visible_hostname ipfbench-http
max_filedescriptors 65536
shutdown_lifetime 1 seconds
""")
    log = d / "stdout.log"
    proc = reaper.popen(in_netns(netns, "squid", "-N", "-f", str(conf)), log=log)
    try:
        wait_listening(netns, int(SQUID.split(":")[1]), proc, "squid", log)
    except RowFailed as exc:
        cache_log = d / "cache.log"
        more = tail(cache_log.read_text(errors="replace")) if cache_log.exists() else ""
        raise RowFailed(f"{exc} {more}".strip()) from None
    return proc


# --- the rows ----------------------------------------------------------------------------------

@dataclass
class Target:
    """Where wrk runs and what it asks: ``url`` is what it connects to, ``path`` the request
    target (absolute-form for a forward proxy)."""

    netns: str
    url: str
    path: Callable[[str], str]  # file -> request target
    proxy: str | None = None  # curl -x for the probe
    pids: Callable[[], list[int]] = lambda: []
    counters: Callable[[], dict[str, float]] = lambda: {}
    verify: Callable[[], str | None] = lambda: None  # after the probe: why not, or a note


@dataclass
class Row:
    id: str
    label: str
    start: Callable[[], Target]
    target: Target | None = None
    error: str | None = None
    cells: dict = field(default_factory=dict)  # (file, mode) -> [sample or error, ...]


def origin_path(file: str) -> str:
    return f"/{file}"


def absolute_path(file: str) -> str:
    return f"http://{ORIGIN}/{file}"


class IpferryRow:
    """A daemon of its own (``--workers W``, no capabilities) in the namespace; wrk either in an
    ``ipferry connect`` sandbox (``connect=True``) or in the namespace, to an on-ramp."""

    def __init__(self, reaper: Reaper, ns, workers: int, extra_config: str, connect: bool,
                 http: bool) -> None:
        self.reaper, self.ns, self.workers = reaper, ns, workers
        self.extra_config, self.connect, self.http = extra_config, connect, http
        self.daemon: Daemon | None = None

    def start(self) -> Target:
        tmp = self.reaper.tmpdir()
        run = tmp / "run"
        run.mkdir()
        config = (f'[audit]\nsink = "{tmp / "audit.jsonl"}"\n\n[[onramps]]\nkind = "tunnel"\n'
                  + self.extra_config)
        daemon = Daemon(self.ns, run, tmp, config=config, no_caps=True, env=None)
        self.reaper.daemons.append(daemon)
        self.daemon = daemon
        daemon.start("--workers", str(self.workers), "--admin-listen", "")
        try:
            daemon.wait_ready(timeout=30)
        except AssertionError:
            raise RowFailed(f"the daemon did not start: {daemon_error(daemon.logs())}") from None
        if not self.connect:
            return Target(self.ns.path, f"http://{ONRAMP}", absolute_path, proxy=ONRAMP,
                          pids=self.daemon_pids, counters=self.counters, verify=self.verify)
        log = tmp / "connect.log"
        launcher = self.reaper.popen(
            in_netns(self.ns.path, *NO_CAPS, IPFERRY, "connect", "--tunnel", str(run / "tunnel.sock"),
                     "--tenant", TENANT, "--no-dns", "--", *KEEPER), log=log)
        try:
            keeper = wait_for_keeper(launcher)
        except RuntimeError as exc:
            raise RowFailed(f"ipferry connect {exc}: {tail(log.read_text())}") from None
        netns = f"/proc/{keeper}/ns/net"
        try:  # the sandbox's own TCP stack opens wrk's connections
            sysctl(netns, {"net.ipv4.ip_local_port_range": "1024 65535",
                           "net.ipv4.tcp_tw_reuse": "1"})
        except RuntimeError as exc:
            say(f"(could not widen the sandbox's port range: {exc})")

        def pids() -> list[int]:
            own = [launcher.pid, *(p for p in descendants(launcher.pid) if p != keeper)]
            return self.daemon_pids() + own

        return Target(netns, f"http://{ORIGIN}", origin_path, pids=pids, counters=self.counters,
                      verify=self.verify)

    def verify(self) -> str | None:
        """That the probe's requests went through the HTTP layer (its request counters moved),
        not merely through the stream they came on: without it a row would report splice's
        figures under the HTTP layer's name."""
        if not self.http:
            return None
        counted = {k: v for k, v in self.counters().items() if k.startswith(HTTP_COUNTED)}
        if not counted:
            return ("note: not verified that the HTTP layer carried the requests (the daemon "
                    f"exports none of {', '.join(HTTP_COUNTED)})")
        if not any(counted.values()):
            raise RowFailed("the probe's requests were answered, but the daemon's HTTP layer "
                            f"counted none ({', '.join(f'{k} = {v:g}' for k, v in counted.items())})"
                            ": its flows were not carried as HTTP (the layer is not there yet?)")
        return None

    def daemon_pids(self) -> list[int]:
        assert self.daemon is not None
        return [self.daemon.pid, *descendants(self.daemon.pid)]

    def counters(self) -> dict[str, float]:
        """The daemon's flow and HTTP counters so far (summed over workers and labels but
        ``result``/``reason``/``layer``/``status``/``method``): what carried the requests."""
        if self.daemon is None:
            return {}
        out: dict[str, float] = {}
        try:
            metrics = self.daemon.metrics()
        except (OSError, AssertionError):
            return {}
        for (name, labels), value in metrics.items():
            if not COUNTERS.fullmatch(name) or name.endswith(("_created", "_bucket")):
                continue
            keep = ",".join(f"{k}={v}" for k, v in labels if k in
                            ("result", "reason", "layer", "status_class", "onramp", "kind"))
            key = f"{name}{{{keep}}}" if keep else name
            out[key] = out.get(key, 0.0) + value
        return out


def daemon_error(logs: str) -> str:
    """The daemon's own words for why it stopped: its last error events, or its output's tail."""
    errors = []
    for line in logs.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            if line.strip():
                errors.append(line.strip())
            continue
        if isinstance(event, dict) and str(event.get("level", "")).lower() in ("error", "critical",
                                                                                "fatal"):
            errors.append(" ".join(str(event[k]) for k in ("event", "msg", "message", "error")
                                   if k in event) or line)
    return tail(" | ".join(errors[-3:]) if errors else logs, 600)


def plain_start(reaper: Reaper, ns, start: Callable[[Reaper, str], subprocess.Popen],
                url: str, path: Callable[[str], str], proxy: str | None) -> Callable[[], Target]:
    def go() -> Target:
        proc = start(reaper, ns.path)
        return Target(ns.path, url, path, proxy=proxy,
                      pids=lambda: [proc.pid, *descendants(proc.pid)])
    return go


def build_rows(reaper: Reaper, ns, workers: int) -> list[Row]:
    splice = IpferryRow(reaper, ns, workers, "", connect=True, http=False)
    layer = IpferryRow(reaper, ns, workers, HTTP_RULE, connect=True, http=True)
    onramp = IpferryRow(reaper, ns, workers, HTTP_ONRAMP, connect=False, http=True)
    return [
        Row("direct", "direct (wrk to nginx)",
            lambda: Target(ns.path, f"http://{ORIGIN}", origin_path)),
        Row("splice", f"ipferry connect, splice (w={workers})", splice.start),
        Row("http-layer", f"ipferry connect, HTTP layer (w={workers})", layer.start),
        Row("http-onramp", f"ipferry HTTP on-ramp, forward proxy (w={workers})", onramp.start),
        Row("squid", "squid, forward proxy", plain_start(reaper, ns, start_squid, f"http://{SQUID}",
                                                          absolute_path, SQUID)),
        Row("nginx-rp", "nginx, reverse proxy", plain_start(reaper, ns, start_nginx_rp,
                                                            f"http://{NGINX_RP}", origin_path,
                                                            None)),
    ]


def probe(t: Target, timeout: float = 15) -> None:
    """Until curl, where wrk will run, gets every file whole (200 and its size) through ``t``."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        ok = True
        for file, size in FILES.items():
            url = f"{t.url}{t.path(file)}" if t.proxy is None else t.path(file)
            cmd = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                   "--max-time", "5", *(["-x", f"http://{t.proxy}"] if t.proxy else []), url]
            res = subprocess.run(in_netns(t.netns, *cmd), capture_output=True, text=True,
                                 timeout=30)
            if res.stdout.strip() != f"200 {size}":
                ok = False
                last = (f"curl {' '.join(cmd[-3:] if t.proxy else cmd[-1:])}: "
                        f"{res.stdout.strip() or '-'} {res.stderr.strip()}").strip()
                break
        if ok:
            return
        if time.monotonic() > deadline:
            raise RowFailed(f"no 200 with the file ({last})")
        time.sleep(0.2)


# --- the load generator --------------------------------------------------------------------------

LUA = """\
wrk.method = "GET"
wrk.path = "{path}"
wrk.headers["Host"] = "{host}"
{close}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {{\\"requests\\": %d, \\"duration_us\\": %d, \\"bytes\\": %d, \\"connect\\": %d, " ..
    "\\"read\\": %d, \\"write\\": %d, \\"status\\": %d, \\"timeout\\": %d, " ..
    "\\"p50_us\\": %.1f, \\"p99_us\\": %.1f, \\"mean_us\\": %.1f, \\"max_us\\": %.1f}}\\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
"""


def wrk(t: Target, file: str, mode: str, duration: int, connections: int, threads: int,
        scripts: Path) -> dict:
    """One wrk run through ``t``; the answered requests' rate, latency, errors, the proxy's CPU."""
    script = scripts / f"{abs(hash((t.url, file, mode)))}.lua"
    script.write_text(LUA.format(path=t.path(file), host=ORIGIN,
                                 close='wrk.headers["Connection"] = "close"' if mode == "close"
                                 else ""))
    cmd = in_netns(t.netns, "wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s",
                   "--timeout", "10s", "-s", str(script), t.url)
    pids = t.pids()
    cpu0 = cpu_seconds(pids)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=duration + 60)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    cpu = cpu_seconds(pids) - cpu0
    line = next((ln for ln in out.decode().splitlines() if ln.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk exited {proc.returncode}: {tail(err.decode() + out.decode())}")
    raw = json.loads(line[len("WRKJSON "):])
    answered = raw["requests"] - raw["status"]
    seconds = raw["duration_us"] / 1e6
    errors = {k: raw[k] for k in ("connect", "read", "write", "status", "timeout") if raw[k]}
    if answered <= 0:
        raise RuntimeError(f"no request answered with 2xx/3xx (errors: {errors or 'none'})")
    return {"answered": answered, "rps": round(answered / seconds, 1),
            "p50_ms": round(raw["p50_us"] / 1e3, 3), "p99_ms": round(raw["p99_us"] / 1e3, 3),
            "mean_ms": round(raw["mean_us"] / 1e3, 3), "max_ms": round(raw["max_us"] / 1e3, 3),
            "mbytes_per_s": round(raw["bytes"] / seconds / 1e6, 1), "errors": errors,
            "proxy_cpu_us_per_req": round(cpu / answered * 1e6, 1) if pids else None,
            "seconds": round(seconds, 3)}


# --- the run -------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    reaper = Reaper()
    rows: list[Row] = []
    notes: list[str] = []
    try:
        scripts = reaper.tmpdir()
        ns = bench_namespace(reaper)
        start_origin(reaper, ns.path)
        rows = build_rows(reaper, ns, args.workers)
        for row in rows:
            try:
                row.target = row.start()
                probe(row.target)
                note = row.target.verify()
                if note:
                    notes.append(f"{row.label}: {note}")
                say(f"{row.label}: ready" + (f" ({note})" if note else ""))
            except (RowFailed, RuntimeError) as exc:
                row.error = str(exc)
                say(f"{row.label}: failed: {row.error}")
        live = [r for r in rows if r.error is None]
        if args.warmup:
            for row in live:
                assert row.target is not None
                try:
                    wrk(row.target, "1k", "keepalive", args.warmup, args.connections,
                        args.threads, scripts)
                except RuntimeError as exc:
                    say(f"{row.label}: warm-up: {exc}")
        for run_no in range(1, args.runs + 1):
            for file in args.files:
                for mode in MODES:
                    for row in live:
                        assert row.target is not None
                        try:
                            got: dict | str = wrk(row.target, file, mode, args.duration,
                                                  args.connections, args.threads, scripts)
                        except RuntimeError as exc:
                            got = str(exc)
                        row.cells.setdefault((file, mode), []).append(got)
                        say(f"run {run_no}/{args.runs} {FILE_LABEL[file]} {MODE_LABEL[mode]} "
                            f"{row.label}: " + (
                                f"{got['rps']:,.0f} req/s, p50 {got['p50_ms']} ms, p99 "
                                f"{got['p99_ms']} ms" + (f", errors {got['errors']}"
                                                         if got["errors"] else "")
                                if isinstance(got, dict) else f"FAILED ({got[:200]})"))
        counters = {r.id: r.target.counters() for r in live if r.target is not None}
    finally:
        reaper.close()
    result = {
        "benchmark": "http",
        "started": args.started,
        "command": "bench/httpbench.py " + " ".join(sys.argv[1:]),
        "host": {"kernel": platform.release(), "python": platform.python_version(),
                 "cpus": os.cpu_count(), "loadavg_at_start": args.loadavg},
        "versions": {"ipferry_commit": args.commit, "wrk": deb_version("wrk"),
                     "nginx": deb_version("nginx"), "squid": deb_version("squid")},
        "config": {"runs": args.runs, "duration_s": args.duration, "connections": args.connections,
                   "threads": args.threads, "workers": args.workers, "warmup_s": args.warmup,
                   "files": {f: FILES[f] for f in args.files}, "origin": f"{ORIGIN}:80"},
        "namespace": f"ipfbench-http-{os.getpid()}",
        "rows": [summarize(r) for r in rows],
        "daemon_counters": {k: v for k, v in counters.items() if v},
        "notes": notes,
    }
    ratios(result)
    return result


def summarize(row: Row) -> dict:
    out: dict = {"id": row.id, "label": row.label}
    if row.error is not None:
        out["failed"] = row.error
        return out
    cells = {}
    for (file, mode), samples in row.cells.items():
        good = [s for s in samples if isinstance(s, dict)]
        bad = [s for s in samples if isinstance(s, str)]
        cell: dict = {"samples": samples}
        if good:
            for key in ("rps", "p50_ms", "p99_ms", "mbytes_per_s", "proxy_cpu_us_per_req"):
                values = [s[key] for s in good if s[key] is not None]
                if values:
                    cell[key] = round(statistics.median(values), 3)
            cell["rps_min"], cell["rps_max"] = (min(s["rps"] for s in good),
                                                max(s["rps"] for s in good))
            errors: dict[str, int] = {}
            for sample in good:
                for kind, n in sample["errors"].items():
                    errors[kind] = errors.get(kind, 0) + n
            if errors:
                cell["errors"] = errors  # wrk's, summed over the runs
        if bad:
            cell["failed"] = bad[-1]
        cells[f"{file}/{mode}"] = cell
    out["cells"] = cells
    return out


def ratios(result: dict) -> None:
    """Every cell's rate and latencies over the direct row's, measured in the same run."""
    direct = next((r for r in result["rows"] if r["id"] == "direct" and "cells" in r), None)
    if direct is None:
        return
    for row in result["rows"]:
        for key, cell in row.get("cells", {}).items():
            base = direct["cells"].get(key, {})
            for m in ("rps", "p50_ms", "p99_ms"):
                if cell.get(m) is not None and base.get(m):
                    cell.setdefault("vs_direct", {})[m.removesuffix("_ms")] = round(
                        cell[m] / base[m], 3)


# --- output --------------------------------------------------------------------------------------

def fmt_rps(cell: dict) -> str:
    if "rps" not in cell:
        return "failed"
    ratio = cell.get("vs_direct", {}).get("rps")
    return f"{cell['rps']:,.0f}" + (f" ({ratio:.2f}×)" if ratio is not None else "")


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [f"HTTP: wrk -t {c['threads']} -c {c['connections']}, {c['duration_s']} s a cell, "
             f"median of {c['runs']} run(s); nginx origin on {c['origin']}; ipferry run --workers "
             f"{c['workers']}; {result['host']['cpus']} CPUs, load average "
             f"{result['host']['loadavg_at_start']} at the start; ipferry "
             f"{result['versions']['ipferry_commit']}; {result['started']}", ""]
    for file in c["files"]:
        lines += [f"**{FILE_LABEL[file]}** (req/s of 2xx answers, × direct; latency ms; proxy CPU "
                  f"µs per request, keep-alive)", "",
                  "| path | keep-alive req/s | p50 | p99 | close req/s | p50 | p99 | proxy CPU |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in result["rows"]:
            if "failed" in row:
                lines.append(f"| {row['label']} | failed: {row['failed'].replace('|', '/')} "
                             f"| | | | | | |")
                continue
            ka = row["cells"].get(f"{file}/keepalive", {})
            cl = row["cells"].get(f"{file}/close", {})
            cells = []
            for cell in (ka, cl):
                cells += [fmt_rps(cell), str(cell.get("p50_ms", "-")), str(cell.get("p99_ms", "-"))]
            cpu = ka.get("proxy_cpu_us_per_req")
            cells.append(f"{cpu:g}" if cpu is not None else "-")
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
            for mode, cell in (("keep-alive", ka), ("close", cl)):
                if "failed" in cell:
                    lines.append(f"| ↳ {mode}: failed: {cell['failed'][:300].replace('|', '/')} "
                                 f"| | | | | | | |")
        lines.append("")
    for row in result["rows"]:
        for key, cell in row.get("cells", {}).items():
            if cell.get("errors"):
                file, mode = key.split("/")
                lines.append(f"- {row['label']}, {FILE_LABEL[file]} {MODE_LABEL[mode]}: wrk "
                             f"counted errors over the runs: " + ", ".join(
                                 f"{n} {kind}" for kind, n in cell["errors"].items()))
    lines += [f"- {note}" for note in result["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def interrupted(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    p = argparse.ArgumentParser(prog="bench/httpbench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="1 run of 1 s a cell, no warm-up: a smoke test (output to bench/results/http)")
    p.add_argument("--runs", type=int, help="runs of every cell, taken in turns (default 3)")
    p.add_argument("--duration", type=int, help="seconds of every wrk run (default 5)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--workers", type=int, default=1, help="ipferry daemon workers (default 1)")
    p.add_argument("--warmup", type=int, help="seconds of uncounted keep-alive load on every row "
                                              "first (default 2; 0 with --quick)")
    p.add_argument("--files", default="1k,1m", help="files to request: 1k, 1m (default both)")
    p.add_argument("--out", type=Path, help=f"default {DEFAULT_OUT} ({QUICK_OUT} with --quick)")
    args = p.parse_args()
    args.runs = args.runs or (1 if args.quick else 3)
    args.duration = args.duration or (1 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 2)
    args.out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    args.files = [f for f in args.files.split(",") if f]
    if not args.files or any(f not in FILES for f in args.files):
        raise SystemExit(f"bench/httpbench: --files takes {', '.join(FILES)}")
    if args.runs < 1 or args.duration < 1 or not 1 <= args.threads <= args.connections:
        raise SystemExit("bench/httpbench: --runs >= 1, --duration >= 1, 1 <= --threads <= --connections")
    if os.geteuid() != 0:
        raise SystemExit("bench/httpbench: run as root: it creates a network namespace (ip netns add); "
                         "the daemons and connect then run without capabilities")
    missing = ensure_tools()
    if missing:
        raise SystemExit(f"bench/httpbench: missing {', '.join(missing)} (Debian: "
                         f"{' '.join(TOOLS[c] for c in missing)})")
    args.started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    # the code the daemons run: the tree as it is when they start
    args.commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                                 capture_output=True, text=True).stdout.strip() or "unknown"
    args.loadavg = round(os.getloadavg()[0], 2)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    t0 = time.monotonic()
    try:
        result = run(args)
    except KeyboardInterrupt:
        say("interrupted; namespace and processes removed")
        raise SystemExit(130) from None
    result["wall_seconds"] = round(time.monotonic() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "http.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (args.out / "http.md").write_text(markdown(result))
    print(markdown(result))
    say(f"wall time {result['wall_seconds'] / 60:.1f} min; wrote {args.out / 'http.json'}, "
        f"{args.out / 'http.md'}")


if __name__ == "__main__":
    main()
