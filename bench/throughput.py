"""iperf3 through ``ipferry connect`` against a plain veth pair, side by side in one run.

Everything lives in network namespaces made for the run: the server namespace holds the iperf3
server (on 198.18.0.1, its own loopback) and the daemon; the reference client reaches the same
server over a veth pair. Rows: MTU 65520 and 1500, upload (client -> server) and download (-R),
ipferry with --workers 1 and 2, and veth. Figures are medians of --repeat runs, with min and max.

    .venv/bin/python bench/throughput.py [--seconds 5] [--repeat 3] [--json out.json]
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

from tests.helpers import IPFERRY, NO_CAPS, Daemon, NetNs  # noqa: E402

SERVER = "198.18.0.1"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def iperf3_json(cmd: list[str], timeout: float) -> float:
    """Run an iperf3 client command; return the received Gbit/s."""
    res = subprocess.run(cmd, capture_output=True, timeout=timeout, text=True)
    out = json.loads(res.stdout) if res.stdout.strip().startswith("{") else {}
    if res.returncode != 0 or "end" not in out:
        raise RuntimeError(f"iperf3 failed: {res.stderr[-500:]} {out.get('error', '')}")
    return out["end"]["sum_received"]["bits_per_second"] / 1e9


class Testbed:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.server = NetNs(f"ipfb-srv-{tag}")
        self.client = NetNs(f"ipfb-cli-{tag}")
        sh("ip", "-n", self.server.name, "addr", "add", f"{SERVER}/32", "dev", "lo")
        self.veth = (f"vb{tag}a", f"vb{tag}b")
        sh("ip", "link", "add", self.veth[0], "netns", self.client.name, "type", "veth",
           "peer", "name", self.veth[1], "netns", self.server.name)
        sh("ip", "-n", self.client.name, "addr", "add", "10.97.0.2/30", "dev", self.veth[0])
        sh("ip", "-n", self.server.name, "addr", "add", "10.97.0.1/30", "dev", self.veth[1])
        for ns, dev in ((self.client, self.veth[0]), (self.server, self.veth[1])):
            sh("ip", "-n", ns.name, "link", "set", dev, "up")
        sh("ip", "-n", self.client.name, "route", "add", f"{SERVER}/32", "via", "10.97.0.1")
        self.iperf = subprocess.Popen(["nsenter", f"--net={self.server.path}", "iperf3", "-s",
                                       "-B", SERVER], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def set_veth_mtu(self, mtu: int) -> None:
        sh("ip", "-n", self.client.name, "link", "set", self.veth[0], "mtu", str(mtu))
        sh("ip", "-n", self.server.name, "link", "set", self.veth[1], "mtu", str(mtu))

    def close(self) -> None:
        self.iperf.kill()
        self.iperf.wait()
        self.client.delete()
        self.server.delete()


def measure(args) -> dict:
    bed = Testbed()
    rows: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    tmp = Path(tempfile.mkdtemp())
    try:
        daemons = {}
        for workers in (1, 2):
            run = tmp / f"run{workers}"
            run.mkdir()
            d = Daemon(bed.server, run, tmp, config=None, no_caps=True, env=None)
            d.start("--workers", str(workers), "--admin-listen", f"127.0.0.1:{9180 + workers}")
            d.wait_ready()
            daemons[workers] = d
        for _ in range(args.repeat):
            for mtu in (65520, 1500):
                bed.set_veth_mtu(mtu)
                for direction, flag in (("upload", []), ("download", ["-R"])):
                    base = ["iperf3", "-c", SERVER, "-t", str(args.seconds), "-J", *flag]
                    key = f"veth mtu={mtu} {direction}"
                    rows.setdefault(key, []).append(iperf3_json(
                        ["nsenter", f"--net={bed.client.path}", *base], args.seconds + 20))
                    for workers, d in daemons.items():
                        key = f"ipferry w={workers} mtu={mtu} {direction}"
                        before = daemon_cpu(d)
                        rows.setdefault(key, []).append(iperf3_json(
                            [*NO_CAPS, IPFERRY, "connect", "--tunnel", str(d.runtime_dir /
                             "tunnel.sock"), "--mtu", str(mtu), "--", *base], args.seconds + 30))
                        cpu.setdefault(key, []).append(daemon_cpu(d) - before)
                    print(f"done: mtu={mtu} {direction}", file=sys.stderr)
        for d in daemons.values():
            d.destroy()
    finally:
        bed.close()
    return {"rows": rows, "cpu_seconds": cpu}


def daemon_cpu(d: Daemon) -> float:
    """CPU seconds of the daemon's processes so far (from its own metrics)."""
    return sum(v for (name, _), v in d.metrics().items()
               if name == "ipferry_process_cpu_seconds_total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args)
    result["machine"] = {"cores": os.cpu_count(), "kernel": os.uname().release}
    print("| path | MTU | direction | Gbit/s median (min-max) | x veth | proxy CPU s per GB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mtu in (65520, 1500):
        for direction in ("upload", "download"):
            veth = statistics.median(result["rows"][f"veth mtu={mtu} {direction}"])
            for name in ("veth", "ipferry w=1", "ipferry w=2"):
                key = f"{name} mtu={mtu} {direction}"
                v = result["rows"][key]
                med = statistics.median(v)
                cpu = result["cpu_seconds"].get(key)
                per_gb = (f"{statistics.median(cpu) / (med * args.seconds / 8):.2f}"
                          if cpu and med else "-")
                print(f"| {name} | {mtu} | {direction} | {med:.2f} ({min(v):.2f}-{max(v):.2f}) "
                      f"| {med / veth:.3f} | {per_gb} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
