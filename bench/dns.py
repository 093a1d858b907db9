"""DNS through the daemon's forwarder against the resolver itself, in the same run (issue #16).

    .venv/bin/python bench/dns.py [--queries N] [--concurrency C] [--out DIR]

Run as root: it makes a network namespace of its own (``ipfbench-dns-<pid>``) and in it

- a dnsmasq on 127.0.0.53 with a few ``--host-record`` names (the loopback stub of a desktop host),
- ``ipferry run --workers 1`` without capabilities, ``[dns] upstreams = ["127.0.0.53"]``,

then runs the same load generator (this file, ``load`` mode: one non-blocking UDP socket, N A
queries with C in flight, each query's latency recorded, a query unanswered after ``--timeout``
counted as a timeout and not retried) twice:

- **direct**: in the namespace itself, against 127.0.0.53;
- **through**: as the command of ``ipferry connect --no-dns`` (no capabilities), against the
  daemon's resolver address 100.100.100.100.

Each path first gets a short warm-up (not counted). It reports queries per second, p50/p99 latency
and timeouts of both, and the ratios through/direct; writes ``dns.json`` and ``dns.md`` to
``--out`` (default bench/published/dns/). Every process runs in a session of its own and is
killed, and the namespace deleted, however the run ends (Ctrl-C and SIGTERM included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

RESOLVER = "127.0.0.53"
FORWARDER = "100.100.100.100"
NAMES = [f"host{i}.bench.test" for i in range(8)]
HOST_RECORDS = [f"--host-record={name},198.18.1.{i + 1}" for i, name in enumerate(NAMES)]
DEFAULT_OUT = BENCH / "published" / "dns"


# --- the load generator (runs in the namespace, or inside ipferry connect) --------------------

def query(qid: int, name: str) -> bytes:
    """A DNS query for ``name`` A IN, recursion desired, as raw bytes."""
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


def load(server: str, port: int, queries: int, concurrency: int, timeout: float) -> dict:
    """``queries`` queries to ``server``, ``concurrency`` in flight: latencies (s) of the answered
    ones (NOERROR with an answer, the id of a query in flight), timeouts, errors, wall time."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.connect((server, port))
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    ids = list(range(65536))
    random.shuffle(ids)
    free = ids  # query ids not in flight
    inflight: dict[int, float] = {}  # id -> sent at (perf_counter)
    latencies: list[float] = []
    timeouts = errors = sent = 0

    def send() -> None:
        nonlocal sent
        qid = free.pop()
        inflight[qid] = time.perf_counter()
        sock.send(query(qid, NAMES[sent % len(NAMES)]))
        sent += 1

    start = time.perf_counter()
    while sent < queries and len(inflight) < concurrency:
        send()
    while inflight:
        now = time.perf_counter()
        oldest = min(inflight.values())
        wait = oldest + timeout - now
        if wait <= 0:
            for qid, at in list(inflight.items()):
                if at + timeout <= now:
                    del inflight[qid]
                    free.insert(0, qid)  # reused last: a late answer cannot be taken for it
                    timeouts += 1
        elif sel.select(wait):
            while True:
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    break
                except ConnectionRefusedError:
                    errors += 1
                    continue
                got = time.perf_counter()
                if len(data) < 12:
                    errors += 1
                    continue
                qid, flags, _qd, ancount = struct.unpack("!HHHH", data[:8])
                at = inflight.pop(qid, None)
                if at is None:
                    continue  # a late answer to a query already counted as a timeout
                free.insert(0, qid)
                if flags & 0x8000 and flags & 0x000F == 0 and ancount >= 1:
                    latencies.append(got - at)
                else:
                    errors += 1
        while sent < queries and len(inflight) < concurrency:
            send()
    wall = time.perf_counter() - start
    sel.close()
    sock.close()
    return {"sent": sent, "answered": len(latencies), "timeouts": timeouts, "errors": errors,
            "wall": wall, "latencies": latencies}


def load_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="bench/dns.py load")
    p.add_argument("server")
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--queries", type=int, required=True)
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--timeout", type=float, default=2.0)
    a = p.parse_args(argv)
    if a.warmup:
        warm = load(a.server, a.port, a.warmup, min(a.concurrency, 4), a.timeout)
        if warm["answered"] == 0:
            raise SystemExit(f"no answer from {a.server} during the warm-up: {warm}")
    json.dump(load(a.server, a.port, a.queries, a.concurrency, a.timeout), sys.stdout)


# --- the run -------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def summary(raw: dict) -> dict:
    lat = raw["latencies"]
    out = {k: raw[k] for k in ("sent", "answered", "timeouts", "errors")}
    out["wall_s"] = round(raw["wall"], 4)
    out["qps"] = round(raw["answered"] / raw["wall"], 1) if raw["wall"] > 0 else 0.0
    out["p50_ms"] = round(percentile(lat, 50) * 1e3, 4) if lat else None
    out["p99_ms"] = round(percentile(lat, 99) * 1e3, 4) if lat else None
    out["mean_ms"] = round(sum(lat) / len(lat) * 1e3, 4) if lat else None
    return out


def run_load(cmd: list[str], what: str, timeout: float) -> dict:
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{what}: load generator exited {proc.returncode}: "
                           f"{err.decode()[-1500:]}")
    return json.loads(out)


