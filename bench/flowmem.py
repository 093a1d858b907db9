"""Memory per tracked TCP flow: a worker's RSS before, with N flows, and after they ended.

For each size (10,000 and 100,000 flows by default) a network namespace is made for the run, the
daemon runs in it with one worker (``--workers 1``) and no capabilities, under a raised fd limit
(``prlimit --nofile``: every flow holds an off-ramp socket, the old data path two), and:

1. a warm-up tunnel opens and closes ``--warmup`` flows (first-use costs are not per flow);
2. the worker's RSS is read (``VmRSS`` in ``/proc/PID/status``; the pid from ``GET
   /api/workers`` on the admin unix socket): *before*;
3. one connected tunnel (the SEQPACKET on-ramp, context ``{"tenant": "bench"}``) carries N raw
   TCP SYNs, each with its own source address and port, to destinations in the namespace; a
   SYN-ACK that comes back is answered with the ACK that completes the handshake, as a client
   would. Once ``ipferry_flows_active`` says N and the worker's fds have settled: *loaded*;
4. the tunnel closes, which ends its flows; once the gauge is back to 0 and a few seconds have
   passed: *after*.

bytes/flow = (loaded - before) / N; retained/flow = (after - before) / N. Also reported: how long
the flows took to set up, the worker's fds, its CPU while the N flows sit idle (the idle-timeout
loop), and the TCP states of the sockets of the daemon's namespace (off-ramps) and of nsd's
(the upgraded connections).

Destinations (``--upstream``):

- ``silent`` (default): addresses of 198.19.0.0/24, routed to one end of a veth pair whose other
  end (no ARP, no address, no forwarding) swallows every packet: the off-ramp's connect stays
  pending (``[flows]
  upstream_connect_timeout`` 300 s, the most the config allows, and ``tcp_syn_retries`` 127 in the
  namespace, so the kernel does not give up either).
- ``accept``: addresses of 198.19.1.0/24, all local to the namespace (a ``local`` route), where a
  holder process (also under the raised fd limit) accepts every connection and keeps it.

    .venv/bin/python bench/flowmem.py [--flows 10000 100000] [--upstream silent|accept]
                                      [--out flowmem.json] [--source DIR]

Raising the hard fd limit takes ``CAP_SYS_RESOURCE``; without it the daemon gets the hard limit
the script has, and a size that needs more fds stops where they run out: the script waits until
the count of flows stops growing (``--stall``), measures there and says so (``N of M`` flows).

``--source DIR`` runs the daemon from another checkout (e.g. a ``git worktree`` of an older
commit) with this venv: its ``supervisor``, ``worker`` and ``nsd`` stand in for the installed
ones. Needs root (namespaces), ``prlimit``, ``nsenter``, ``setpriv``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.testbed import PYTHON, Reaper, in_netns, sh, sysctl  # noqa: E402
from tests.helpers import Daemon, DaemonExited  # noqa: E402

TENANT = "bench"
SILENT_NET = "198.19.0"  # .1 on the dummy device, .2-.254 silent destinations
ACCEPT_NET = "198.19.1"  # a local route: every address is the namespace's own
DPORT = 80
CLIENT_PORTS = 50_000  # source ports per client address (10.77.0.0/16)
PAGE = os.sysconf("SC_PAGE_SIZE")
CLK_TCK = os.sysconf("SC_CLK_TCK")
TCP_STATES = {1: "established", 2: "syn_sent", 3: "syn_recv", 4: "fin_wait1", 5: "fin_wait2",
              6: "time_wait", 7: "close", 8: "close_wait", 9: "last_ack", 10: "listen",
              11: "closing", 12: "new_syn_recv"}


# -- packets -------------------------------------------------------------------------------------

def _checksum(data: bytes) -> int:
    n = int.from_bytes(data, "big") << (8 if len(data) % 2 else 0)
    s = n % 0xFFFF or (0xFFFF if n else 0)
    return ~s & 0xFFFF


def tcp_packet(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int,
               flags: int) -> bytes:
    """A whole IPv4 TCP segment without options or payload, checksums complete."""
    tcp = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 64240, 0, 0))
    tcp[16:18] = struct.pack("!H", _checksum(src + dst + b"\0\x06\0\x14" + bytes(tcp)))
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, 64, 6, 0, src, dst))
    ip[10:12] = struct.pack("!H", _checksum(bytes(ip)))
    return bytes(ip + tcp)


SYN, RST, ACK = 0x02, 0x04, 0x10


def flow_syn(i: int, upstream: str) -> bytes:
    """Flow ``i``'s SYN: its own client address and port, a destination of ``upstream``'s net."""
    a, port = divmod(i, CLIENT_PORTS)
    src = bytes([10, 77, (a + 1) >> 8, (a + 1) & 0xFF])
    if upstream == "silent":
        dst = socket.inet_aton(f"{SILENT_NET}.{2 + i % 253}")
    else:
        dst = socket.inet_aton(f"{ACCEPT_NET}.{1 + i % 254}")
    return tcp_packet(src, dst, 10_000 + port, DPORT, (i * 2654435761) & 0xFFFFFFFF, 0, SYN)


class TunnelClient:
    """One connected tunnel: sends SYNs, answers SYN-ACKs with ACKs, counts what comes back."""

    def __init__(self, path: Path, ack: bool = True) -> None:
        self.ack = ack
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(str(path))
        self.sock.send(json.dumps({"tenant": TENANT}).encode())
        # One timeout for both threads (it is the socket's, O_NONBLOCK underneath): the reader
        # wakes up to see whether to stop, the sender retries a send that timed out.
        self.sock.settimeout(0.2)
        self.synacks = self.rsts = self.other = 0
        self.closed_by_daemon = False
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                p = self.sock.recv(65600)
            except TimeoutError:
                continue
            except OSError:
                return
            if not p:
                self.closed_by_daemon = True
                return
            ihl = (p[0] & 0x0F) * 4
            if p[0] >> 4 != 4 or p[9] != 6 or len(p) < ihl + 20:
                self.other += 1
                continue
            flags = p[ihl + 13]
            if flags & RST:
                self.rsts += 1
            elif flags & (SYN | ACK) == SYN | ACK:
                self.synacks += 1
                if not self.ack:
                    continue
                sport, dport, seq, ack = struct.unpack_from("!HHII", p, ihl)
                answer = tcp_packet(p[16:20], p[12:16], dport, sport, ack, (seq + 1) & 0xFFFFFFFF,
                                    ACK)
                while not self._stop.is_set():
                    try:
                        self.sock.send(answer)
                        break
                    except TimeoutError:
                        continue
                    except OSError:
                        return
            else:
                self.other += 1

    def send_syns(self, first: int, count: int, upstream: str, window: int = 2000) -> str:
        """Send ``count`` SYNs. While handshakes come back, at most ``window`` go unanswered
        at a time (the kernel behind the worker is not flooded into SYN cookies); when none come
        back (the SYN is held until the off-ramp connects, which it never does when silent),
        the tunnel's own backpressure paces them. Returns which it was: "handshake" or "held"."""
        mode = "probe"
        sent = 0
        for i in range(first, first + count):
            if mode != "held":
                deadline = time.monotonic() + 3
                while sent - self.synacks - self.rsts >= window:
                    if time.monotonic() > deadline:
                        if mode == "probe":
                            mode = "held"  # nothing answers: the SYNs are held
                            break
                        deadline = time.monotonic() + 3  # slow answers: keep waiting
                    time.sleep(0.005)
                    if self.synacks or self.rsts:
                        mode = "handshake"
            syn = flow_syn(i, upstream)
            while True:
                try:
                    self.sock.send(syn)
                    break
                except TimeoutError:  # the worker is behind: wait for it
                    continue
            sent += 1
        return "held" if mode != "handshake" and not self.synacks else "handshake"

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.join(5)
        self.sock.close()


