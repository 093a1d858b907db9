"""Start-up time to /readyz and RSS per process role, with 1 and 4 workers.

Each daemon runs inside a network namespace made for the run, with no capabilities, exactly as the
tests run it. The baselines, measured in the same run: a bare interpreter start, and one that
imports the supervisor's modules (the floor any Python daemon of this shape pays per process).

    .venv/bin/python bench/startup.py [--repeat 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import Daemon, NetNs  # noqa: E402  (the same real-kernel harness as the tests)


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def one_start(workers: int) -> tuple[float, dict[str, float]]:
    ns = NetNs(f"ipfb-{uuid.uuid4().hex[:8]}")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        d = Daemon(ns, run, Path(tmp), config=None, no_caps=True, env=None)
        try:
            t0 = time.perf_counter()
            d.start("--workers", str(workers))
            while True:
                try:
                    if d.request("GET", "/readyz")[0] == 200:
                        break
                except OSError:
                    pass
                if d.proc.poll() is not None:
                    raise SystemExit(d.logs())
                time.sleep(0.002)
            elapsed = time.perf_counter() - t0
            time.sleep(0.5)  # let the loops settle before reading memory
            rss: dict[str, list[float]] = {}
            for (name, labels), value in d.metrics().items():
                if name == "ipferry_process_resident_memory_bytes":
                    rss.setdefault(dict(labels)["role"], []).append(value)
            return elapsed, {role: statistics.mean(v) for role, v in rss.items()}
        finally:
            d.destroy()
            ns.delete()


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    py = sys.executable
    results: dict = {"machine": {"cores": os.cpu_count(), "kernel": os.uname().release,
                                 "python": sys.version.split()[0]}}
    results["baseline_python_s"] = summary([timed([py, "-c", "pass"]) for _ in range(args.repeat)])
    results["baseline_imports_s"] = summary(
        [timed([py, "-c", "import ipferry.supervisor.arbiter, ipferry.supervisor.admin"])
         for _ in range(args.repeat)])
    for workers in (1, 4):
        times, rss = [], {}
        for i in range(args.repeat):
            t, r = one_start(workers)
            times.append(t)
            for role, v in r.items():
                rss.setdefault(role, []).append(v)
            print(f"workers={workers} run {i + 1}/{args.repeat}: {t * 1000:.0f} ms", file=sys.stderr)
        results[f"workers_{workers}"] = {
            "ready_s": summary(times),
            "rss_mib": {role: round(statistics.median(v) / 2**20, 1) for role, v in rss.items()},
        }

    base = results["baseline_imports_s"]["median"]
    print("| workers | to /readyz, median (min-max) | x import baseline "
          "| RSS MiB: supervisor / nsd / worker |")
    print("| --- | --- | --- | --- |")
    for workers in (1, 4):
        r = results[f"workers_{workers}"]
        s = r["ready_s"]
        m = r["rss_mib"]
        print(f"| {workers} | {s['median'] * 1000:.0f} ms ({s['min'] * 1000:.0f}-{s['max'] * 1000:.0f}) "
              f"| {s['median'] / base:.1f}x | {m['supervisor']} / {m['nsd']} / {m['worker']} |")
    print(f"baselines: bare python {results['baseline_python_s']['median'] * 1000:.0f} ms, "
          f"python importing the supervisor {base * 1000:.0f} ms")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