def wait_resolver(ns_path: str, dnsmasq: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if dnsmasq.poll() is not None:
            raise RuntimeError(f"dnsmasq exited: {log.read_text()[-1000:]}")
        res = subprocess.run(["nsenter", f"--net={ns_path}", "dig", "+short", "+time=1",
                              "+tries=1", f"@{RESOLVER}", NAMES[0]], capture_output=True,
                             timeout=10)
        if res.stdout.strip() == b"198.18.1.1":
            return
        time.sleep(0.05)
    raise RuntimeError("dnsmasq did not answer in 10 s")


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def markdown(result: dict) -> str:
    d, t, r = result["direct"], result["through"], result["ratios"]
    lines = [
        f"DNS: {result['queries']} A queries, {result['concurrency']} in flight, UDP "
        f"(dnsmasq on {RESOLVER}; ipferry run --workers 1; {result['started']})",
        "",
        "| path | answered | timeouts | errors | qps | p50 (ms) | p99 (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, s in ((f"direct ({RESOLVER})", d), (f"through ipferry ({FORWARDER})", t)):
        lines.append(f"| {label} | {s['answered']} | {s['timeouts']} | {s['errors']} | "
                     f"{s['qps']:.0f} | {s['p50_ms']} | {s['p99_ms']} |")
    lines.append(f"| **through / direct** | | | | {r['qps']} | {r['p50']} | {r['p99']} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
    from testbed import IPFERRY, NO_CAPS, PYTHON, Reaper, in_netns  # noqa: PLC0415

    from tests.helpers import Daemon  # noqa: PLC0415

    reaper = Reaper()
    try:
        tmp = reaper.tmpdir()
        ns = reaper.netns(f"ipfbench-dns-{os.getpid()}")
        log = tmp / "dnsmasq.log"
        dnsmasq = reaper.popen(in_netns(ns.path, "dnsmasq", "--keep-in-foreground", "--no-resolv",
                                        "--no-hosts", f"--listen-address={RESOLVER}",
                                        "--bind-interfaces", "--port=53", "--user=root",
                                        "--pid-file=", "--cache-size=1000", *HOST_RECORDS),
                               log=log)
        wait_resolver(ns.path, dnsmasq, log)
        run_dir = tmp / "run"
        run_dir.mkdir()
        config = (f'[audit]\nsink = "{tmp / "audit.jsonl"}"\n\n[[onramps]]\nkind = "tunnel"\n\n'
                  f'[dns]\nupstreams = ["{RESOLVER}"]\n')
        daemon = Daemon(ns, run_dir, tmp, config=config, no_caps=True, env=None)
        reaper.daemons.append(daemon)
        daemon.start("--workers", "1", "--admin-listen", "")
        daemon.wait_ready()

        me = str(Path(__file__).resolve())
        gen = ["--queries", str(args.queries), "--concurrency", str(args.concurrency),
               "--warmup", str(args.warmup), "--timeout", str(args.timeout)]
        limit = 60 + args.queries * args.timeout / max(1, args.concurrency) * 2
        direct = run_load(in_netns(ns.path, PYTHON, me, "load", RESOLVER, *gen), "direct",
                          limit)
        through = run_load(in_netns(ns.path, *NO_CAPS, IPFERRY, "connect", "--tunnel",
                                    str(run_dir / "tunnel.sock"), "--tenant", "bench",
                                    "--no-dns", "--", PYTHON, me, "load", FORWARDER, *gen),
                           "through", limit)
        metrics = {dict(labels).get("result", ""): v for (name, labels), v
                   in daemon.metrics().items() if name == "ipferry_dns_queries_total"}
    finally:
        reaper.close()
    d, t = summary(direct), summary(through)
    return {
        "benchmark": "dns",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": {"kernel": platform.release(), "python": platform.python_version(),
                 "cpus": os.cpu_count()},
        "queries": args.queries, "concurrency": args.concurrency, "warmup": args.warmup,
        "timeout_s": args.timeout, "namespace": ns.name,
        "direct": d, "through": t,
        "ratios": {"qps": ratio(t["qps"], d["qps"]), "p50": ratio(t["p50_ms"], d["p50_ms"]),
                   "p99": ratio(t["p99_ms"], d["p99_ms"])},
        "daemon_dns_queries": metrics,
    }


def interrupted(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    # `bench/dns.py load SERVER ...`: the load generator alone (what the run starts in each path).
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        load_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=5000, help="queries per path (default 5000)")
    p.add_argument("--concurrency", type=int, default=16, help="queries in flight (default 16)")
    p.add_argument("--warmup", type=int, default=100, help="uncounted queries first (default 100)")
    p.add_argument("--timeout", type=float, default=2.0,
                   help="seconds after which a query counts as a timeout (default 2)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    args = p.parse_args()
    if args.queries < 1 or not 1 <= args.concurrency <= 4096:
        raise SystemExit("bench/dns: --queries >= 1, --concurrency within 1..4096")
    if os.geteuid() != 0:
        raise SystemExit("bench/dns: run as root: it creates a network namespace (ip netns add); "
                         "the daemon and connect then run without capabilities")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    try:
        result = run(args)
    except KeyboardInterrupt:
        print("bench/dns: interrupted; namespace and processes removed", file=sys.stderr)
        raise SystemExit(130) from None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dns.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "dns.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {args.out / 'dns.json'}, {args.out / 'dns.md'}")


if __name__ == "__main__":
    main()
