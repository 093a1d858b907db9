"""ipferry against pasta, slirp4netns and a veth pair, the same workloads in one run.

Builds its own testbed out of network namespaces (nothing leaves the machine; see testbed.py),
installs what it lacks (iperf3, passt for pasta, slirp4netns with apt-get; matplotlib with pip),
and measures, for every MTU and through every transport, from a client namespace to servers
outside it: TCP bulk throughput both ways with 1 and 4 streams (iperf3), TCP connection rate
and request/response latency (bench/rr.py), UDP small-datagram rate and loss (iperf3 -u), and the
proxy's CPU seconds per GB. Writes <out>/latest.{json,md,png} and a timestamped copy of each.

    bench/run                  # 3 runs x 5 s a cell, MTU 65520 and 1500 (about 15 minutes)
    bench/run --quick          # 1 run x 1 s a cell, smaller counts: a smoke test
    bench/run --only pasta,veth --only tcp --mtu 1500
    bench/run --gue            # also ipferry over its GUE on-ramp (if `ipferry connect` has --gue)
    bench/run --publish        # also bench/published/ and docs/benchmarks.md's table
    bench/run --devices        # device to device instead (bench/devices.py): two devices of a
                               # private network through the daemon (IP packets, streams; 1 and 2
                               # workers), a veth pair between two namespaces (the limit) and
                               # kernel WireGuard where the kernel has it
    bench/run --only devices-ip-w1,devices-stream-w1,devices-veth --runs 3 --duration 3

The device transports run only when named (``--devices`` or ``--only devices-...``), in tables
of their own whose ratios are to the veth pair between the two devices; ``--publish`` puts such a
run in bench/published/private-networks/ and leaves the README alone.

Needs root (it creates network namespaces). The daemon, connect, pasta and slirp4netns run as root
with no capabilities, as the tests run the daemon.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import devices  # noqa: E402
import report  # noqa: E402
import testbed  # noqa: E402
import workloads  # noqa: E402

REPO = HERE.parent
GUE_LISTEN = "127.0.0.1:6080"  # in the server namespace; the GUE row's daemon listens there
PACKAGES = {"iperf3": "iperf3", "pasta": "passt", "slirp4netns": "slirp4netns", "ip": "iproute2",
            "nsenter": "util-linux", "unshare": "util-linux", "setpriv": "util-linux",
            "sysctl": "procps", "ss": "iproute2", "wg": "wireguard-tools",
            "haproxy": "haproxy"}
README_BEGIN = "<!-- bench/run: begin (bench/run --publish rewrites this block) -->"
README_END = "<!-- bench/run: end -->"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- what the machine needs ---------------------------------------------------------------------

def ensure_commands(commands: set[str]) -> set[str]:
    """Install the Debian packages of missing commands (apt-get update once); return those still
    missing."""
    missing = {c for c in commands if shutil.which(c) is None}
    if missing and shutil.which("apt-get"):
        packages = sorted({PACKAGES[c] for c in missing if c in PACKAGES})
        say(f"installing {' '.join(packages)} (apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        res = subprocess.run(["apt-get", "install", "-y", "-qq", *packages], env=env,
                             capture_output=True, text=True)
        if res.returncode != 0:
            say(f"apt-get install failed: {res.stderr.strip()[-300:]}")
    return {c for c in commands if shutil.which(c) is None}


def ensure_matplotlib() -> bool:
    try:
        importlib.import_module("matplotlib")
        return True
    except ImportError:
        pass
    say("installing matplotlib into the venv (pip) for the chart")
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        say(f"pip install matplotlib failed, no chart: {res.stderr.strip()[-300:]}")
        return False
    importlib.invalidate_caches()
    return True


def first_line(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    out = (res.stdout or res.stderr).strip().splitlines()
    return out[0] if out else "unknown"


def deb_version(package: str) -> str:
    res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True,
                         text=True)
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else "unknown"


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    slirp = subprocess.run(["slirp4netns", "--version"], capture_output=True, text=True) \
        if shutil.which("slirp4netns") else None
    slirp_v = "not installed"
    if slirp and slirp.returncode == 0:
        v = re.search(r"slirp4netns version (\S+)", slirp.stdout)
        lib = re.search(r"libslirp: (\S+)", slirp.stdout)
        slirp_v = f"{v.group(1) if v else '?'} (libslirp {lib.group(1) if lib else '?'})"
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    return {"cores": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "iperf3": first_line(["iperf3", "--version"]),
            "pasta": deb_version("passt") if shutil.which("pasta") else "not installed",
            "slirp4netns": slirp_v, "ipferry_commit": commit,
            "loadavg_at_start": round(os.getloadavg()[0], 2)}


def connect_has_gue() -> bool:
    res = subprocess.run([testbed.IPFERRY, "connect", "--help"], capture_output=True, text=True)
    return "--gue" in res.stdout


# -- the run ------------------------------------------------------------------------------------

def select(patterns: list[str], names: list[str]) -> list[str]:
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]


def build_transports(args, reaper, server, tmp, notes: list[str]):
    """Every transport that can run here, in table order."""
    daemons = {w: testbed.IpferryDaemon(server, reaper, w, GUE_LISTEN if args.gue and w == 2
                                        else None) for w in (1, 2)}
    candidates = [testbed.IpferryConnect(daemons[1], reaper, tmp),
                  testbed.IpferryConnect(daemons[2], reaper, tmp)]
    # --- GUE row (optional): ipferry connect --gue HOST:PORT to the w=2 daemon's GUE on-ramp ---
    if args.gue:
        if connect_has_gue():
            candidates.append(testbed.IpferryConnect(daemons[2], reaper, tmp, gue=True))
        else:
            notes.append("GUE row skipped: `ipferry connect --help` does not list --gue yet.")
            say(notes[-1])
    candidates += [testbed.Pasta(server, reaper, tmp), testbed.Slirp4netns(server, reaper, tmp),
                   testbed.Relay(server, reaper, tmp), testbed.Veth(server, reaper)]
    return candidates


def run(args) -> dict:
    groups = list(workloads.GROUPS)
    transport_ids = ["ipferry-w1", "ipferry-w2", "ipferry-gue", "pasta", "slirp4netns", "haproxy",
                     "veth"]
    patterns = [p for arg in args.only for p in arg.split(",") if p]
    if args.devices:
        patterns.append("devices-*")
    args.gue = args.gue or "ipferry-gue" in patterns
    chosen_groups = select(patterns, groups) or groups
    # Without a transport named, the proxies against their peers; the devices only when asked.
    chosen_ids = select(patterns, transport_ids + devices.IDS) or transport_ids
    unknown = [p for p in patterns if not select([p], groups + transport_ids + devices.IDS)]
    if unknown:
        raise SystemExit(f"bench/run: --only {','.join(unknown)} matches no transport "
                         f"({', '.join(transport_ids + devices.IDS)}) nor workload "
                         f"({', '.join(groups)})")
    opts = workloads.Options(duration=args.duration, conns=args.conns,
                             concurrency=args.concurrency, round_trips=args.round_trips)
    notes: list[str] = []
    started = time.monotonic()
    result: dict = {
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "config": {"runs": args.runs, "duration": args.duration, "mtus": args.mtu,
                   "conns": args.conns, "concurrency": args.concurrency,
                   "round_trips": args.round_trips, "size": opts.size, "udp_size": opts.udp_size,
                   "workloads": chosen_groups, "gue": args.gue,
                   "command": "bench/run " + " ".join(sys.argv[1:])},
    }

    reaper = testbed.Reaper()
    samples: dict = {}
    errors: dict = {}
    try:
        tmp = reaper.tmpdir()
        server = testbed.ServerNamespace(reaper, tmp)
        transports = [t for t in build_transports(args, reaper, server, tmp, notes)
                      if t.id in chosen_ids]
        transports += devices.build(chosen_ids, server, reaper, tmp)
        for t in list(transports):
            why = t.probe() if hasattr(t, "probe") else None
            if why:  # e.g. no kernel WireGuard: a note, never a failure
                notes.append(f"{t.label} not measured: {why}.")
                say(notes[-1])
                transports.remove(t)
        need = {"iperf3", "ip", "nsenter", "sysctl"} | {c for t in transports for c in t.needs}
        still_missing = ensure_commands(need)
        for t in list(transports):
            lacking = [c for c in t.needs if c in still_missing]
            if lacking:
                notes.append(f"{t.label} not measured: {', '.join(lacking)} is not installed.")
                say(notes[-1])
                transports.remove(t)
        if "iperf3" in still_missing:
            raise SystemExit("bench/run: iperf3 is missing and could not be installed")
        result["machine"] = machine()
        if any(devices.is_device(t) for t in chosen_ids):
            result["machine"]["wg"] = devices.wireguard_version()
        for t in list(transports):
            try:
                t.start()
            except Exception as exc:  # a transport that cannot start is a row of notes, not a crash
                notes.append(f"{t.label} not measured: it did not start ({exc}).")
                say(notes[-1][:500])
                transports.remove(t)
        steps = workloads.plan(opts, set(chosen_groups))
        say(f"{len(transports)} transports x {len(args.mtu)} MTUs x {args.runs} runs, "
            f"{len(steps)} workloads each")
        for run_no in range(1, args.runs + 1):
            for mtu in args.mtu:
                for t in transports:
                    measure_cell(t, mtu, steps, server, samples, errors,
                                 f"run {run_no}/{args.runs} MTU {mtu} {t.label}")
        result["transports"] = [{"id": t.id, "label": t.label} for t in transports]
        counters = {t.id: t.counters() for t in transports if hasattr(t, "counters")}
        if counters:  # how the daemons carried the device transports' flows (bench/devices.py)
            result["counters"] = counters
    finally:
        reaper.close()
    for metric, by_mtu in errors.items():
        for mtu, by_t in by_mtu.items():
            for tid, errs in by_t.items():
                if not samples.get(metric, {}).get(mtu, {}).get(tid):
                    notes.append(f"{metric} MTU {mtu} {tid}: not measured: {errs[-1]}")
    result["wall_seconds"] = time.monotonic() - started
    result["notes"] = notes
    result["samples"] = samples
    result["errors"] = errors
    result["rows"] = report.summarize(samples, errors, result["transports"], args.mtu)
    return result


def measure_cell(t, mtu: int, steps, server, samples: dict, errors: dict, where: str) -> None:
    """One client namespace through transport ``t`` at ``mtu``; every workload in it."""
    def record(metric_ids, value_or_error) -> None:
        for mid in metric_ids:
            if isinstance(value_or_error, dict):
                if mid in value_or_error:
                    samples.setdefault(mid, {}).setdefault(str(mtu), {}).setdefault(
                        t.id, []).append(value_or_error[mid])
            else:
                errors.setdefault(mid, {}).setdefault(str(mtu), {}).setdefault(
                    t.id, []).append(value_or_error)

    t0 = time.monotonic()
    try:
        client = t.open(mtu)
    except Exception as exc:
        for group, _, _ in steps:
            record(workloads.GROUPS[group], f"could not open the namespace: {exc}")
        say(f"{where}: could not open the namespace: {str(exc)[:300]}")
        return
    shown = []
    try:
        workloads.ready(client)
        for group, name, fn in steps:
            if group in getattr(t, "without", ()):
                continue
            for attempt in (1, 2):
                try:
                    values = fn(client)
                    break
                except workloads.WorkloadError as exc:
                    # iperf3's server can be left busy by a broken test: restart it, try once more
                    if attempt == 2 or group not in ("tcp", "udp"):
                        values = str(exc)
                        break
                    (client.restart_iperf or server.start_iperf)()
            record(workloads.GROUPS[group], values)
            shown.append(f"{name} " + (", ".join(
                f"{workloads.METRIC[k].format(v)} {workloads.METRIC[k].unit}"
                for k, v in values.items() if not k.startswith("cpu_"))
                if isinstance(values, dict) else f"FAILED ({values[:160]})"))
    except workloads.WorkloadError as exc:
        for group, _, _ in steps:
            record(workloads.GROUPS[group], f"not ready: {exc}")
        shown.append(f"not ready: {exc}")
    finally:
        client.close()
    say(f"{where} ({time.monotonic() - t0:.0f} s): " + "; ".join(shown))


# -- output -------------------------------------------------------------------------------------

def write_outputs(result: dict, out: Path, chart_ok: bool) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    md = report.markdown(result)
    paths = {}
    for name in ("latest", stamp):
        (out / f"{name}.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
        (out / f"{name}.md").write_text(md)
        paths["json"], paths["md"] = out / "latest.json", out / "latest.md"
    if chart_ok:
        try:
            report.chart(result, out / "latest.png")
            shutil.copy(out / "latest.png", out / f"{stamp}.png")
            paths["png"] = out / "latest.png"
        except Exception as exc:  # the numbers matter more than the picture
            say(f"no chart: {exc}")
    return paths


def publish(result: dict, paths: dict[str, Path]) -> None:
    """bench/published/ (tracked) and the README block between the markers; a run with device
    transports goes to bench/published/private-networks/ and leaves the README alone."""
    dest = HERE / "published"
    has_devices = any(t["id"].startswith("devices-") for t in result["transports"])
    if has_devices:
        dest = dest / "private-networks"
    dest.mkdir(exist_ok=True)
    shutil.copy(paths["json"], dest / "benchmark.json")
    shutil.copy(paths["md"], dest / "benchmark.md")
    if "png" in paths:
        shutil.copy(paths["png"], dest / "benchmark.png")
    if has_devices:
        say(f"{dest} updated (the README's table is the proxies', not rewritten)")
        return
    readme = REPO / "docs" / "benchmarks.md"  # (the README links it)
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        say(f"docs/benchmarks.md has no {README_BEGIN!r} block: only bench/published/ was "
            "updated")
        return
    command = re.sub(r" --(publish|out \S+)", "", result["config"]["command"]).strip()
    block = "\n".join([
        README_BEGIN, "",
        f"The latest full run; reproduce it with `{command}`:", "",
        report.markdown(result).rstrip(), "",
        "![throughput and connection rate](../bench/published/benchmark.png)" if "png" in paths
        else "", "", README_END])
    head, _, rest = text.partition(README_BEGIN)
    _, _, tail = rest.partition(README_END)
    readme.write_text(head + block + tail)
    say("docs/benchmarks.md's table and bench/published/ updated")


def interrupted(signum: int, _frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1 run of 1 s a cell, 300 connections, 1000 round trips")
    parser.add_argument("--runs", type=int, help="runs of every cell (default 3)")
    parser.add_argument("--duration", type=float, help="seconds of every iperf3 run (default 5)")
    parser.add_argument("--mtu", type=int, action="append",
                        help="client MTU, repeatable (default 65520 and 1500)")
    parser.add_argument("--only", action="append", default=[], metavar="PATTERN[,PATTERN]",
                        help="transports (ipferry-w1, ipferry-w2, ipferry-gue, pasta, slirp4netns, haproxy, "
                             "veth; devices-ip-w1, devices-ip-w2, devices-stream-w1, "
                             "devices-stream-w2, devices-veth, devices-wireguard) and/or workloads "
                             "(tcp, connrate, latency, udp) to run; glob patterns, repeatable "
                             "(ratios need veth, or devices-veth); without a transport, the first "
                             "six")
    parser.add_argument("--devices", action="store_true",
                        help="device to device through a private network: --only 'devices-*'")
    parser.add_argument("--no-chart", action="store_true", help="no PNG (and no matplotlib)")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="directory for latest.{json,md,png} and timestamped copies "
                             "(default bench/results/)")
    parser.add_argument("--gue", action="store_true",
                        help=f"also ipferry connect --gue {GUE_LISTEN} (w=2 daemon's GUE on-ramp)")
    parser.add_argument("--conns", type=int, help="connections of the rate workload (2000)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="connections in flight in the rate workload (8)")
    parser.add_argument("--round-trips", type=int, help="round trips of the latency workload (5000)")
    parser.add_argument("--publish", action="store_true",
                        help="also copy the results to bench/published/ and rewrite the README's "
                             "benchmark table")
    args = parser.parse_args()
    quick = args.quick
    args.runs = args.runs or (1 if quick else 3)
    args.duration = args.duration or (1 if quick else 5)
    args.conns = args.conns or (300 if quick else 2000)
    args.round_trips = args.round_trips or (1000 if quick else 5000)
    args.mtu = args.mtu or [65520, 1500]
    if any(not 576 <= m <= 65520 for m in args.mtu):
        raise SystemExit("bench/run: --mtu must be within 576..65520")
    if os.geteuid() != 0:
        raise SystemExit("bench/run: run as root: it creates network namespaces (ip netns add); "
                         "everything it starts then runs without capabilities")

    # SIGTERM/SIGHUP end the run like Ctrl-C does: through the finally blocks that clean up.
    # (SIGINT too: a shell starts background jobs with it ignored.)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    chart_ok = not args.no_chart and ensure_matplotlib()
    try:
        result = run(args)
    except KeyboardInterrupt:
        say("interrupted; namespaces and processes removed")
        raise SystemExit(130) from None
    paths = write_outputs(result, args.out, chart_ok)
    print(report.markdown(result))
    say(f"wall time {result['wall_seconds'] / 60:.1f} min; wrote "
        + ", ".join(str(p) for p in paths.values()))
    if args.publish:
        publish(result, paths)


if __name__ == "__main__":
    main()
