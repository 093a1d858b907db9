"""The standing fuzzer, CI size: 10,000 seeded inputs over tunnel packets (plain and vnet),
contexts, GUE datagrams and admin requests while transfers run; everything served or counted.

The fuzzer and its accounting live in tests/e2e/fuzzing.py; bench/fuzz.py runs a million.
``IPFERRY_FUZZ_SEED`` / ``IPFERRY_FUZZ_INPUTS`` replay another seed or size.
"""

from __future__ import annotations

import json
import os
import subprocess

from tests.e2e import fuzzing
from tests.e2e.dataplane import SERVER_ADDR, STREAMS

SEED = int(os.environ.get("IPFERRY_FUZZ_SEED", "20260509"))
INPUTS = int(os.environ.get("IPFERRY_FUZZ_INPUTS", "10000"))


def test_fuzzed_inputs_are_served_or_counted_and_nothing_restarts(daemon_factory, netns, streams,
                                                                  udp_servers, servers, tmp_path):
    subprocess.run(["ip", "netns", "exec", netns.name, "sysctl", "-qw",
                    "net.ipv4.ping_group_range=0 2147483647"], check=True)  # echo flows too
    servers(STREAMS, "serve", SERVER_ADDR, str(fuzzing.SINK_PORT))
    d = daemon_factory("--workers", "2", config=fuzzing.config(tmp_path))
    transfers = fuzzing.Transfers(d, size=8 << 20).start()
    try:
        report = fuzzing.Fuzzer(d, SEED, audit=tmp_path / "audit.jsonl",
                                transfers=transfers).run(INPUTS)
    finally:
        transfers.stop()
    summary = json.dumps(report.as_dict(), indent=1, default=str)
    (tmp_path / "fuzz-report.json").write_text(summary)
    assert report.total == INPUTS
    # Counts first: what was built malformed was dropped under its reason, and more.
    assert sum(report.known.values()) > INPUTS // 10, summary
    for reason, n in report.known.items():
        assert report.drops.get(reason, 0) >= n, (reason, summary)
    assert report.accounting["unaccounted"] <= report.accounting["valid_rst_allowance"], summary
    assert report.accounting["accounted"] >= report.accounting["reached_daemon"] \
        - report.accounting["valid_rst_allowance"], summary
    assert report.closed.get("bad_context", 0) > 0 and report.admin.get(200, 0) > 0, summary
    assert not report.problems, summary
    assert report.restarts == {"nsd": 0, "workers": {0: 0, 1: 0}}, summary
    assert not transfers.errors, transfers.errors
    assert len(transfers.results) >= 2 and all(r["ok"] for r in transfers.results), \
        transfers.results
