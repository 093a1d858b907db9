"""bench/httpbench.py keeps working, CI size: one 1-second cell per path and mode for the 1 KiB
file (direct, splice, the HTTP layer, the HTTP on-ramp, squid, an nginx reverse proxy), in the
namespace it makes itself.

It runs as a process of its own (as by hand); if it overruns, it is stopped (SIGTERM: its own
cleanup), then killed.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import run_script

BENCH = str(Path(__file__).resolve().parents[2] / "bench" / "httpbench.py")
ROWS = {"direct", "splice", "http-layer", "http-onramp", "squid", "nginx-rp"}


@pytest.mark.timeout(180)
def test_http_benchmark_answers_on_every_path(tmp_path):
    missing = [t for t in ("wrk", "squid", "nginx") if shutil.which(t) is None]
    assert not missing, f"bench/httpbench.py needs {missing}: run deploy/setup.sh"
    text = run_script([sys.executable, BENCH, "--quick", "--files", "1k", "--warmup", "0",
                       "--out", str(tmp_path)], 150, "bench/httpbench.py", grace=15)
    result = json.loads((tmp_path / "http.json").read_text())
    rows = {r["id"]: r for r in result["rows"]}
    assert set(rows) >= ROWS, (set(rows), text[-3000:])
    for name in ROWS:
        row = rows[name]
        assert "failed" not in row, (name, row)
        for mode in ("keepalive", "close"):
            cell = row["cells"][f"1k/{mode}"]
            assert "failed" not in cell and cell["rps"] > 0, (name, mode, cell)
