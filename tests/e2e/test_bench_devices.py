"""bench/run's device-to-device transports keep working, CI size: one run of 1 s iperf3 cells and
1000 round trips at MTU 1500 (TCP both ways, round trips, UDP datagrams), device to device through
a daemon as IP packets and as streams, and the veth pair between two namespaces (kernel WireGuard
too where the kernel has it, else a note).

It runs as a process of its own (as by hand) and builds its own namespaces; if it overruns, it is
stopped (SIGTERM: its own cleanup), then killed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import namespaces, run_script

RUN = str(Path(__file__).resolve().parents[2] / "bench" / "run.py")
PEERS = ["devices-ip-w1", "devices-stream-w1", "devices-veth"]
METRICS = ["tcp_up_1", "tcp_up_4", "tcp_down_1", "tcp_down_4", "lat_p50", "lat_p99", "setup_p50",
           "udp_kpps"]


@pytest.mark.timeout(150)
def test_device_to_device_benchmark_gives_figures_and_ratios(tmp_path):
    before = namespaces("ipfbench-")
    run_script([sys.executable, RUN, "--quick", "--no-chart", "--mtu", "1500",
                "--only", ",".join([*PEERS, "devices-wireguard"]),
                "--only", "tcp,latency,udp", "--out", str(tmp_path)], 120, "bench/run")
    result = json.loads((tmp_path / "latest.json").read_text())

    ids = [t["id"] for t in result["transports"]]
    wireguard = "devices-wireguard" in ids
    assert ids == PEERS + (["devices-wireguard"] if wireguard else []), (ids, result["notes"])
    if not wireguard:  # unavailable is a note with its reason, never a failure
        assert any(n.startswith("WireGuard (kernel) not measured: ") for n in result["notes"]), \
            result["notes"]
    # Every peer, every metric: one sample (1 run), a figure, no error.
    for metric in METRICS:
        by_peer = result["samples"].get(metric, {}).get("1500", {})
        assert sorted(by_peer) == sorted(ids), (metric, by_peer, result["errors"])
        for peer in ids:
            assert len(by_peer[peer]) == 1 and by_peer[peer][0] > 0, (metric, peer, by_peer)
    assert not result["errors"], result["errors"]
    # Ratios to the veth pair between the devices, in the same run.
    rows = {r["metric"]: r for r in result["rows"] if r["mtu"] == 1500}
    for metric in METRICS:
        for peer in ids:
            if peer != "devices-veth" and metric != "udp_loss":
                assert rows[metric]["cells"][peer]["ratio_to"]["devices-veth"] > 0, (metric, peer)
    # Each layer was that layer: packets routed between the devices, or flows downgraded.
    ip, stream = result["counters"]["devices-ip-w1"], result["counters"]["devices-stream-w1"]
    assert ip["routed_to_device"] > 1000 and ip["routed_to_client"] > 1000, ip
    assert ip["flows_downgraded"] == 0, ip
    assert stream["flows_downgraded"] >= 8, stream  # 4 iperf3 runs: control and data each
    # (its UDP goes as packets: the stream rule is for TCP)
    md = (tmp_path / "latest.md").read_text()
    assert "| workload | MTU | ipferry IP packets w=1 | ipferry streams w=1 | veth (limit) |" in md
    assert "· " in md and "×" in md
    assert namespaces("ipfbench-") == before, "namespaces left behind"
