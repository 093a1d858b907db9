"""The standing fuzzer at scale: a million seeded inputs (by default) against a daemon of its own.

    .venv/bin/python bench/fuzz.py [--inputs 1000000] [--seed S] [--workers 2] [--json out.json]

Builds a network namespace of its own (the daemon, the upstream servers, every packet stay in
it), starts ``ipferry run`` there without capabilities, keeps transfers through ``ipferry
connect`` running, and feeds the daemon tunnel packets (plain and vnet), tunnel contexts, GUE
datagrams and raw admin requests (tests/e2e/fuzzing.py), printing a progress line now and then.
At the end: the accounting (every input served or counted under a drop reason), the drops by
reason, restarts, the transfers, problems. Exit 0 when there is no problem, 1 otherwise, 2 on a
usage error. Everything it started is stopped and its namespace deleted on any exit.
Needs root (it makes a network namespace), like the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.e2e import fuzzing  # noqa: E402
from tests.e2e.dataplane import (  # noqa: E402
    DATAGRAMS,
    SERVER_ADDR,
    SERVER_ADDR6,
    STREAM_PORT,
    STREAMS,
    add_server_address,
)
from tests.helpers import Daemon, NetNs, require_kernel_features  # noqa: E402


class Bench:
    """The namespace, the servers and the daemon, and their teardown."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.tmp = Path(tempfile.mkdtemp(prefix="ipferry-fuzz-"))
        self.ns: NetNs | None = None
        self.servers: list[subprocess.Popen] = []
        self.daemon: Daemon | None = None

    def server(self, *argv: str) -> None:
        proc = subprocess.Popen(["nsenter", f"--net={self.ns.path}", sys.executable, *argv],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self.servers.append(proc)
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"test server {argv} did not start")

    def start(self, workers: int) -> Daemon:
        self.ns = NetNs(f"ipffuzz-{uuid.uuid4().hex[:8]}")
        add_server_address(self.ns)
        subprocess.run(["ip", "netns", "exec", self.ns.name, "sysctl", "-qw",
                        "net.ipv4.ping_group_range=0 2147483647"], check=True)
        for port in (STREAM_PORT, fuzzing.SINK_PORT):
            self.server(STREAMS, "serve", SERVER_ADDR, str(port))
        for addr in (SERVER_ADDR, SERVER_ADDR6):
            self.server(DATAGRAMS, "echo-server", addr, str(fuzzing.UDP_ECHO_PORT))
        run = self.tmp / "run"
        run.mkdir()
        os.chmod(run, 0o755)
        self.daemon = Daemon(self.ns, run, self.tmp, config=fuzzing.config(self.tmp),
                             no_caps=True, env=None)
        self.daemon.start("--workers", str(workers))
        self.daemon.wait_ready()
        return self.daemon

    def close(self) -> None:
        if self.daemon is not None and self.daemon.proc is not None:
            self.daemon.destroy()
        for proc in self.servers:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
        if self.ns is not None:
            self.ns.delete()
        if self.keep:
            print(f"kept {self.tmp} (daemon log, audit, report)", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def summary(report: fuzzing.Report) -> str:
    r = report.as_dict()
    a = r["accounting"]
    lines = [
        f"seed {r['seed']}: {r['total']} inputs in {r['seconds']} s "
        f"({r['inputs_per_second']}/s): " + ", ".join(f"{k} {v}" for k, v in r["inputs"].items()),
        f"accounting: {a.get('reached_daemon')} inputs reached the daemon "
        f"({a.get('tunnel_datagrams')} tunnel datagrams, {a.get('gue_sent')} GUE datagrams "
        f"- {a.get('gue_lost_in_kernel')} lost in the kernel, "
        f"{a.get('accepted_context_probes')} context probes); accounted for "
        f"{a.get('accounted')}: {a.get('input_drops')} drops, {a.get('fuzz_flow_packets')} packets "
        f"of {a.get('fuzz_flows_ended')} fuzz flows, {a.get('upstream_failures')} answered "
        f"off-ramp failures, - {a.get('multicast_noise')} noise; unaccounted "
        f"{a.get('unaccounted')} (blind-RST allowance {a.get('valid_rst_allowance')})",
        "drops by reason:",
    ]
    width = max((len(k) for k in r["drops"]), default=0)
    for reason, n in r["drops"].items():
        pred = r["predicted"].get(reason)
        known = r["known"].get(reason)
        extra = ""
        if pred is not None:
            extra += f"  predicted {int(pred)}"
        if known is not None:
            extra += f"  built on purpose {int(known)}"
        lines.append(f"  {reason:<{width}} {int(n):>9}{extra}")
    lines += [
        f"upstream failures: {r['upstream_failures']}",
        f"tunnels closed: {r['tunnels_closed']}",
        f"contexts (expected/outcome): {r['contexts']}",
        f"admin answers: {r['admin']}",
        f"answers on fuzz tunnels: {r['answers']}",
        f"transfers: {len(r['transfers'])}, intact {sum(t['ok'] for t in r['transfers'])}",
        f"restarts: {r['restarts']}",
    ]
    lines += [f"note: {n}" for n in r["notes"]]
    lines += [f"PROBLEM: {p}" for p in r["problems"]]
    lines.append("result: " + ("FAIL" if r["problems"] else "ok"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=None, help="default: from the clock (printed)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--round", type=int, default=1000, help="inputs per round of the mix")
    ap.add_argument("--progress-every", type=int, default=0,
                    help="inputs between progress lines (default: a 50th of the run)")
    ap.add_argument("--transfer-size", type=int, default=16 << 20)
    ap.add_argument("--json", type=Path, help="write the report there")
    ap.add_argument("--keep", action="store_true", help="keep the daemon's log and audit")
    args = ap.parse_args(argv)
    if args.inputs < 1 or args.workers < 1:
        ap.error("--inputs and --workers must be positive")
    problem = require_kernel_features()
    if problem:
        print(f"bench/fuzz.py: {problem}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else int(time.time())
    every = args.progress_every or max(1000, args.inputs // 50)
    print(f"bench/fuzz.py: seed {seed}, {args.inputs} inputs, {args.workers} workers", flush=True)

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    bench = Bench(args.keep)
    try:
        daemon = bench.start(args.workers)
        transfers = fuzzing.Transfers(daemon, size=args.transfer_size).start()
        try:
            fuzzer = fuzzing.Fuzzer(daemon, seed, audit=bench.tmp / "audit.jsonl",
                                    transfers=transfers, round_size=args.round,
                                    progress=lambda line: print(line, flush=True),
                                    progress_every=every)
            report = fuzzer.run(args.inputs)
        finally:
            transfers.stop()
        print(summary(report), flush=True)
        if args.json:
            args.json.write_text(json.dumps(report.as_dict(), indent=1, default=str))
        if args.keep:
            (bench.tmp / "report.json").write_text(json.dumps(report.as_dict(), indent=1,
                                                              default=str))
        return 1 if report.problems else 0
    except KeyboardInterrupt:
        print("bench/fuzz.py: interrupted", file=sys.stderr)
        return 1
    finally:
        bench.close()


if __name__ == "__main__":
    sys.exit(main())
