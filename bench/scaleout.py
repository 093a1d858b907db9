#!/usr/bin/env python3
"""Scale-out: aggregate GUE throughput and connection rate through 1, 2 and 3 ipferry nodes
behind a router's resilient ECMP group (the topology of tests/e2e/fleet.py, all in namespaces
made here), with the CPU each node spent.

One client namespace runs ``ipferry connect --gue`` to the anycast address (its flows spread
over source ports by their hash, the router spreads the ports over the nodes); in it, iperf3
with several streams up and down, and ``bench/rr.py connrate``. Every node runs ``--workers 1``
without capabilities. Figures are ratios to 1 node measured in the same run; on a 2-core
machine the client, the servers and every node share the cores, so more nodes cannot add
capacity here: what this shows is the spread (flows and CPU per node) and the cost of more
nodes, not a speed-up (docs/scale-out.md says what the figures mean on bigger machines).

    bench/scaleout.py                       # 1, 2, 3 nodes; 5 s iperf3 cells; 2000 connections
    bench/scaleout.py --quick               # 1 s cells, 300 connections: CI size
    bench/scaleout.py --nodes 1,3 --json out.json
    bench/scaleout.py --churn               # what a change of nodes moves, resilient or not

``--churn``: 3 nodes, 300 long-lived TCP flows (tests/e2e/fleetclient.py); node 3 leaves the
group, then joins again; after each change every flow sends a block and checks its echo. A
flow that moved to a node that never saw it is reset there. Once with the resilient group,
once with a plain multipath route (hash-threshold), as a router without resilient groups has.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from testbed import (
    IPERF_PORT,
    PYTHON,
    RR,
    RR_PORT,
    Reaper,
    cpu_seconds,
    descendants,
    in_netns,
    wait_for_keeper,
)

from tests.e2e.dataplane import STREAM_PORT  # (testbed put the repo on sys.path)
from tests.e2e.fleet import SERVER, Fleet, wait_file

HERE = Path(__file__).resolve().parent

KEEPER = ["sleep", "infinity"]


def run_json(cmd: list[str], timeout: float) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    try:
        out = json.loads(res.stdout)
    except ValueError:
        out = {}
    if res.returncode != 0 or not out or out.get("error"):
        raise RuntimeError(f"{' '.join(cmd[-8:])}: {out.get('error') or res.stderr[-500:]}")
    return out


def node_pids(fleet: Fleet, index: int) -> list[int]:
    d = fleet.daemons[index]
    return [d.pid, *descendants(d.pid)]


def measure(nodes: int, args: argparse.Namespace, reaper: Reaper) -> dict:
    tmp = reaper.tmpdir()
    fleet = Fleet(nodes, tmp)
    try:
        reaper.popen(in_netns(fleet.server.path, "iperf3", "-s", "-B", SERVER, "-p",
                              str(IPERF_PORT)), log=tmp / "iperf3.log")
        reaper.popen(in_netns(fleet.server.path, PYTHON, RR, "serve", "--host", SERVER, "--port",
                              str(RR_PORT)), log=tmp / "rr.log")
        fleet.start()
        launcher = reaper.popen(fleet.connect(*KEEPER, ports=args.ports), log=tmp / "connect.log")
        keeper = wait_for_keeper(launcher)
        netns = f"/proc/{keeper}/ns/net"
        time.sleep(0.5)
        out: dict = {"nodes": nodes}
        cells = [("up", []), ("down", ["-R"])]
        for name, flags in cells:
            before = [cpu_seconds(node_pids(fleet, i)) for i in range(nodes)]
            t0 = time.monotonic()
            res = run_json(in_netns(netns, "iperf3", "-c", SERVER, "-p", str(IPERF_PORT), "-t",
                                    f"{args.duration:g}", "-P", str(args.streams), "-J",
                                    "--connect-timeout", "5000", *flags), args.duration + 40)
            wall = time.monotonic() - t0
            out[f"gbps_{name}"] = res["end"]["sum_received"]["bits_per_second"] / 1e9
            out[f"cores_{name}"] = [round((cpu_seconds(node_pids(fleet, i)) - b) / wall, 3)
                                    for i, b in enumerate(before)]
        before = [cpu_seconds(node_pids(fleet, i)) for i in range(nodes)]
        res = run_json(in_netns(netns, PYTHON, RR, "connrate", "--host", SERVER, "--port",
                                str(RR_PORT), "--count", str(args.conns), "--concurrency",
                                str(args.concurrency)), 300)
        if res["errors"]:
            raise RuntimeError(f"connrate: {args.conns - res['ok']} connections failed: "
                               f"{res['errors']}")
        out["conn_rate"] = res["rate"]
        cpu = [cpu_seconds(node_pids(fleet, i)) - b for i, b in enumerate(before)]
        out["cpu_per_1k_conns"] = [round(c / (res["ok"] / 1000), 3) for c in cpu]
        # Where the connections went: each node's flow_start records on the rr port.
        out["conns_by_node"] = [len(s) for s in fleet.flow_starts(RR_PORT).values()]
        reaper.stop(launcher)
        return out
    finally:
        for proc in list(reaper.procs):
            reaper.stop(proc, grace=1)
        fleet.close()


def churn(resilient: bool, flows: int, reaper: Reaper) -> dict:
    """Flows moved by node 3 leaving and joining again (see the module's docstring)."""
    tmp = reaper.tmpdir()
    tmp.chmod(0o755)
    fleet = Fleet(3, tmp, resilient=resilient)
    try:
        reaper.popen(in_netns(fleet.server.path, PYTHON, str(HERE.parent / "tests" / "e2e" /
                                                             "streams.py"),
                              "serve", SERVER, str(STREAM_PORT)), log=tmp / "streams.log")
        fleet.start()
        out = tmp / "client"
        out.mkdir()
        out.chmod(0o777)
        client = reaper.popen(fleet.connect("python3", str(HERE.parent / "tests" / "e2e" /
                                                           "fleetclient.py"),
                                            SERVER, str(STREAM_PORT), str(flows), str(out), "3",
                                            ports=1024), log=tmp / "client.log")
        first = wait_file(out / "phase-1.json", 120, client)["flows"]
        owner = {str(r["sport"]): i for i, starts in fleet.flow_starts(STREAM_PORT).items()
                 for r in starts}
        fleet.set_group([1, 2])
        (out / "go-1").touch()
        second = wait_file(out / "phase-2.json", 120, client)["flows"]
        fleet.set_group([1, 2, 3])
        (out / "go-2").touch()
        third = wait_file(out / "phase-3.json", 120, client)["flows"]
        ok = [p for p, s in first.items() if s == "ok"]
        on3 = [p for p in ok if owner.get(p) == 3]
        others = [p for p in ok if owner.get(p) in (1, 2)]
        survivors = [p for p in others if second[p] == "ok"]
        return {"group": "resilient" if resilient else "multipath", "flows": len(ok),
                "on_node_3": len(on3),
                "leave_moved_node_3s": sum(1 for p in on3 if second[p] != "ok"),
                "leave_moved_others": len(others) - len(survivors),
                "join_moved": sum(1 for p in survivors if third[p] != "ok"),
                "survivors": len(survivors)}
    finally:
        for proc in list(reaper.procs):
            reaper.stop(proc, grace=1)
        fleet.close()


def churn_main(args: argparse.Namespace) -> int:
    reaper = Reaper()
    try:
        rows = [churn(resilient, args.flows, reaper) for resilient in (True, False)]
    finally:
        reaper.close()
    print("| group | flows | on node 3 | node 3 leaves: its flows moved | ... others moved | "
          "node 3 joins: flows moved (of those left) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['group']} | {r['flows']} | {r['on_node_3']} | {r['leave_moved_node_3s']} | "
              f"{r['leave_moved_others']} | {r['join_moved']} of {r['survivors']} |")
    if args.json:
        args.json.write_text(json.dumps({"churn": rows}, indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="1,2,3", help="node counts to measure (default 1,2,3)")
    parser.add_argument("--runs", type=int, default=1, help="turns over the node counts")
    parser.add_argument("--duration", type=float, default=5, help="seconds per iperf3 cell")
    parser.add_argument("--streams", type=int, default=8, help="iperf3 streams (flows to spread)")
    parser.add_argument("--conns", type=int, default=2000, help="connections for the rate")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--ports", type=int, default=32, help="connect's --gue-ports")
    parser.add_argument("--quick", action="store_true", help="1 s cells, 300 connections")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--churn", action="store_true",
                        help="instead: what node 3 leaving and joining moves (3 nodes)")
    parser.add_argument("--flows", type=int, default=300, help="--churn's long-lived flows")
    args = parser.parse_args()
    if args.churn:
        return churn_main(args)
    if args.quick:
        args.duration, args.conns = 1, 300
    counts = [int(n) for n in args.nodes.split(",")]
    if not counts or any(not 1 <= n <= 8 for n in counts):
        parser.error("--nodes: counts within 1..8, e.g. 1,2,3")
    reaper = Reaper()
    samples: dict[int, list[dict]] = {n: [] for n in counts}
    try:
        for run in range(args.runs):
            for n in counts:
                print(f"run {run + 1}/{args.runs}: {n} node{'s' if n > 1 else ''} ...",
                      file=sys.stderr, flush=True)
                samples[n].append(measure(n, args, reaper))
    finally:
        reaper.close()
    rows = {n: {k: statistics.median(s[k] for s in samples[n])
                for k in ("gbps_up", "gbps_down", "conn_rate")} for n in counts}
    base = rows[counts[0]]
    print(f"| nodes | up, Gbit/s | down, Gbit/s | conn/s | ratio to {counts[0]} node(s) "
          f"(up / down / conn) | node cores busy, up | CPU s per 1k conns, per node | "
          f"connections per node |")
    print("|---|---|---|---|---|---|---|---|")
    for n in counts:
        r, last = rows[n], samples[n][-1]
        print(f"| {n} | {r['gbps_up']:.2f} | {r['gbps_down']:.2f} | {r['conn_rate']:.0f} | "
              f"{r['gbps_up'] / base['gbps_up']:.2f} / {r['gbps_down'] / base['gbps_down']:.2f}"
              f" / {r['conn_rate'] / base['conn_rate']:.2f} | {last['cores_up']} | "
              f"{last['cpu_per_1k_conns']} | {last['conns_by_node']} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "medians": rows, "samples": samples}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
