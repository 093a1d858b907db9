"""Where the data path spends its time: py-spy on a worker and on `ipferry connect` under iperf3.

A server namespace with the iperf3 server and the daemon (``--workers 1``, no capabilities), one
iperf3 run through ``ipferry connect``; py-spy samples the worker and the connect process for the
run and prints the functions with the most samples (self time, then inclusive).

    .venv/bin/python bench/profile.py [--mtu 1500] [--seconds 8] [--reverse] [--out DIR]
                                      [--workload iperf3|udp|connrate|latency] [--gil]
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.throughput import SERVER, Testbed  # noqa: E402
from tests.helpers import IPFERRY, NO_CAPS, Daemon  # noqa: E402

PY_SPY = str(Path(sys.executable).with_name("py-spy"))


def top(collapsed: Path, n: int = 25) -> str:
    """Self and inclusive sample counts per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.split(" (")[0] + " " + f.split("/")[-1].rstrip(")").split(":")[0]
                  for f in stack.split(";")]
        total += int(count)
        own[frames[-1]] += int(count)
        for f in set(frames):
            incl[f] += int(count)
    lines = [f"{total} samples", "self%  incl%  function"]
    for f, c in own.most_common(n):
        lines.append(f"{100 * c / total:5.1f}  {100 * incl[f] / total:5.1f}  {f}")
    return "\n".join(lines)


def ensure_py_spy() -> None:
    """py-spy in the venv (pip), or exit saying why not."""
    if Path(PY_SPY).exists():
        return
    print("profile: installing py-spy into the venv (pip)", file=sys.stderr, flush=True)
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"],
                         capture_output=True, text=True)
    if res.returncode != 0 or not Path(PY_SPY).exists():
        sys.exit(f"profile: py-spy is needed and could not be installed: "
                 f"{res.stderr.strip()[-300:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--reverse", action="store_true", help="download (iperf3 -R)")
    parser.add_argument("--workload", choices=["iperf3", "udp", "connrate", "latency"], default="iperf3",
                        help="iperf3 (bulk), udp (iperf3 -u, 64 B datagrams), or bench/rr.py's "
                             "connection rate or latency")
    parser.add_argument("--gil", action="store_true",
                        help="sample only while holding the GIL: Python's own CPU, without the "
                             "time spent in system calls")
    parser.add_argument("--perf", action="store_true",
                        help="also sample the worker with perf (kernel and native frames): where "
                             "the system calls' time goes")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()))
    args = parser.parse_args()
    ensure_py_spy()
    args.out.mkdir(parents=True, exist_ok=True)
    bed = Testbed()
    tmp = Path(tempfile.mkdtemp())
    server = client = None
    d = None
    try:
        run = tmp / "run"
        run.mkdir()
        d = Daemon(bed.server, run, tmp, config=None, no_caps=True, env=None)
        d.start("--workers", "1", "--admin-listen", "127.0.0.1:9189")
        d.wait_ready()
        worker = d.workers()[0]["pid"]
        rr = str(Path(__file__).with_name("rr.py"))
        if args.workload in ("iperf3", "udp"):
            cmd = ["iperf3", "-c", SERVER, "-t", str(args.seconds + 2),
                   *(["-R"] if args.reverse else []),
                   *(["-u", "-b", "0", "-l", "64"] if args.workload == "udp" else [])]
        else:
            server = subprocess.Popen(["nsenter", f"--net={bed.server.path}", sys.executable, rr,
                                       "serve", "--host", SERVER, "--port", "5300"])
            time.sleep(0.5)
            cmd = [sys.executable, rr, args.workload, "--host", SERVER, "--port", "5300",
                   "--count", "100000", "--round-trips", "1000000",
                   "--timeout", str(args.seconds + 3)]
        client = subprocess.Popen(
            [*NO_CAPS, IPFERRY, "connect", "--tunnel", str(run / "tunnel.sock"), "--mtu",
             str(args.mtu), "--", *cmd], stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)
        gil = ["--gil"] if args.gil else []
        spies = [subprocess.Popen([PY_SPY, "record", "--nonblocking", *gil, "-r", "200", "-d",
                                   str(args.seconds), "-f", "raw", "-o",
                                   str(args.out / f"{name}.txt"), "-p", str(pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for name, pid in (("worker", worker), ("connect", client.pid))]
        if args.perf:
            spies.append(subprocess.Popen(["perf", "record", "-q", "-F", "999", "-o",
                                           str(args.out / "worker.perf"), "-p", str(worker), "--",
                                           "sleep", str(args.seconds)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for spy in spies:
            spy.wait()
        if args.workload not in ("iperf3", "udp"):
            client.terminate()
        out, _ = client.communicate(timeout=60)
        print("\n".join(line for line in out.splitlines() if "sender" in line or "receiver" in line))
        for name in ("worker", "connect"):
            print(f"\n== {name} ==\n{top(args.out / f'{name}.txt')}")
        if args.perf:
            report = subprocess.run(["perf", "report", "-i", str(args.out / "worker.perf"),
                                     "--no-children", "--sort", "sym", "--stdio", "-q"],
                                    capture_output=True, text=True).stdout
            print("\n== worker (perf, self) ==\n" + "\n".join(
                line for line in report.splitlines() if line.strip())[:4000])
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        if d is not None:
            d.destroy()
        bed.close()


if __name__ == "__main__":
    main()
