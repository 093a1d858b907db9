"""RSS per flow *record* at 10,000 and 100,000 flows: the worker's data path, in this process.

``bench/flowmem.py`` measures the real daemon, but every TCP flow there holds its off-ramp's socket
(connect before accept), so 100,000 flows need 100,000 fds: more than a machine without
``CAP_SYS_RESOURCE`` and a hard limit of 20,000 can give. This script measures what does not need
an fd: the data path's own per-flow state (the flow record, its key, the flow table, the NAT
slot and its lookup, the admin API's index, the held SYN), by feeding SYNs to a real
:class:`~ipferry.worker.datapath.DataPath` whose off-ramp connect is replaced by one that opens
no socket. Add the per-socket cost that ``flowmem.py`` shows (~100 bytes: a socket object and
its entry in the connect watcher) for the whole.

    .venv/bin/python bench/flowrecords.py [--flows 10000 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dpkt  # noqa: E402
import structlog  # noqa: E402

from ipferry.engine.actions import ConnectOfframp  # noqa: E402
from ipferry.engine.flows import FlowTable  # noqa: E402
from ipferry.wire.nat import NatPool  # noqa: E402
from ipferry.worker.app import RulesApplication, TunnelContext  # noqa: E402
from ipferry.worker.audit import AuditLog  # noqa: E402
from ipferry.worker.datapath import DataPath  # noqa: E402


class QuietTunnel:
    """A connected tunnel as the data path sees one, whose sends go nowhere."""

    local = True
    steered = False
    anycast = False
    lands = False
    mtu = 65535
    vnet = False
    id = 1
    origin = 0
    device = (0, 1)
    onramp = "bench"

    def __init__(self) -> None:
        self.context = TunnelContext("bench")
        self.tenant = "bench"

    def send(self, packet) -> None:
        pass


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def syns(n: int) -> list[bytes]:
    dst = ipaddress.IPv4Address("198.19.0.9").packed
    return [bytes(dpkt.ip.IP(src=ipaddress.IPv4Address(0x0A000000 + i).packed, dst=dst, p=6,
                             ttl=64, data=dpkt.tcp.TCP(sport=1024 + i % 60000, dport=80,
                                                       flags=dpkt.tcp.TH_SYN, seq=i)))
            for i in range(n)]


async def measure(n: int) -> dict:
    packets = syns(n)  # made before the first reading: not part of what is measured
    flows = FlowTable(max_flows=n + 1, max_flows_per_tenant=n + 1)
    pools = {4: NatPool(ipaddress.IPv4Network("100.64.0.0/16"), {ipaddress.IPv4Address(
        "100.64.0.1")}), 6: NatPool(ipaddress.IPv6Network("fd69:7066::/64"), set())}
    audit = AuditLog(os.devnull, 0)
    dp = DataPath(index=0, app=RulesApplication(), audit=audit, log=structlog.get_logger(),
                  flows=flows, pools=pools, local={4: bytes(4), 6: bytes(16)},
                  connect_timeout=300)
    dp._carry[ConnectOfframp] = lambda action: None  # held, as while the connect runs
    tunnel = QuietTunnel()
    gc.collect()
    before = rss()
    for packet in packets:
        dp.on_tunnel_packet(tunnel, packet)
    gc.collect()
    loaded = rss()
    assert len(dp.entries) == n and len(dp.flow_index) == n, (len(dp.entries), n)
    dp.carry(dp.engine.end_all("evicted", 0.0))
    audit.close()
    return {"flows": n, "rss_before": before, "rss_loaded": loaded,
            "bytes_per_flow": round((loaded - before) / n, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    for n in args.flows:  # one process per size: the heap of one must not serve the next
        if os.fork() == 0:
            r = asyncio.run(measure(n))
            Path(f"/tmp/flowrecords-{os.getppid()}-{n}.json").write_text(json.dumps(r))
            os._exit(0)
        os.wait()
        path = Path(f"/tmp/flowrecords-{os.getpid()}-{n}.json")
        results.append(json.loads(path.read_text()))
        path.unlink()
    print("| flows | RSS before (MiB) | RSS loaded (MiB) | bytes/flow |")
    print("| --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['flows']:,} | {r['rss_before'] / 2**20:.1f} | {r['rss_loaded'] / 2**20:.1f} "
              f"| {r['bytes_per_flow']:,.0f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