# -- the process under test ----------------------------------------------------------------------

class LimitedDaemon(Daemon):
    """The test harness's daemon, under ``prlimit --nofile`` (the daemon raises its soft limit
    to the hard one, which only root can raise: before ``setpriv`` drops the capabilities)."""

    nofile = 400_000

    def command(self, *args: str, sh_prefix: str | None = None) -> list[str]:
        return ["prlimit", f"--nofile={self.nofile}:{self.nofile}", "--",
                *super().command(*args, sh_prefix=sh_prefix)]


def status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tcp_states(pid: int) -> dict[str, int]:
    """TCP sockets by state in ``pid``'s network namespace (IPv4 and IPv6)."""
    counts: dict[str, int] = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f)
                for line in f:
                    st = TCP_STATES.get(int(line.split(None, 4)[3], 16), "?")
                    counts[st] = counts.get(st, 0) + 1
        except OSError:
            pass
    return dict(sorted(counts.items()))


def flows_active(d: Daemon) -> int | None:
    """``ipferry_flows_active{protocol="tcp"}`` of worker 0; None when the scrape missed it."""
    for (name, labels), value in d.metrics().items():
        if name == "ipferry_flows_active" and dict(labels).get("protocol") == "tcp":
            return int(value)
    return None


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except DaemonExited:
            raise
        except Exception:  # a scrape that timed out while the worker is busy: try again
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def settle(pid: int, seconds: float = 2.0, rounds: int = 30) -> None:
    """Until the worker's fd count and RSS stop moving (two reads ``seconds`` apart)."""
    last = None
    for _ in range(rounds):
        now = (fd_count(pid), status(pid)["VmRSS"] // (256 << 10))
        if now == last:
            return
        last = now
        time.sleep(seconds)


# -- one size ------------------------------------------------------------------------------------

CONFIG = """\
[logging]
level = "{log_level}"

[audit]
sink = "{audit}"

[[onramps]]
kind = "tunnel"

[flows]
max_per_worker = {limit}
max_per_tenant = {limit}
upstream_connect_timeout = 300
tcp_syn_sent = 3600
tcp_established = 7200
"""


def make_namespace(reaper: Reaper, upstream: str, nofile: int, tmp: Path):
    ns = reaper.netns(f"ipfmem-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    # The silent /24: a veth pair with both ends here and no ARP. What goes out of one end
    # arrives at the other, which has no address for it and does not forward: dropped, no
    # answer. (A dummy device would do the same; not every kernel has one.)
    sh("ip", "-n", ns.name, "link", "add", "ipfm0", "type", "veth", "peer", "name", "ipfm1")
    for dev in ("ipfm0", "ipfm1"):
        sh("ip", "-n", ns.name, "link", "set", dev, "arp", "off", "up")
    sh("ip", "-n", ns.name, "addr", "add", f"{SILENT_NET}.1/24", "dev", "ipfm0")
    sysctl(ns.path, {"net.ipv4.ip_forward": "0"})
    sh("ip", "-n", ns.name, "route", "add", "local", f"{ACCEPT_NET}.0/24", "dev", "lo")
    sysctl(ns.path, {"net.ipv4.ip_local_port_range": "1024 65535",
                     "net.ipv4.tcp_syn_retries": "127",
                     "net.core.somaxconn": "65535",
                     "net.ipv4.tcp_max_syn_backlog": "262144"})
    holder = None
    if upstream == "accept":
        holder = reaper.popen(["prlimit", f"--nofile={nofile}:{nofile}", "--",
                               *in_netns(ns.path, PYTHON, __file__, "_hold", "--port",
                                         str(DPORT))], log=tmp / "holder.log")
        wait_until(lambda: "ready" in (tmp / "holder.log").read_text(), 10, "the holder")
    return ns, holder


def counters(d: Daemon) -> dict[str, dict[str, int]]:
    """Non-zero drops and upstream failures, by reason."""
    out: dict[str, dict[str, int]] = {"drops": {}, "upstream_failures": {}}
    for (name, labels), value in d.metrics().items():
        kind = {"ipferry_drops_total": "drops",
                "ipferry_upstream_failures_total": "upstream_failures"}.get(name)
        if kind and value:
            reason = dict(labels)["reason"]
            out[kind][reason] = out[kind].get(reason, 0) + int(value)
    return out


def log_events(d: Daemon, top: int = 8) -> dict[str, int]:
    """The daemon's most frequent log events (warnings and errors: the config's log level)."""
    counts: dict[str, int] = {}
    for event in d.log_events():
        name = event.get("event", "?")
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:top])


