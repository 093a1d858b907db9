"""The data path's cost per packet, in one process: no kernel, no sockets, only our Python.

One upgraded TCP flow is set up (its off-ramp "connects" at once), then data segments go
through ``DataPath.on_tunnel_packet`` (client -> TUN) and the kernel's replies through
``DataPath.on_tun_packet`` (TUN -> tunnel), with a TUN and a tunnel whose writes go nowhere.
Prints microseconds per packet each way (the best of ``--repeat`` rounds, for noise).

Runs against whichever ipferry the interpreter imports, so one script compares two checkouts:

    .venv/bin/python bench/hotpath.py                      # this checkout
    ../before/.venv/bin/python bench/hotpath.py            # another one (its own venv)

Works with the data path before and after the flow engine (ipferry.engine) came in.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import time

import dpkt
import structlog

from ipferry.worker.app import RulesApplication, TunnelContext
from ipferry.worker.audit import AuditLog
from ipferry.worker.datapath import DataPath

try:
    from ipferry.engine.actions import ConnectOfframp
    from ipferry.engine.flows import FlowTable
    from ipferry.wire.nat import NatPool
except ImportError:  # before the engine and the wire package
    ConnectOfframp = None  # type: ignore[assignment,misc]
    from ipferry.worker.flows import FlowTable  # type: ignore[no-redef]
    from ipferry.worker.nat import NatPool  # type: ignore[no-redef]

CLIENT, SERVER = "10.98.1.1", "198.51.100.7"
LOCAL4 = "100.64.0.1"


class NullTunnel:
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
    closed = False

    def __init__(self) -> None:
        self.context = TunnelContext("bench")
        self.tenant = "bench"
        self.sent = 0

    def send(self, packet: bytes | bytearray) -> None:
        self.sent += 1


class NullTun:
    vnet = False

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.on_packet = None

    def write(self, packet: bytes | bytearray, header: bytes = b"") -> None:
        if len(self.written) < 4:
            self.written.append(bytes(packet))


def segment(src: str, dst: str, sport: int, dport: int, flags: int, seq: int,
            payload: bytes = b"") -> bytes:
    return bytes(dpkt.ip.IP(src=ipaddress.ip_address(src).packed,
                            dst=ipaddress.ip_address(dst).packed, p=6, ttl=64,
                            data=dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags, seq=seq,
                                              ack=1, data=payload)))


async def measure(n: int, repeat: int, size: int) -> dict:
    pools = {4: NatPool(ipaddress.IPv4Network("100.64.0.0/16"),
                        {ipaddress.IPv4Address(LOCAL4)}, max_addresses=16),
             6: NatPool(ipaddress.IPv6Network("fd69:7066::/64"), set(), max_addresses=16)}
    audit = AuditLog(os.devnull, 0)
    dp = DataPath(index=0, app=RulesApplication(), audit=audit, log=structlog.get_logger(),
                  flows=FlowTable(max_flows=10**7, max_flows_per_tenant=10**7), pools=pools,
                  local={4: ipaddress.IPv4Address(LOCAL4).packed, 6: bytes(16)},
                  connect_timeout=30)
    tun, tunnel = NullTun(), NullTunnel()
    dp.tun = tun
    if hasattr(dp, "engine"):  # the engine's driver: the off-ramp connects at once
        dp.engine.tun_vnet = False
        dp._carry[ConnectOfframp] = lambda a: dp.carry(
            dp.engine.offramp_connected(a.flow, time.monotonic()))
    else:  # the DataPath before it: the same, by its own methods
        def connected(entry, p, packet):
            entry.offramp = object()
            asyncio.get_running_loop().call_soon(dp._release, entry)
        dp._connect_offramp = connected
    dp.on_tunnel_packet(tunnel, segment(CLIENT, SERVER, 40000, 80, dpkt.tcp.TH_SYN, 1000))
    await asyncio.sleep(0)
    [flow] = dp.entries.values()
    slot = flow.slot
    assert tun.written, "the SYN did not reach the TUN"
    payload = bytes(size)
    up = [segment(CLIENT, SERVER, 40000, 80, dpkt.tcp.TH_ACK, 1001 + i * size, payload)
          for i in range(n)]
    slot_addr = str(ipaddress.ip_address(slot.address))
    down = [segment(LOCAL4, slot_addr, 1, slot.port, dpkt.tcp.TH_ACK, 5000 + i * size, payload)
            for i in range(n)]
    best_up = best_down = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for packet in up:
            dp.on_tunnel_packet(tunnel, packet)
        t1 = time.perf_counter()
        for packet in down:
            dp.on_tun_packet(packet)
        t2 = time.perf_counter()
        best_up, best_down = min(best_up, t1 - t0), min(best_down, t2 - t1)
    assert tunnel.sent >= n * repeat, (tunnel.sent, n)
    # New flows: a SYN each, decided by the rules, audited (to /dev/null), a NAT slot claimed,
    # its off-ramp connect started (and left pending: no socket) -- the set-up's Python.
    flows = min(n, 20_000)
    if hasattr(dp, "engine"):
        dp._carry[ConnectOfframp] = lambda a: None
    else:
        dp._connect_offramp = lambda entry, p, packet: None
    best_start = float("inf")
    for r in range(repeat):
        syns = [segment(CLIENT, SERVER, 1024 + i, 81 + r, dpkt.tcp.TH_SYN, 1) for i in range(flows)]
        t0 = time.perf_counter()
        for packet in syns:
            dp.on_tunnel_packet(tunnel, packet)
        best_start = min(best_start, time.perf_counter() - t0)
        assert len(dp.entries) >= flows * (r + 1), len(dp.entries)
    audit.close()
    return {"packets": n, "payload": size, "us_per_packet_to_tun": round(best_up / n * 1e6, 3),
            "us_per_packet_to_tunnel": round(best_down / n * 1e6, 3),
            "us_per_flow_start": round(best_start / flows * 1e6, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packets", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--payload", type=int, default=100)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.packets, args.repeat, args.payload))))


if __name__ == "__main__":
    main()
