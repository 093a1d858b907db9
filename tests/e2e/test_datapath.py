"""The data path, end to end: a command in `ipferry connect` reaches a server in the daemon's
namespace through a tunnel, the IP->TCP upgrade in nsd's kernel, and the TCP off-ramp."""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import textwrap

import pytest

from ipferry.wire.sharding import owner
from tests.e2e.dataplane import (
    SERVER_ADDR,
    STREAM_PORT,
    STREAMS,
    audit_records,
    config,
    connect,
    stream_client,
)
from tests.helpers import IPFERRY, NO_CAPS, wait_for


def test_http_get_through_connect(daemon_factory, upstream, tmp_path):
    (upstream / "index.html").write_text("hello through the ferry\n")
    d = daemon_factory("--workers", "1", config=config(tmp_path))
    res = connect(d, "curl", "-sS", "--max-time", "20", f"http://{SERVER_ADDR}:8080/index.html")
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == b"hello through the ferry\n"

    def flow_end():
        return [r for r in audit_records(tmp_path / "audit.jsonl") if r["audit"] == "flow_end"]
    end = wait_for(flow_end, 10, "the flow_end audit record")[0]
    start = next(r for r in audit_records(tmp_path / "audit.jsonl") if r["audit"] == "flow_start")
    assert start["tenant"] == "acme" and start["decision"] == "upgrade"
    assert (start["dst"], start["dport"]) == (SERVER_ADDR, 8080)
    assert end["close_reason"] == "fin", end
    assert end["payload_bytes"][1] > len(b"hello through the ferry\n")
    m = d.metrics()
    assert m[("ipferry_nat_slots_in_use", (("worker", "0"),))] == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_transfers_arrive_intact(daemon_factory, upstream, tmp_path, workers):
    blob = os.urandom(1 << 20) * 8  # 8 MiB
    (upstream / "blob").write_bytes(blob)
    d = daemon_factory("--workers", str(workers), config=config(tmp_path))
    res = connect(d, "sh", "-c", f"curl -sS --max-time 60 http://{SERVER_ADDR}:8080/blob | sha256sum")
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.split()[0].decode() == hashlib.sha256(blob).hexdigest()


def test_denied_destination_fails_fast_and_is_audited(daemon_factory, upstream, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path, textwrap.dedent(f"""\
        [[rules]]
        name = "no-8080"
        action = "deny"
        cidr = "{SERVER_ADDR}/32"
        ports = "8080"
        """)))
    res = connect(d, "curl", "-sS", "--max-time", "5", f"http://{SERVER_ADDR}:8080/")
    assert res.returncode == 7, res.stderr  # curl: couldn't connect (reset on SYN)
    start = wait_for(lambda: [r for r in audit_records(tmp_path / "audit.jsonl")
                              if r["audit"] == "flow_start"], 5, "audit")[0]
    assert start["decision"] == "drop" and start["reason"] == "denied by rule no-8080"


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("size", [1 << 20, 100 << 20])
def test_download_and_upload_intact_with_exact_audit_bytes(daemon_factory, streams, tmp_path,
                                                          workers, size):
    from tests.e2e.streams import pattern
    d = daemon_factory("--workers", str(workers), config=config(tmp_path))
    expected = hashlib.sha256()
    block = pattern(min(size, 1 << 22))
    left = size
    while left:
        expected.update(block[:min(len(block), left)])
        left -= min(len(block), left)
    down = stream_client(d, "get", size)
    assert down["bytes"] == size and down["sha256"] == expected.hexdigest()
    up = stream_client(d, "put", size)
    assert up["server_sha256"] == expected.hexdigest()

    ends = wait_for(lambda: (e := [r for r in audit_records(tmp_path / "audit.jsonl")
                                   if r["audit"] == "flow_end"]) and len(e) == 2 and e, 15,
                    "two flow_end records")
    by_port = sorted(ends, key=lambda r: r["ts"])
    # Payload bytes in each direction are exactly what the applications sent.
    assert by_port[0]["payload_bytes"] == [down["sent"], size]
    assert by_port[1]["payload_bytes"] == [len(f"PUT {size}\n") + size, 65]
    wait_for(lambda: all(v == 0 for (n, _), v in d.metrics().items()
                         if n == "ipferry_nat_slots_in_use"), 5, "NAT slots back to 0")


def test_half_close_keeps_the_other_direction_flowing(daemon_factory, streams, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path))
    r = stream_client(d, "echo", 3 << 20)
    assert r == {"intact": True, "bytes": 3 << 20}


def test_200_concurrent_flows_spread_over_two_workers(daemon_factory, streams, tmp_path):
    d = daemon_factory("--workers", "2", config=config(tmp_path))
    # The packet protocol: the tunnel's worker hands the other worker's flows over the mesh.
    r = stream_client(d, "many", 200, 10000, options=["--no-attach"])
    assert r["ok"] == 200, r
    ends = wait_for(lambda: (e := [x for x in audit_records(tmp_path / "audit.jsonl")
                                   if x["audit"] == "flow_end"]) and len(e) >= 200 and e, 20,
                    "200 flow_end records")
    owners: dict[tuple, set] = {}
    for e in ends:
        owners.setdefault((e["src"], e["sport"]), set()).add(e["worker"])
    assert len(owners) == 200
    assert all(len(w) == 1 for w in owners.values()), "each flow handled by exactly one worker"
    per_worker = {w: sum(1 for ws in owners.values() if w in ws) for w in (0, 1)}
    assert min(per_worker.values()) >= 50, per_worker
    m = d.metrics()
    crossed = sum(v for (n, labels), v in m.items()
                  if n == "ipferry_packets_total" and ("direction", "to_mesh") in labels)
    assert crossed > 0, "the tunnel's worker handed the other worker's flows over the mesh"


