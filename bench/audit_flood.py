"""Audit bytes per refused SYN: a SYN flood past the per-tenant flow limit, through one tunnel.

Starts ``ipferry run --workers 1`` (no capabilities) in a network namespace made for the run, with
``flows.max_per_tenant`` small and the audit stream in a file, sends ``--syns`` SYNs from distinct
source ports over one connected tunnel, waits until every one was refused or allowed, stops the
daemon (which writes what it summed up) and reports the audit file's size per refused SYN.
``--ipferry`` runs another build (e.g. a worktree of an older commit) for a before/after.

    .venv/bin/python bench/audit_flood.py [--syns 100000] [--limit 100] [--ipferry PATH] [--json F]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from tests import helpers  # noqa: E402  (the same real-kernel harness as the tests)
from tests.e2e.dataplane import read_all, syn_flood  # noqa: E402
from tests.helpers import Daemon, NetNs  # noqa: E402

SERVER = "198.18.0.1"
PORT = 9000


def drops(d: Daemon) -> dict[str, float]:
    out: dict[str, float] = {}
    for (name, labels), v in d.metrics().items():
        if name == "ipferry_drops_total":
            out[dict(labels)["reason"]] = v
    return out


def measure(syns: int, limit: int) -> dict:
    ns = NetNs(f"ipfa-{uuid.uuid4().hex[:8]}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        run = tmp_path / "run"
        run.mkdir()
        sink = tmp_path / "audit.jsonl"
        config = f'[audit]\nsink = "{sink}"\n\n[flows]\nmax_per_tenant = {limit}\n'
        d = Daemon(ns, run, tmp_path, config=config, no_caps=True, env=None)
        listener = None
        try:
            # A listener, so that the flows within the limit stay (SYN_SENT: the flood never
            # completes a handshake) and everything past it is refused.
            helpers.subprocess.run(["ip", "-n", ns.name, "addr", "add", f"{SERVER}/32", "dev",
                                    "lo"], check=True)
            listener = ns.run(lambda: socket.create_server((SERVER, PORT), backlog=4096))
            d.start("--workers", "1")
            helpers.wait_for(d.ready, 30, "the daemon")
            t0 = time.monotonic()
            tunnel = syn_flood(run / "tunnel.sock", syns, tenant="bench", dport=PORT)

            def refused_all() -> bool:
                read_all(tunnel)  # the resets: keep the daemon's queue moving
                return drops(d).get("flow_limit_tenant", 0) >= syns - limit

            helpers.wait_for(refused_all, 300, "every SYN past the limit to be refused",
                             interval=0.5)
            tunnel.close()
            seconds = time.monotonic() - t0
            refused = drops(d)["flow_limit_tenant"]
            d.terminate()
            lines = sink.read_text().splitlines()
            kinds: dict[str, int] = {}
            for line in lines:
                kind = json.loads(line)["audit"]
                kinds[kind] = kinds.get(kind, 0) + 1
            size = sink.stat().st_size
            return {"syns": syns, "limit": limit, "refused": int(refused),
                    "audit_bytes": size, "audit_lines": len(lines), "records": kinds,
                    "bytes_per_refused_syn": round(size / max(refused, 1), 3),
                    "flood_seconds": round(seconds, 2)}
        finally:
            d.destroy()
            if listener is not None:
                listener.close()
            ns.delete()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--syns", type=int, default=100_000)
    parser.add_argument("--limit", type=int, default=100, help="flows.max_per_tenant")
    parser.add_argument("--ipferry", help="the ipferry command to run (default: this checkout's)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    if args.ipferry:
        helpers.IPFERRY = args.ipferry
    result = {"ipferry": helpers.IPFERRY, **measure(args.syns, args.limit)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
