"""Private networks end to end: devices of a tenant reach each other through the daemon, as IP
packets (layer 3) or as streams upgraded and downgraded again; tenants never reach each other.

Every device is an ``ipferry connect --address`` namespace (no capabilities); the daemon runs in
the test's own network namespace."""

from __future__ import annotations

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


def curl(d, url: str, *args: str, tenant: str = "acme", options=()) -> tuple[int, bytes, bytes]:
    res = run_in_device(d, "curl", "-sS", "-g", "--max-time", "60", *args, url, tenant=tenant,
                        options=options)
    return res.returncode, res.stdout, res.stderr


@pytest.mark.parametrize("layer", ["ip", "stream"])
@pytest.mark.parametrize("workers", [1, 2])
def test_device_to_device_http_both_ways(daemon_factory, tmp_path, layer, workers):
    extra = NETWORKS + (STREAM_RULE if layer == "stream" else "")
    d = daemon_factory("--workers", str(workers), config=config(tmp_path, extra))
    with serve_files(d, ("10.77.0.2", "fd77::2")):
        size = 8 * MB
        for host in ("10.77.0.2", "[fd77::2]"):
            rc, out, err = curl(d, f"http://{host}:8000/{size}", "-o", "/dev/null",
                                "-w", "%{size_download}")
            assert rc == 0, err
            assert int(out) == size
        # Upload: the device answers the sha256 of what it received.
        payload = tmp_path / "up.bin"
        payload.write_bytes(bytes(range(256)) * (size // 256))
        import hashlib
        want = hashlib.sha256(payload.read_bytes()).hexdigest()
        rc, out, err = curl(d, "http://10.77.0.2:8000/", "-T", str(payload))
        assert rc == 0, err
        assert out.decode() == want
    ends = wait_for(lambda: [r for r in records(tmp_path, "flow_end") if r["dport"] == 8000]
                    or None, 10, "flow_end records")
    assert ends
    server_leg = "tcp:downgraded" if layer == "stream" else "ip"
    assert all(r["server_leg"] == server_leg for r in ends), ends
    assert all(r["destination_tunnel"] is not None for r in ends)
    if layer == "stream":
        assert sum(counter(d, "ipferry_flows_downgraded_total", None).values()) >= 3
    else:
        routed = counter(d, "ipferry_routed_packets_total", "direction")
        assert routed.get("to_device", 0) > 0 and routed.get("to_client", 0) > 0
    assert expected_sha256(10)  # (the helper the larger transfers use)