def test_kill_9_of_one_worker_spares_the_flows_of_the_other(daemon_factory, streams, tmp_path):
    d = daemon_factory("--workers", "2", config=config(tmp_path))
    client = subprocess.Popen(
        [*NO_CAPS, IPFERRY, "connect", "--tunnel", str(d.runtime_dir / "tunnel.sock"),
         "--source", "10.98.7.7", "--no-attach", "--", "python3", STREAMS, "many", SERVER_ADDR,
         str(STREAM_PORT), "16", str(40 << 20), "5"],  # the dead worker's flows stall: 5 s
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: d.get_json("/api/flows")["total"] >= 16, 30, "16 flows in flight")
        holder = d.get_json("/api/tunnels")[0]["worker"]  # the worker that holds the tunnel
        other = 1 - holder
        os.kill(d.workers()[other]["pid"], signal.SIGKILL)
        out, err = client.communicate(timeout=180)
    finally:
        client.kill()
    result = json.loads(out)
    src, dst = socket.inet_aton("10.98.7.7"), socket.inet_aton(SERVER_ADDR)
    mine = {int(p): ok for p, ok in result["ports"].items()
            if owner(6, src, int(p), dst, STREAM_PORT, 2) == holder}
    assert mine and all(mine.values()), (holder, result)  # the survivor's flows all completed


def test_rule_upstream_override_and_flow_limits(daemon_factory, streams, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path, textwrap.dedent(f"""\
        [flows]
        max_per_tenant = 3

        [[rules]]
        name = "to-streams"
        action = "allow"
        cidr = "198.18.0.0/15"
        ports = "80"
        upstream = "{SERVER_ADDR}:{STREAM_PORT}"
        """)))
    # Port 80 has no server: the rule's upstream takes the flow to the stream server.
    assert stream_client(d, "get", 1000, port=80)["bytes"] == 1000
    start = next(r for r in audit_records(tmp_path / "audit.jsonl") if r["audit"] == "flow_start")
    assert start["upstream"] == f"{SERVER_ADDR}:{STREAM_PORT}"
    assert start["reason"] == "allowed by rule to-streams"
    # Ten concurrent flows of one tenant, three allowed at a time: the rest are refused fast.
    r = stream_client(d, "many", 10, 20 << 20, 10)
    assert 3 <= r["ok"] < 10, r
    refused = sum(v for (n, labels), v in d.metrics().items() if n == "ipferry_drops_total"
                  and ("reason", "flow_limit_tenant") in labels)
    assert refused >= 1
    # Refusals past a limit are summed up (one record per tenant, reason and interval);
    # stopping the daemon writes what was counted.
    assert d.terminate() == 0
    records = audit_records(tmp_path / "audit.jsonl")
    assert not [r for r in records if r.get("reason") == "flow_limit_tenant"
                and r["audit"] != "flows_refused"]
    summed = [r for r in records if r["audit"] == "flows_refused"]
    assert len(summed) >= 1 and {r["tenant"] for r in summed} == {"acme"}
    assert sum(r["count"] for r in summed if r["reason"] == "flow_limit_tenant") == refused


def test_flows_api_filters_and_pages(daemon_factory, streams, tmp_path):
    d = daemon_factory("--workers", "2", config=config(tmp_path))
    clients = [subprocess.Popen(
        [*NO_CAPS, IPFERRY, "connect", "--tunnel", str(d.runtime_dir / "tunnel.sock"),
         "--tenant", tenant, "--", "python3", STREAMS, "many", SERVER_ADDR, str(STREAM_PORT),
         "5", str(200 << 20), "5"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for tenant in ("acme", "globex")]
    try:
        wait_for(lambda: d.get_json("/api/flows")["total"] >= 10, 30, "10 live flows")
        acme = d.get_json("/api/flows?tenant=acme")
        assert acme["total"] == 5 and {f["tenant"] for f in acme["flows"]} == {"acme"}
        assert {f["worker"] for f in d.get_json("/api/flows")["flows"]} <= {0, 1}
        page = d.get_json("/api/flows?offset=8&limit=5")
        assert page["total"] == 10 and len(page["flows"]) == 2
        assert d.request("GET", "/api/flows?limit=x")[0] == 400
        assert {t["tenant"] for t in d.get_json("/api/tunnels")} == {"acme", "globex"}
    finally:
        for c in clients:
            c.kill()
            c.wait(10)


def test_server_fin_first_then_a_slow_reader_gets_every_byte(daemon_factory, streams, tmp_path):
    # The upstream closes its side first and reads slowly: the client's FIN crosses long before
    # the data has left nsd's kernel. The flow ends, but the relay must still deliver all of it.
    d = daemon_factory("--workers", "1", config=config(tmp_path))
    sent = stream_client(d, "drain", 8 << 20)
    ready, _, _ = select.select([streams.stdout], [], [], 30)
    assert ready, "the server never finished reading (the stream was cut)"
    line = streams.stdout.readline().decode().split()
    assert line == ["drained", str(8 << 20), "of", str(8 << 20), sent["sha256"]], line
    end = wait_for(lambda: [r for r in audit_records(tmp_path / "audit.jsonl")
                            if r["audit"] == "flow_end"], 10, "flow_end")[0]
    assert end["payload_bytes"][0] == len(f"DRAIN {8 << 20}\n") + (8 << 20)