def wait_for_flows(d: Daemon, n: int, stall: float, timeout: float) -> tuple[int, bool]:
    """Until ``n`` flows are active, or the count has not grown for ``stall`` seconds (a limit
    reached: fds, say). Returns (the count, whether it stalled short of ``n``)."""
    best, since = -1, time.monotonic()
    deadline = since + timeout
    while True:
        try:
            now = flows_active(d)
        except DaemonExited:
            raise
        except Exception:  # a scrape that timed out while the worker is busy
            now = None
        if now is not None:
            if now >= n:
                return now, False
            if now > best:
                best, since = now, time.monotonic()
        if time.monotonic() - since > stall or time.monotonic() > deadline:
            return max(best, 0), True
        time.sleep(0.5)


def fd_limit(wanted: int) -> int:
    """``wanted`` if ``prlimit`` may set it (raising a hard limit takes CAP_SYS_RESOURCE), else
    the hard limit we have."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if wanted <= hard or subprocess.run(["prlimit", f"--nofile={wanted}:{wanted}", "--", "true"],
                                        capture_output=True).returncode == 0:
        return wanted
    print(f"flowmem: cannot raise the fd limit to {wanted:,} (no CAP_SYS_RESOURCE?): using the "
          f"hard limit, {hard:,}; flows that need more fds than that are refused", file=sys.stderr)
    return hard


def measure(n: int, args, log=print) -> dict:
    reaper = Reaper()
    d = None
    try:
        tmp = reaper.tmpdir()
        run = tmp / "run"
        run.mkdir()
        ns, _ = make_namespace(reaper, args.upstream, args.nofile, tmp)
        limit = max(n + args.warmup + 1000, 200_000)
        config = CONFIG.format(audit=tmp / "audit.jsonl" if args.keep_audit else "/dev/null",
                               limit=limit, log_level=args.log_level)
        env = {"PYTHONPATH": str(args.shim)} if args.shim else None
        d = LimitedDaemon(ns, run, tmp, config=config, no_caps=True, env=env)
        d.nofile = args.nofile
        reaper.daemons.append(d)
        d.start("--workers", "1", "--admin-listen", "")
        d.wait_ready()
        worker = d.workers()[0]["pid"]
        nsd = d.nsd_pid()
        with open(f"/proc/{worker}/limits") as f:
            nofile = next(line.split()[3] for line in f if line.startswith("Max open files"))
        tunnel_path = run / "tunnel.sock"

        if args.warmup:
            warm = TunnelClient(tunnel_path, ack=args.ack)
            warm.send_syns(n + 1, args.warmup, args.upstream)
            wait_until(lambda: flows_active(d) == args.warmup, 60, "the warm-up flows")
            warm.close()
            wait_until(lambda: flows_active(d) == 0, 60, "the warm-up flows to end")
        time.sleep(1)
        settle(worker, 1.0)
        before = status(worker)
        fds_before = fd_count(worker)

        client = TunnelClient(tunnel_path, ack=args.ack)
        t0 = time.monotonic()
        answered = client.send_syns(0, n, args.upstream)
        sent_s = time.monotonic() - t0
        reached, stalled = wait_for_flows(d, n, args.stall, 120 + n / 100)
        setup_s = time.monotonic() - t0
        settle(worker)
        loaded = status(worker)
        fds_loaded = fd_count(worker)
        active = flows_active(d) or reached
        states = {"daemon_namespace": tcp_states(worker), "nsd_namespace": tcp_states(nsd)}
        c0, w0 = cpu_seconds(worker), time.monotonic()
        time.sleep(args.idle)
        idle_cpu = (cpu_seconds(worker) - c0) / (time.monotonic() - w0)
        still = flows_active(d)
        counts = counters(d)
        sample = None
        if args.sample_flows:  # (the old data path builds the whole list for one page)
            page = d.get_json(f"/api/flows?limit={args.sample_flows}")
            sample = [{k: f.get(k) for k in ("state", "decision", "slot", "packets", "age")}
                      for f in page["flows"]]
        log(f"  {active:,} of {n:,} flows{' (stalled)' if stalled else ''} in {setup_s:.1f}s "
            f"(SYNs sent in {sent_s:.1f}s, {answered}); RSS {before['VmRSS'] / 2**20:.1f} -> "
            f"{loaded['VmRSS'] / 2**20:.1f} MiB; fds {fds_loaded:,}; idle CPU "
            f"{idle_cpu * 100:.1f}%; states {states}; {counts}")

        t1 = time.monotonic()
        client.close()
        wait_until(lambda: flows_active(d) == 0, 300, "the flows to end")
        end_s = time.monotonic() - t1
        time.sleep(args.after)
        settle(worker)
        after = status(worker)
        fds_after = fd_count(worker)
        restarts = d.workers()[0]["restarts"]
        delta = loaded["VmRSS"] - before["VmRSS"]
        per = max(active, 1)
        return {
            "flows": n, "flows_active": active, "flows_active_after_idle": still,
            "stalled": stalled, "upstream": args.upstream, "ack": args.ack,
            "syn_answers": answered, "synacks": client.synacks, "rsts": client.rsts,
            "rss_before": before["VmRSS"], "rss_loaded": loaded["VmRSS"],
            "rss_after": after["VmRSS"], "anon_before": before["RssAnon"],
            "anon_loaded": loaded["RssAnon"], "anon_after": after["RssAnon"],
            "hwm": after["VmHWM"],
            "bytes_per_flow": round(delta / per, 1),
            "anon_bytes_per_flow": round((loaded["RssAnon"] - before["RssAnon"]) / per, 1),
            "retained_per_flow": round((after["VmRSS"] - before["VmRSS"]) / per, 1),
            "returned_fraction": round((loaded["VmRSS"] - after["VmRSS"]) / delta, 3)
            if delta > 0 else None,
            "fds_before": fds_before, "fds_loaded": fds_loaded, "fds_after": fds_after,
            "fd_limit": int(nofile), "setup_s": round(setup_s, 2), "syns_sent_s": round(sent_s, 2),
            "end_s": round(end_s, 2), "idle_cpu": round(idle_cpu, 4), "states": states,
            **counts, "log_events": log_events(d), "worker_restarts": restarts,
            "flow_sample": sample,
        }
    finally:
        if args.logs and d is not None and d.log_path.exists():
            args.logs.mkdir(parents=True, exist_ok=True)
            shutil.copy(d.log_path, args.logs / f"daemon-{n}.log")
        reaper.close()


# -- the accept-mode holder (runs in the namespace) ----------------------------------------------

def hold(port: int) -> None:
    """Accept every connection to ``port`` (on any local address) and keep it open."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("0.0.0.0", port))
    lsock.listen(65535)
    held = []
    print("ready", flush=True)
    while True:
        conn, _ = lsock.accept()
        held.append(conn)


