"""Private networks end to end: devices of a tenant reach each other through the daemon, as IP
packets (layer 3) or as streams upgraded and downgraded again; tenants never reach each other.

Every device is an ``ipferry connect --address`` namespace (no capabilities); the daemon runs in
the test's own network namespace."""

from __future__ import annotations

import hashlib

import pytest

from tests.e2e.dataplane import audit_records, config, counter
from tests.e2e.devices import (
    NETWORKS,
    expected_sha256,
    run_in_device,
    serve_files,
)
from tests.helpers import wait_for

MB = 1 << 20
STREAM_RULE = """
[[rules]]
action = "allow"
tenant = "acme"
protocol = "tcp"
ports = "8000"
layer = "stream"
"""


def records(tmp_path, event: str) -> list[dict]:
    return [r for r in audit_records(tmp_path / "audit.jsonl") if r["audit"] == event]


def transfer_both_ways(d, tmp_path, host: str, size: int, **kw) -> None:
    """``size`` bytes from the device at ``host`` and ``size`` bytes to it, each checked by
    sha256 (the device sums what it received)."""
    res = run_in_device(d, "sh", "-c", f"curl -sS -g --max-time 120 http://{host}:8000/{size}"
                        " | sha256sum", **kw)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0].decode() == expected_sha256(size)
    payload = tmp_path / f"up-{size}.bin"
    if not payload.exists():
        with payload.open("wb") as f:
            for i in range(size // MB):
                f.write(hashlib.sha256(str(i).encode()).digest() * (MB // 32))
    want = hashlib.sha256(payload.read_bytes()).hexdigest()
    res = run_in_device(d, "curl", "-sS", "-g", "--max-time", "120", "-T", str(payload),
                        f"http://{host}:8000/", **kw)
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode() == want


@pytest.mark.parametrize("layer", ["ip", "stream"])
@pytest.mark.parametrize("workers", [1, 2])
def test_device_to_device_100mb_each_way(daemon_factory, tmp_path, layer, workers):
    """The issue's story: a device serves, another of its tenant fetches and uploads, over
    IPv4 and IPv6, as IP packets or as streams downgraded into the serving device's tunnel."""
    extra = NETWORKS + (STREAM_RULE if layer == "stream" else "")
    d = daemon_factory("--workers", str(workers), config=config(tmp_path, extra))
    with serve_files(d, ("10.77.0.2", "fd77::2")):
        transfer_both_ways(d, tmp_path, "10.77.0.2", 100 * MB)
        transfer_both_ways(d, tmp_path, "[fd77::2]", 8 * MB)
    ends = wait_for(lambda: [r for r in records(tmp_path, "flow_end") if r["dport"] == 8000]
                    or None, 10, "flow_end records")
    assert len(ends) == 4, ends
    server_leg = "tcp:downgraded" if layer == "stream" else "ip"
    client_leg = "tcp:upgraded" if layer == "stream" else "ip"
    assert {(r["client_leg"], r["server_leg"]) for r in ends} == {(client_leg, server_leg)}
    assert all(r["destination_tunnel"] is not None and r["close_reason"] == "fin"
               for r in ends), ends
    assert sum(r["payload_bytes"][0] for r in ends) > 108 * MB  # the uploads, counted once
    if layer == "stream":
        assert counter(d, "ipferry_flows_downgraded_total", "").get("", 0) == 4
    else:
        routed = counter(d, "ipferry_routed_packets_total", "direction")
        assert routed.get("to_device", 0) > 1000 and routed.get("to_client", 0) > 1000


GUE = "127.0.0.1:6080"
SITE_PORT = 7001
SITE = f"""
[[onramps]]
kind = "tunnel"

[[onramps]]
kind = "gue"
listen = "{GUE}"

[[sites]]
name = "branch"
tenant = "acme"
prefixes = ["10.77.1.0/24", "fd77::1:0/112"]
sender = "127.0.0.1:{SITE_PORT}"
"""


@pytest.mark.parametrize("layer", ["ip", "stream"])
def test_a_gue_site_and_a_connected_device_reach_each_other(daemon_factory, tmp_path, layer):
    """A GUE sender configured as a site holds its prefixes: a connected device reaches it, and
    it reaches the connected device (two workers: flows cross the mesh one way, and the kernel
    steers the site's datagrams to each flow's owner the other)."""
    extra = NETWORKS + SITE + (STREAM_RULE if layer == "stream" else "")
    d = daemon_factory("--workers", "2", config=config(tmp_path, extra))
    site = ("--gue-port", str(SITE_PORT))
    with serve_files(d, ("10.77.1.2", "fd77::1:2"), gue=GUE, options=site):
        transfer_both_ways(d, tmp_path, "10.77.1.2", 20 * MB)
        transfer_both_ways(d, tmp_path, "[fd77::1:2]", 4 * MB)
    with serve_files(d, ("10.77.0.2", "fd77::2")):
        transfer_both_ways(d, tmp_path, "10.77.0.2", 20 * MB, gue=GUE,
                           options=("--address", "10.77.1.3", *site))
    ends = wait_for(lambda: [r for r in records(tmp_path, "flow_end") if r["dport"] == 8000]
                    or None, 10, "flow_end records")
    assert len(ends) == 6, ends
    server_leg = "tcp:downgraded" if layer == "stream" else "ip"
    assert {r["server_leg"] for r in ends} == {server_leg}
