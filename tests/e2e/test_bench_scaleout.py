"""bench/scaleout.py keeps working, CI size: 1 and 2 nodes behind the ECMP router, 1 s iperf3
cells and 300 connections, figures for every cell, the 2-node run's connections on both nodes,
nothing left behind. It runs as a process of its own (as by hand); if it overruns, it is
stopped (SIGTERM: its own cleanup), then killed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import namespaces, run_script

SCRIPT = str(Path(__file__).resolve().parents[2] / "bench" / "scaleout.py")


@pytest.mark.timeout(200)
def test_scaleout_benchmark_gives_figures_per_node_count(tmp_path):
    before = namespaces("ipff-")
    out = tmp_path / "scaleout.json"
    text = run_script([sys.executable, SCRIPT, "--quick", "--nodes", "1,2", "--json", str(out)],
                      170, "bench/scaleout.py")
    result = json.loads(out.read_text())
    assert sorted(result["samples"]) == ["1", "2"]
    for nodes, samples in result["samples"].items():
        assert len(samples) == 1
        s = samples[0]
        assert s["gbps_up"] > 0 and s["gbps_down"] > 0 and s["conn_rate"] > 0, s
        assert len(s["cores_up"]) == len(s["cpu_per_1k_conns"]) == int(nodes), s
        assert sum(s["conns_by_node"]) >= 300, s  # (rr.py's ping, if any, on top)
    assert all(n > 0 for n in result["samples"]["2"][0]["conns_by_node"]), result["samples"]["2"]
    assert "| 2 | " in text and "ratio to 1 node(s)" in text
    assert namespaces("ipff-") == before, "namespaces left behind"
