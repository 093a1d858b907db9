"""The soak, CI size: bench/soak.py for 60 s (TCP and UDP churn through ipferry connect, raw
tunnels, admin scrapes and pages, a worker killed every 20 s), then its verdict: no RSS or fd
growth beyond its thresholds, no corrupted transfer, only the restarts it made.

It runs as a process of its own (as by hand) in a namespace of its own; if it overruns, it is
stopped (SIGTERM: its own cleanup), then killed, and its namespace taken down from here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from tests.helpers import run_script

SOAK = str(Path(__file__).resolve().parents[2] / "bench" / "soak.py")


def test_a_minute_of_churn_and_kills_leaves_no_growth_and_no_corruption(tmp_path):
    name = f"ipfsoak-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "soak.json"
    # A worker restarted 20 s before the end is judged on its first half-minute, while its heap
    # warms up under full load (about 10 MiB): a minute's bound is looser than a long run's 16.
    try:
        text = run_script([sys.executable, SOAK, "--duration", "60", "--kill-every", "20",
                           "--max-rss-growth", "24", "--netns", name, "--json", str(out)],
                          240, "the soak", grace=60)
    finally:
        leftover = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        for pid in leftover.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    result = json.loads(out.read_text())
    assert not result["problems"], text[-4000:]
    assert len(result["kills"]) == 2 and all(k["back_after"] for k in result["kills"]), text
    assert {k["how"] for k in result["kills"]} == {"api", "sigkill"}
    assert result["tcp"].get("ok", 0) > 100 and "corrupted" not in result["tcp"], result["tcp"]
    assert result["udp"].get("ok", 0) > 100 and "corrupted" not in result["udp"], result["udp"]
    assert result["tunnels"].get("opened", 0) > 100 and result["admin"].get("/api/flows pages")
    judged = {r["process"] for r in result["table"] if "rss_growth_mib" in r}
    assert {"supervisor", "nsd", "worker 0", "worker 1"} <= judged, result["table"]
    for row in result["table"]:
        if "rss_growth_mib" in row:
            assert row["rss_growth_mib"] <= 24, row
    for proc_name, idle in result["idle_fds"].items():
        assert idle["end"] is not None and idle["end"] - idle["start"] <= 2, (proc_name, idle)
    assert subprocess.run(["ip", "netns", "pids", name], capture_output=True).returncode != 0, \
        "the soak left its namespace behind"