# -- main ----------------------------------------------------------------------------------------

def shim_for(source: Path, tmp: Path) -> Path:
    """A directory whose ``ipferry`` package is ``source``'s supervisor, worker and nsd."""
    pkg = tmp / "ipferry"
    pkg.mkdir()
    for sub in ("supervisor", "worker", "nsd"):
        target = (source / sub).resolve()
        if not (target / "__init__.py").exists():
            raise SystemExit(f"{source} has no {sub}/ package")
        (pkg / sub).symlink_to(target)
    return tmp


def table(results: list[dict]) -> str:
    lines = ["| flows | upstream | set up (s) | RSS before / loaded / after (MiB) "
             "| bytes/flow | retained/flow after end | fds loaded | idle CPU | restarts |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        mib = [r[k] / 2**20 for k in ("rss_before", "rss_loaded", "rss_after")]
        flows = f"{r['flows_active']:,}"
        if r["flows_active"] < r["flows"]:
            flows += f" of {r['flows']:,}"
        upstream = r["upstream"] + ("" if r["ack"] else ", no ACK")
        lines.append(
            f"| {flows} | {upstream} | {r['setup_s']:.1f} "
            f"| {mib[0]:.1f} / {mib[1]:.1f} / {mib[2]:.1f} | {r['bytes_per_flow']:,.0f} "
            f"| {r['retained_per_flow']:,.0f} | {r['fds_loaded']:,} "
            f"| {r['idle_cpu'] * 100:.1f}% | {r['worker_restarts']} |")
    return "\n".join(lines)


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--upstream", choices=["silent", "accept"], default="silent")
    parser.add_argument("--warmup", type=int, default=200, help="flows opened and closed first")
    parser.add_argument("--idle", type=float, default=5.0,
                        help="seconds the worker's CPU is measured with the flows idle")
    parser.add_argument("--after", type=float, default=3.0,
                        help="seconds to wait after the flows ended before reading RSS")
    parser.add_argument("--nofile", type=int, default=400_000,
                        help="fd limit of the daemon and the holder (prlimit)")
    parser.add_argument("--no-ack", dest="ack", action="store_false",
                        help="leave SYN-ACKs unanswered: no handshake completes, so the old data "
                             "path (accept, then connect) never accepts nor connects")
    parser.add_argument("--stall", type=float, default=20.0,
                        help="give up waiting for N flows after this long without one more")
    parser.add_argument("--source", type=Path, help="run the daemon from this checkout")
    parser.add_argument("--keep-audit", action="store_true",
                        help="write the audit records to a file (default: /dev/null)")
    parser.add_argument("--log-level", default="error",
                        choices=["debug", "info", "warning", "error"],
                        help="the daemon's (error: a worker out of fds logs a warning per "
                             "accept it retries, gigabytes a minute on the old data path)")
    parser.add_argument("--sample-flows", type=int, default=0, metavar="K",
                        help="show K rows of GET /api/flows once the flows are in (after the "
                             "loaded reading: on the old data path one page costs a list of "
                             "every flow, which the after-end reading then includes)")
    parser.add_argument("--logs", type=Path, help="copy the daemon's logs into this directory")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("flowmem needs root (it makes a network namespace)")
    # Ctrl-C, SIGTERM and SIGHUP all unwind through the reapers' finally blocks.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupted)
    args.nofile = fd_limit(args.nofile)
    with tempfile.TemporaryDirectory(prefix="ipfmem-") as shim_dir:
        args.shim = shim_for(args.source, Path(shim_dir)) if args.source else None
        source = (args.source or REPO).resolve()
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain",
                                "supervisor", "worker", "nsd"],
                               capture_output=True, text=True).stdout.strip()
        code = f"{commit}{' + uncommitted changes' if dirty else ''}"
        print(f"flowmem: {source} ({code}), upstream {args.upstream}, one worker", file=sys.stderr)
        results = []
        for n in args.flows:
            print(f"{n:,} flows ...", file=sys.stderr)
            results.append(measure(n, args, log=lambda s: print(s, file=sys.stderr)))
    print(table(results))
    for r in results:
        print(f"{r['flows']:,} flows: states {r['states']}; after the end: "
              f"{r['returned_fraction'] if r['returned_fraction'] is not None else '-'} of the "
              f"growth returned, fds {r['fds_before']} -> {r['fds_loaded']} -> {r['fds_after']}")
    if args.out:
        args.out.write_text(json.dumps({
            "source": str(source), "code": code, "upstream": args.upstream,
            "machine": {"cores": os.cpu_count(), "kernel": os.uname().release,
                        "python": sys.version.split()[0]},
            "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "results": results}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_hold":
        hold(int(sys.argv[sys.argv.index("--port") + 1]))
    else:
        try:
            main()
        except KeyboardInterrupt as exc:  # everything started was stopped on the way out
            raise SystemExit(f"flowmem: interrupted ({exc})") from None
