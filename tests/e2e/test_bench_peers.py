"""bench/run's main table keeps working with the relay floor beside ipferry, CI size: one run of
1 s cells at MTU 1500 (TCP both ways, connection rate, round trips, UDP) through ipferry
(``--workers 1``), HAProxy (the relay floor: kernel TCP on both sides, a relay in C) and the veth
pair. pasta and slirp4netns are the same harness's other peers, measured by the published run.

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
IDS = ["ipferry-w1", "haproxy", "veth"]
TCP = ["tcp_up_1", "tcp_down_1", "conn_rate", "lat_p50", "setup_p50"]


@pytest.mark.timeout(180)
def test_relay_floor_is_measured_beside_ipferry_and_veth(tmp_path):
    before = namespaces("ipfbench-")
    run_script([sys.executable, RUN, "--quick", "--no-chart", "--mtu", "1500",
                "--only", ",".join(IDS), "--only", "tcp,connrate,latency,udp",
                "--out", str(tmp_path)], 150, "bench/run")
    result = json.loads((tmp_path / "latest.json").read_text())

    assert [t["id"] for t in result["transports"]] == IDS, result["notes"]
    assert not result["errors"], result["errors"]
    for metric in TCP:  # every transport, one positive figure
        by = result["samples"].get(metric, {}).get("1500", {})
        assert sorted(by) == sorted(IDS), (metric, by)
        assert all(len(v) == 1 and v[0] > 0 for v in by.values()), (metric, by)
    # The relay carries no UDP: no cell (shown as "-"), not a failure; the others have theirs.
    udp = result["samples"]["udp_kpps"]["1500"]
    assert sorted(udp) == ["ipferry-w1", "veth"] and all(v[0] > 0 for v in udp.values()), udp
    # Its CPU is counted (HAProxy's own process): the per-connection cost row has it.
    cpu = result["samples"]["cpu_conn"]["1500"]
    assert cpu["haproxy"][0] > 0 and cpu["ipferry-w1"][0] > 0, cpu
    rows = {r["metric"]: r for r in result["rows"] if r["mtu"] == 1500}
    assert rows["conn_rate"]["cells"]["ipferry-w1"]["ratio_to"]["haproxy"] > 0
    md = (tmp_path / "latest.md").read_text()
    assert "| ipferry w=1 | haproxy (relay floor) | veth (limit) |" in md, md[:2000]
    assert namespaces("ipfbench-") == before, "namespaces left behind"
