"""Where a request/response round trip's microseconds go, hop by hop.

A 64 B request and its 64 B answer through ``ipferry connect`` (``--workers 1``) cross, on their
critical path: the client's stack, the worker's Python for the request packet (tunnel -> TUN), the
namespace's stack, the relay (upgraded socket -> off-ramp socket), the server's stack and back
the same way. One run measures, on this machine and in turns:

- the round trip through a veth pair (the kernel's own path: two stacks, the limit);
- the round trip through ipferry (bench/rr.py's latency, p50);
- in one process, the worker's Python per packet each way (bench/hotpath.py's figures) and per
  relayed message (the relay between two loopback connections, less the same ping-pong without
  it);

and prints the round trip as hops: the kernel's path, our Python per hop, and the rest (the
namespace's extra stack, the TUN's and the sockets' system calls, the wake-ups). Runs against
whichever ipferry the interpreter imports, so the same script measures another checkout:

    .venv/bin/python bench/hops.py [--round-trips 5000] [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import hotpath  # noqa: E402
from testbed import (  # noqa: E402
    PYTHON,
    RR,
    RR_PORT,
    IpferryConnect,
    IpferryDaemon,
    Reaper,
    ServerNamespace,
    Veth,
)

from ipferry.worker.relay import relay  # noqa: E402


def rtt_p50(client, round_trips: int) -> float:
    out = subprocess.run(client.cmd(PYTHON, RR, "latency", "--host", client.server, "--port",
                                    str(RR_PORT), "--round-trips", str(round_trips)),
                         capture_output=True, text=True, timeout=120, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return float(result["p50_us"])


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
    return a, b


async def _pingpong(client: socket.socket, server: socket.socket, n: int) -> float:
    loop = asyncio.get_running_loop()
    message = bytes(64)

    async def echo() -> None:
        for _ in range(n):
            data = await loop.sock_recv(server, 64)
            await loop.sock_sendall(server, data)

    echoing = asyncio.ensure_future(echo())
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await loop.sock_sendall(client, message)
        got = 0
        while got < 64:
            got += len(await loop.sock_recv(client, 64))
        samples.append(time.perf_counter() - t0)
    await echoing
    return statistics.median(samples) * 1e6


async def relay_cost(n: int) -> float:
    """µs one 64 B message spends in a relay hop: a ping-pong through the relay (two more
    sockets, our Python each way) less the same ping-pong straight, halved."""
    direct_a, direct_b = _pair()
    straight = await _pingpong(direct_a, direct_b, n)
    client, client_side = _pair()
    server_side, server = _pair()
    task = asyncio.ensure_future(relay(client_side, server_side))
    relayed = await _pingpong(client, server, n)
    for s in (client, server):
        s.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(task, 10)
    for s in (direct_a, direct_b, client, client_side, server_side, server):
        s.close()
    return (relayed - straight) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--round-trips", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3, help="turns of veth and ipferry")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    reaper = Reaper()
    try:
        tmp = reaper.tmpdir()
        server = ServerNamespace(reaper, tmp)
        veth = Veth(server, reaper)
        veth.start()
        daemon = IpferryDaemon(server, reaper, 1, None)
        ipferry = IpferryConnect(daemon, reaper, tmp)
        ipferry.start()
        via_veth, via_ipferry = veth.open(65520), ipferry.open(65520)
        time.sleep(1)
        kernel, total = [], []
        for _ in range(args.rounds):
            kernel.append(rtt_p50(via_veth, args.round_trips))
            total.append(rtt_p50(via_ipferry, args.round_trips))
        via_ipferry.close()
    finally:
        reaper.close()
    hot = asyncio.run(hotpath.measure(20_000, 3, 64))
    relay_us = statistics.median(asyncio.run(relay_cost(2000)) for _ in range(3))
    k, t = statistics.median(kernel), statistics.median(total)
    up, down = hot["us_per_packet_to_tun"], hot["us_per_packet_to_tunnel"]
    rest = t - k - up - down - 2 * relay_us
    rows = [("the kernel's path (veth: client and server stacks)", k),
            ("request packet, tunnel -> TUN (worker's Python)", up),
            ("request through the relay (upgraded socket -> off-ramp)", relay_us),
            ("answer through the relay (off-ramp -> upgraded socket)", relay_us),
            ("answer packet, TUN -> tunnel (worker's Python)", down),
            ("the rest: the namespace's stack, TUN and socket system calls, wake-ups", rest)]
    print("| hop | µs | share |\n|---|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} | {100 * us / t:.0f}% |")
    print(f"| **round trip through ipferry (p50)** | **{t:.1f}** | 100% |")
    if args.json:
        args.json.write_text(json.dumps({"rtt_veth_us": k, "rtt_ipferry_us": t,
                                         "python_to_tun_us": up, "python_to_tunnel_us": down,
                                         "relay_us": relay_us, "rest_us": rest,
                                         "samples": {"veth": kernel, "ipferry": total}}))


if __name__ == "__main__":
    main()
