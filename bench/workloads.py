"""The workloads, each run from inside a client namespace against the server namespace.

A measurement returns ``{metric id: value}``; one iperf3 run gives both a throughput and the
proxy's CPU seconds per GB, one UDP run both a datagram rate and a loss.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

from testbed import IPERF_PORT, PYTHON, RR, RR_PORT, Client, cpu_seconds


@dataclass(frozen=True)
class Metric:
    id: str
    label: str
    unit: str
    higher_is_better: bool
    table: str = "main"  # "main" or "cpu"
    fmt: str = "{:.2f}"
    ratios: bool = True  # a ratio of two losses (near 0) says nothing

    def format(self, value: float) -> str:
        if self.unit == "Gbit/s" and value < 1:
            return f"{value:.3f}"
        return self.fmt.format(value)


@dataclass(frozen=True)
class Options:
    duration: float
    conns: int
    concurrency: int
    round_trips: int
    size: int = 64
    udp_size: int = 64


BULK = [("up", 1), ("up", 4), ("down", 1), ("down", 4)]


def bulk_id(direction: str, streams: int) -> str:
    return f"tcp_{direction}_{streams}"


def _bulk_label(direction: str, streams: int) -> str:
    return f"TCP {direction}load, {streams} stream{'s' if streams > 1 else ''}"


METRICS: list[Metric] = [
    *(Metric(bulk_id(d, s), _bulk_label(d, s), "Gbit/s", True) for d, s in BULK),
    Metric("conn_rate", "TCP connection rate, 64 B request + response each", "conn/s", True,
           fmt="{:.0f}"),
    Metric("lat_p50", "TCP request/response latency p50, 64 B", "µs", False,
           fmt="{:.0f}"),
    Metric("lat_p99", "TCP request/response latency p99, 64 B", "µs", False,
           fmt="{:.0f}"),
    Metric("setup_p50", "TCP connection set-up (connect()) p50, one at a time", "µs", False,
           fmt="{:.0f}"),
    Metric("udp_kpps", "UDP 64 B datagrams received, upload", "kpps", True,
           fmt="{:.1f}"),
    Metric("udp_loss", "UDP loss, same runs", "%", False, fmt="{:.1f}", ratios=False),
    *(Metric(f"cpu_{bulk_id(d, s)}", f"proxy CPU per GB moved, {_bulk_label(d, s)}", "CPU s/GB", False,
             table="cpu") for d, s in BULK),
    Metric("cpu_conn", "proxy CPU per 1000 connections", "CPU s/1k conns", False, table="cpu"),
]
METRIC = {m.id: m for m in METRICS}

# Workload groups, for --only: the metrics each produces.
GROUPS = {
    "tcp": [bulk_id(d, s) for d, s in BULK] + [f"cpu_{bulk_id(d, s)}" for d, s in BULK],
    "connrate": ["conn_rate", "cpu_conn"],
    "latency": ["lat_p50", "lat_p99", "setup_p50"],
    "udp": ["udp_kpps", "udp_loss"],
}


class WorkloadError(RuntimeError):
    pass


def _run_json(cmd: list[str], timeout: float) -> dict:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise WorkloadError(f"timed out after {timeout:.0f}s") from None
    try:
        out = json.loads(res.stdout) if res.stdout.strip().startswith("{") else {}
    except ValueError:
        out = {}
    if res.returncode != 0 or not out or out.get("error"):
        why = out.get("error") or res.stderr.strip()[-300:] or f"status {res.returncode}"
        raise WorkloadError(why)
    return out


def iperf3(client: Client, opts: Options, *extra: str) -> dict:
    cmd = client.cmd("iperf3", "-c", client.server, "-p", str(IPERF_PORT), "-t", f"{opts.duration:g}",
                     "-J", "--connect-timeout", "5000", *extra)
    out = _run_json(cmd, opts.duration + 40)
    if "end" not in out:
        raise WorkloadError("iperf3 gave no result")
    return out


def bulk(client: Client, opts: Options, direction: str, streams: int) -> dict[str, float]:
    flags = (["-R"] if direction == "down" else []) + (["-P", str(streams)] if streams > 1 else [])
    before = cpu_seconds(client.proxy_pids())
    out = iperf3(client, opts, *flags)
    cpu = cpu_seconds(client.proxy_pids()) - before
    received = out["end"]["sum_received"]
    key = bulk_id(direction, streams)
    result = {key: received["bits_per_second"] / 1e9}
    if client.proxy_pids() and received["bytes"]:
        result[f"cpu_{key}"] = cpu / (received["bytes"] / 1e9)
    return result


def connrate(client: Client, opts: Options) -> dict[str, float]:
    before = cpu_seconds(client.proxy_pids())
    out = _run_json(client.cmd(PYTHON, RR, "connrate", "--host", client.server, "--port",
                               str(RR_PORT), "--count", str(opts.conns), "--concurrency",
                               str(opts.concurrency), "--size", str(opts.size)),
                    timeout=max(120, opts.conns / 20))
    cpu = cpu_seconds(client.proxy_pids()) - before
    if out["errors"]:
        failed = opts.conns - out["ok"]
        raise WorkloadError(f"{failed} of {opts.conns} connections failed: {out['errors']}")
    result = {"conn_rate": out["rate"]}
    if client.proxy_pids():
        result["cpu_conn"] = cpu / (out["ok"] / 1000)
    return result


def latency(client: Client, opts: Options) -> dict[str, float]:
    out = _run_json(client.cmd(PYTHON, RR, "latency", "--host", client.server, "--port",
                               str(RR_PORT), "--round-trips", str(opts.round_trips),
                               "--size", str(opts.size)),
                    timeout=max(60, opts.round_trips / 50))
    return {"lat_p50": out["p50_us"], "lat_p99": out["p99_us"], "setup_p50": out["setup_p50_us"]}


def udp(client: Client, opts: Options) -> dict[str, float]:
    out = iperf3(client, opts, "-u", "-b", "0", "-l", str(opts.udp_size))
    received = out["end"]["sum_received"]
    sent = out["end"]["sum_sent"]
    packets = sent["packets"] or 1
    got = received["bytes"] / opts.udp_size
    return {"udp_kpps": got / received["seconds"] / 1000 if received["seconds"] else 0.0,
            "udp_loss": max(0.0, 100.0 * (1 - got / packets))}


def ready(client: Client, timeout: float = 20) -> None:
    """One request/response through the transport before anything is measured."""
    _run_json(client.cmd(PYTHON, RR, "ping", "--host", client.server, "--port", str(RR_PORT),
                         "--timeout", str(timeout)), timeout + 10)


# (group, name, function): run in this order for every client namespace.
def plan(opts: Options, groups: set[str]):
    steps = []
    if "tcp" in groups:
        for d, s in BULK:
            steps.append(("tcp", bulk_id(d, s), lambda c, d=d, s=s: bulk(c, opts, d, s)))
    if "connrate" in groups:
        steps.append(("connrate", "connrate", lambda c: connrate(c, opts)))
    if "latency" in groups:
        steps.append(("latency", "latency", lambda c: latency(c, opts)))
    if "udp" in groups:
        steps.append(("udp", "udp", lambda c: udp(c, opts)))
    return steps
