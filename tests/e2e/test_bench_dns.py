"""bench/dns.py keeps working, CI size: 200 queries directly to a dnsmasq on 127.0.0.53 and 200
through the daemon's forwarder (from inside ``ipferry connect``), in the namespace it makes itself.

It runs as a process of its own (as by hand); if it overruns, it is stopped (SIGTERM: its own
cleanup), then killed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import run_script

BENCH = str(Path(__file__).resolve().parents[2] / "bench" / "dns.py")


@pytest.mark.timeout(60)
def test_dns_benchmark_answers_every_query_on_both_paths(tmp_path):
    run_script([sys.executable, BENCH, "--queries", "200", "--concurrency", "16",
                       "--warmup", "20", "--out", str(tmp_path)], 30, "bench/dns.py", grace=15)
    result = json.loads((tmp_path / "dns.json").read_text())
    assert (tmp_path / "dns.md").read_text().startswith("DNS: 200 A queries")

    # Counts first: every query answered on both paths, none lost, none wrong.
    for path in ("direct", "through"):
        got = result[path]
        assert (got["sent"], got["answered"], got["timeouts"], got["errors"]) == (200, 200, 0, 0), \
            (path, got)
    # The daemon answered the through path's queries (and the warm-up's) itself.
    assert result["daemon_dns_queries"].get("noerror", 0) >= 200, result["daemon_dns_queries"]
    # Then the figures.
    for path in ("direct", "through"):
        got = result[path]
        assert got["qps"] > 0 and 0 < got["p50_ms"] <= got["p99_ms"], (path, got)
    assert all(v is not None and v > 0 for v in result["ratios"].values()), result["ratios"]
    # Nothing left behind.
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=True).stdout
    assert result["namespace"].startswith("ipfbench-dns-")
    assert result["namespace"] not in namespaces, namespaces
