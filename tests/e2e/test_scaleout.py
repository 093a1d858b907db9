"""Three ipferry nodes behind a router's resilient ECMP group on one anycast GUE address
(tests/e2e/fleet.py): `ipferry connect --gue` spreads its flows over source ports by their
hash, the router spreads the ports over the nodes, and each flow stays on one node. Removing a
node moves only its flows (reset by the node they land on, counted not_this_node); adding it
back moves at most its share. Real daemons without capabilities, real kernel ECMP and TCP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.dataplane import STREAM_PORT
from tests.e2e.fleet import BUCKETS, SERVER, Fleet, wait_file

HERE = Path(__file__).resolve().parent
FLOWS = 300


def by_node(fleet: Fleet) -> dict[int, int]:
    """Each flow's node, by the client's local port, from the nodes' flow_start records."""
    owner: dict[int, int] = {}
    for i, starts in fleet.flow_starts(STREAM_PORT).items():
        for r in starts:
            assert r["sport"] not in owner, f"flow {r['sport']} started on two nodes"
            owner[r["sport"]] = i
    return owner


def metric(fleet: Fleet, index: int, name: str, **labels) -> float:
    return sum(v for (m, lbls), v in fleet.daemons[index - 1].metrics().items()
               if m == name and all(dict(lbls).get(k) == want for k, want in labels.items()))


@pytest.mark.timeout(300)
def test_flows_spread_over_three_nodes_and_stay_on_theirs_as_nodes_leave_and_join(tmp_path):
    fleet = Fleet(3, tmp_path)
    server = client = None
    try:
        server = subprocess.Popen(fleet.in_netns(fleet.server, sys.executable,
                                                 str(HERE / "streams.py"), "serve", SERVER,
                                                 str(STREAM_PORT)),
                                  stdout=subprocess.PIPE, start_new_session=True)
        assert server.stdout.readline().strip() == b"ready"
        fleet.start()
        out = tmp_path / "client"
        out.mkdir()
        out.chmod(0o777)
        # 1024 source ports: about one per flow, so that the share a node gains is measured
        # over flows, not over a few ports.
        client = subprocess.Popen(fleet.connect("python3", str(HERE / "fleetclient.py"), SERVER,
                                                str(STREAM_PORT), str(FLOWS), str(out), "3",
                                                ports=1024),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  start_new_session=True)

        # All flows up and intact, each on exactly one node, every node with some.
        first = wait_file(out / "phase-1.json", 120, client)["flows"]
        assert len(first) == FLOWS and set(first.values()) == {"ok"}, first
        owner = by_node(fleet)
        assert set(owner) == {int(p) for p in first}, "a flow no node started, or a stray one"
        counts = {i: sum(1 for n in owner.values() if n == i) for i in (1, 2, 3)}
        assert all(c > 0 for c in counts.values()), counts

        # Each node names itself in its metrics, audit records and logs.
        for i in (1, 2, 3):
            series = fleet.daemons[i - 1].metrics()
            assert series and all(dict(lbls).get("node") == f"node-{i}" for _, lbls in series)
            assert {r.get("node") for r in fleet.audit(i)} == {f"node-{i}"}
            lines = fleet.daemons[i - 1].log_events()
            assert lines and all(e.get("node") == f"node-{i}" for e in lines), lines[:3]
            assert fleet.daemons[i - 1].status()["node"] == f"node-{i}"

        # Node 3 leaves: only its buckets move; its flows are reset where they land.
        before = fleet.buckets()
        fleet.set_group([1, 2])
        after = fleet.buckets()
        assert all(a == b for a, b in zip(before, after, strict=True) if a != 3), \
            "a bucket of node 1 or 2 moved"
        assert 3 not in after
        (out / "go-1").touch()
        second = wait_file(out / "phase-2.json", 120, client)["flows"]
        stayed = {p: s for p, s in second.items() if owner[int(p)] != 3}
        moved = {p: s for p, s in second.items() if owner[int(p)] == 3}
        assert len(moved) == counts[3] and set(stayed.values()) == {"ok"}, second
        assert set(moved.values()) == {"reset"}, moved
        resets = metric(fleet, 1, "ipferry_drops_total", reason="not_this_node") + \
            metric(fleet, 2, "ipferry_drops_total", reason="not_this_node")
        assert resets >= counts[3], resets

        # Node 3 joins again: it takes its share of buckets from 1 and 2, no more.
        fleet.set_group([1, 2, 3])
        rejoined = fleet.buckets()
        changed = [b for a, b in zip(after, rejoined, strict=True) if a != b]
        assert len(changed) == BUCKETS // 3 and set(changed) == {3}, changed
        (out / "go-2").touch()
        third = wait_file(out / "phase-3.json", 120, client)["flows"]
        survivors = list(stayed)
        lost = [p for p in survivors if third[p] != "ok"]
        assert {third[p] for p in lost} <= {"reset"}, {p: third[p] for p in lost}
        # Only flows on the buckets node 3 took can move: at most its share (a third of the
        # buckets; 1024 ports, so about one flow a port). The kernel gives it back the buckets
        # it had when they are idle, and those held only its reset flows: then none moves.
        assert len(lost) <= len(survivors) // 2, (len(lost), len(survivors))
        if rejoined == before:
            assert lost == [], lost
        assert metric(fleet, 3, "ipferry_drops_total", reason="not_this_node") >= len(lost)
        assert client.wait(60) == 0, client.stdout.read().decode(errors="replace")[-3000:]

        # New flows reach node 3 again (and all three nodes).
        started = {i: len(s) for i, s in fleet.flow_starts(STREAM_PORT).items()}
        res = subprocess.run(fleet.connect("python3", str(HERE / "streams.py"), "many", SERVER,
                                           str(STREAM_PORT), "90", "100000", ports=1024),
                             capture_output=True, timeout=120)
        assert res.returncode == 0, res.stderr.decode()[-2000:]
        assert json.loads(res.stdout)["ok"] == 90
        new = {i: len(s) - started[i] for i, s in fleet.flow_starts(STREAM_PORT).items()}
        assert sum(new.values()) == 90 and all(n > 0 for n in new.values()), new
        report = {"flows": FLOWS, "by_node": counts, "moved_on_leave": len(moved),
                  "moved_on_join": len(lost), "survivors": len(survivors),
                  "buckets_back_as_before": rejoined == before, "new_flows_by_node": new}
        (tmp_path / "report.json").write_text(json.dumps(report))
        print(report)
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        fleet.close()
