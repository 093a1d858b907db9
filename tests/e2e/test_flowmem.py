"""bench/flowmem.py keeps working: 2,000 TCP flows on one worker, and a generous bound on the
memory each costs (the script's own namespace, daemon and clean-up, as a benchmark run has them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FLOWMEM = Path(__file__).resolve().parents[2] / "bench" / "flowmem.py"
FLOWS = 2000
MAX_BYTES_PER_FLOW = 4096


@pytest.mark.timeout(90)
def test_flowmem_2000_flows(tmp_path):
    out = tmp_path / "flowmem.json"
    res = subprocess.run([sys.executable, str(FLOWMEM), "--flows", str(FLOWS), "--warmup", "100",
                          "--idle", "1", "--after", "1", "--nofile", "20000",
                          "--out", str(out)], capture_output=True, text=True, timeout=80)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())["results"][0]
    assert r["flows_active"] == FLOWS and not r["stalled"], r
    assert r["worker_restarts"] == 0 and not r["log_events"], r
    # Every flow holds its off-ramp's connect to the silent address (connect before accept).
    assert r["states"]["daemon_namespace"].get("syn_sent", 0) >= FLOWS, r["states"]
    assert 0 < r["bytes_per_flow"] <= MAX_BYTES_PER_FLOW, r
    assert r["fds_after"] <= r["fds_before"] + 5, r  # every socket went with its flow
    assert "| bytes/flow |" in res.stdout
