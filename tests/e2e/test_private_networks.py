"""Private networks end to end: devices of a tenant reach each other through the daemon, as IP
packets (layer 3) or as streams upgraded and downgraded again; tenants never reach each other.

Every device is an ``ipferry connect --address`` namespace (no capabilities); the daemon runs in
the test's own network namespace."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys

import pytest

from ipferry.wire.sharding import owner
from tests.e2e.dataplane import audit_records, config, counter
from tests.e2e.devices import (
    NETWORKS,
    connect_argv,
    device,
    expected_sha256,
    run_in_device,
    serve_files,
)
from tests.helpers import IPFERRY, wait_for

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


def transfer_both_ways(d, tmp_path, host: str, size: int, curl: tuple[str, ...] = (),
                       **kw) -> None:
    """``size`` bytes from the device at ``host`` and ``size`` bytes to it, each checked by
    sha256 (the device sums what it received)."""
    res = run_in_device(d, "bash", "-c", f"set -o pipefail; curl -sS -g --max-time 60 {' '.join(curl)}"
                        f" http://{host}:8000/{size} | sha256sum", **kw)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0].decode() == expected_sha256(size)
    payload = tmp_path / f"up-{size}.bin"
    if not payload.exists():
        with payload.open("wb") as f:
            for i in range(size // MB):
                f.write(hashlib.sha256(str(i).encode()).digest() * (MB // 32))
    want = hashlib.sha256(payload.read_bytes()).hexdigest()
    res = run_in_device(d, "curl", "-sS", "-g", "--max-time", "60", *curl, "-T", str(payload),
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


def port_owned_away(d, workers: int, src: str, dst: str, dport: int) -> int:
    """A TCP source port that puts the flow ``src`` -> ``dst``:``dport`` on a worker other than
    the one holding the tunnel of the device at ``dst`` (the hash the kernel steers GUE by)."""
    rows = d.get_json("/api/tunnels")
    holders = [r["worker"] for r in rows if f"{dst}/32" in (r.get("context") or {}).get("routes", ())]
    assert len(holders) == 1, rows
    s, t = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    return next(p for p in range(40000, 41000)
                if owner(socket.IPPROTO_TCP, s, p, t, dport, workers) != holders[0])


@pytest.mark.parametrize("layer", ["ip", "stream"])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_gue_site_and_a_connected_device_reach_each_other(daemon_factory, tmp_path, layer,
                                                            workers):
    """A GUE sender configured as a site holds its prefixes: a connected device reaches it, and
    it reaches the connected device (with two workers, flows cross the mesh one way, and the
    kernel steers the site's datagrams to each flow's owner the other)."""
    extra = NETWORKS + SITE + (STREAM_RULE if layer == "stream" else "")
    d = daemon_factory("--workers", str(workers), config=config(tmp_path, extra))
    site = ("--gue-port", str(SITE_PORT))
    with serve_files(d, ("10.77.1.2", "fd77::1:2"), gue=GUE, options=site):
        transfer_both_ways(d, tmp_path, "10.77.1.2", 100 * MB)
        transfer_both_ways(d, tmp_path, "[fd77::1:2]", 4 * MB)
    with serve_files(d, ("10.77.0.2", "fd77::2")):
        # With two workers, the site's flow is owned away from the worker holding the device's
        # tunnel: the owner writes to the device and reads its answers on its own queue of the
        # device's TUN (or they cross the mesh), never the same tunnel object as the route's.
        curl = ("--local-port", str(port_owned_away(d, workers, "10.77.1.3", "10.77.0.2", 8000)),
                ) if workers > 1 else ()
        transfer_both_ways(d, tmp_path, "10.77.0.2", 20 * MB, curl=curl, gue=GUE,
                           options=("--address", "10.77.1.3", *site))
    ends = wait_for(lambda: [r for r in records(tmp_path, "flow_end") if r["dport"] == 8000]
                    or None, 10, "flow_end records")
    assert len(ends) == 6, ends
    server_leg = "tcp:downgraded" if layer == "stream" else "ip"
    assert {r["server_leg"] for r in ends} == {server_leg}


def slow_download(d, host: str, size: int, **kw) -> subprocess.Popen:
    """A download from a device that lasts (rate-limited), in the background."""
    return subprocess.Popen(
        connect_argv(d, "curl", "-sS", "-g", "--max-time", "60", "--limit-rate", "1M",
                     "-o", "/dev/null", f"http://{host}:8000/{size}", **kw),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def flows_to(d, dst: str) -> list[dict]:
    return [f for f in d.get_json("/api/flows?limit=200")["flows"] if f["dst"] == dst]


@pytest.mark.parametrize("layer", ["ip", "stream"])
def test_a_device_that_disconnects_ends_its_flows_and_becomes_unreachable(
        daemon_factory, tmp_path, layer):
    extra = NETWORKS + (STREAM_RULE if layer == "stream" else "")
    d = daemon_factory("--workers", "2", config=config(tmp_path, extra))
    with serve_files(d, "10.77.0.2") as server:
        downloads = [slow_download(d, "10.77.0.2", 50 * MB) for _ in range(3)]
        try:
            rows = wait_for(lambda: len(flows_to(d, "10.77.0.2")) == 3
                            and flows_to(d, "10.77.0.2"), 20, "3 live flows")
            legs = ("tcp:upgraded", "tcp:downgraded") if layer == "stream" else ("ip", "ip")
            assert {(r["client_leg"], r["server_leg"]) for r in rows} == {legs}, rows
            assert all(r["destination_tunnel"] is not None for r in rows), rows
            os.killpg(server.pid, signal.SIGKILL)  # the device is gone (its tunnel closes)
            for p in downloads:
                assert p.wait(30) != 0  # cut short, not a clean end
        finally:
            for p in downloads:
                p.kill()
                p.communicate()
    wait_for(lambda: not d.get_json("/api/routes?tenant=acme")["routes"] or None, 10,
             "the device's routes withdrawn")
    ends = wait_for(lambda: [r for r in records(tmp_path, "flow_end") if r["dport"] == 8000
                             and r["close_reason"] == "device_disconnected"] or None,
                    10, "flow_end records")
    assert len(ends) == 3, ends
    # New flows: a router's answer at once, not a hang.
    res = run_in_device(d, "curl", "-sS", "--max-time", "10", "http://10.77.0.2:8000/1")
    assert res.returncode == 7, res.stderr  # (an ICMP host unreachable: "couldn't connect")
    res = run_in_device(d, "ping", "-c", "1", "-W", "5", "10.77.0.2")
    assert res.returncode != 0 and b"Unreachable" in res.stdout, res.stdout
    assert counter(d, "ipferry_drops_total", "reason").get("no_route", 0) >= 2


def test_another_tenant_cannot_reach_a_device(daemon_factory, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path, NETWORKS))
    with serve_files(d, "10.77.0.2"):
        res = run_in_device(d, "curl", "-sS", "--max-time", "10", "http://10.77.0.2:8000/1",
                            tenant="globex")
        assert res.returncode == 7, res.stderr
        res = run_in_device(d, "ping", "-c", "1", "-W", "5", "10.77.0.2", tenant="globex")
        # (administratively prohibited: ping says "Packet filtered")
        assert res.returncode != 0 and b"Packet filtered" in res.stdout, res.stdout
        assert counter(d, "ipferry_drops_total", "reason").get("other_tenant_network") == 2
        # Nor can a tunnel of acme pose as a device it is not (an address of the network that
        # it does not hold).
        res = run_in_device(d, "curl", "-sS", "--max-time", "10", "http://10.77.0.2:8000/1",
                            options=("--source", "10.77.0.9"))
        assert res.returncode == 7, res.stderr
        assert counter(d, "ipferry_drops_total", "reason").get("source_not_held") == 1
        # acme's own devices do reach it (and ping it: ICMP between devices too)
        res = run_in_device(d, "ping", "-c", "2", "-W", "5", "10.77.0.2")
        assert res.returncode == 0, res.stdout
    assert not [r for r in records(tmp_path, "flow_start") if r["tenant"] == "globex"]


def test_a_conflicting_or_foreign_claim_refuses_that_tunnel_only(daemon_factory, tmp_path):
    d = daemon_factory("--workers", "2", config=config(tmp_path, NETWORKS))
    with serve_files(d, "10.77.0.2"):
        for tenant, address in (("acme", "10.77.0.2"), ("acme", "10.99.0.1"),
                                ("globex", "10.77.0.5")):
            res = run_in_device(d, "sleep", "5", tenant=tenant,
                                options=("--address", address))
            assert res.returncode != 0 and b"closed the tunnel" in res.stderr, res.stderr
        refused = [e for e in d.log_events() if e.get("event") == "tunnel_refused"]
        assert len(refused) == 3, refused
        reasons = " ".join(e["reason"] for e in refused)
        assert "overlaps" in reasons and "outside" in reasons, reasons
        # The first device is untouched.
        transfer_both_ways(d, tmp_path, "10.77.0.2", 1 * MB)
        rows = d.get_json("/api/routes?tenant=acme")["routes"]
        assert [r["prefix"] for r in rows] == ["10.77.0.2/32"]
        res = subprocess.run([IPFERRY, "routes", "--tenant", "acme"], capture_output=True,
                             text=True, timeout=30,
                             env={"RUNTIME_DIRECTORY": str(d.runtime_dir), "PATH": "/usr/bin:/bin"})
        assert res.returncode == 0, res
        lines = res.stdout.splitlines()
        assert lines[:2] == ["network acme 10.77.0.0/16", "network acme fd77::/64"], lines
        assert lines[2].startswith("route acme 10.77.0.2/32 -> tunnel ") and lines[3] == "1 route"


def test_nsd_restarting_ends_downgraded_flows_and_new_ones_work(daemon_factory, tmp_path):
    d = daemon_factory("--workers", "2", config=config(tmp_path, NETWORKS + STREAM_RULE))
    with serve_files(d, "10.77.0.2"):
        downloads = [slow_download(d, "10.77.0.2", 50 * MB) for _ in range(2)]
        try:
            wait_for(lambda: len(flows_to(d, "10.77.0.2")) == 2 or None, 20, "2 live flows")
            old = d.nsd_pid()
            os.kill(old, signal.SIGKILL)
            for p in downloads:
                assert p.wait(30) != 0
        finally:
            for p in downloads:
                p.kill()
                p.communicate()
        wait_for(lambda: d.status()["ready"] and d.status()["nsd"]["pid"] not in (None, old),
                 20, "a new nsd")
        ends = wait_for(lambda: [r for r in records(tmp_path, "flow_end")
                                 if r["dport"] == 8000] or None, 10, "flow_end records")
        assert {r["close_reason"] for r in ends} == {"namespace_lost"}, ends
        assert {r["server_leg"] for r in ends} == {"tcp:downgraded"}
        transfer_both_ways(d, tmp_path, "10.77.0.2", 4 * MB)


PUBLISH = """
[[onramps]]
kind = "tunnel"

[[onramps]]
kind = "tcp"
name = "web"
listen = "127.0.0.1:8443"
tenant = "acme"
upstream = "10.77.0.2:8000"

[[onramps]]
kind = "tcp"
name = "web-pp"
listen = "127.0.0.1:8444"
tenant = "acme"
upstream = "10.77.0.2:8000"
proxy_protocol = true

[[onramps]]
kind = "tcp"
name = "public"
listen = "127.0.0.1:8445"
tenant = "acme"
upstream = "198.18.0.1:8080"
"""

# A client behind a load balancer that speaks PROXY v2: the header names 203.0.113.7:5555.
PROXIED_GET = """
import socket, sys
from ipferry.wire.proxy import build_v2
s = socket.create_connection(("127.0.0.1", 8444), timeout=20)
s.sendall(build_v2(("203.0.113.7", 5555), ("127.0.0.1", 8444)))
s.sendall(b"GET /%d HTTP/1.0\\r\\n\\r\\n" % int(sys.argv[1]))
data = b""
while chunk := s.recv(1 << 20):
    data += chunk
head, _, body = data.partition(b"\\r\\n\\r\\n")
print(len(body))
"""


def test_a_tcp_onramp_publishes_a_devices_service(daemon_factory, netns, upstream, tmp_path):
    """A service on a device, published on the daemon's host: clients of the on-ramp reach it
    (downgraded into the device's tunnel), with or without a PROXY v2 header naming the real
    client; an on-ramp whose upstream is no device's is a plain TCP off-ramp."""
    (upstream / "hello.txt").write_text("hello from the host\n")
    d = daemon_factory("--workers", "2", config=config(tmp_path, NETWORKS + PUBLISH))
    host = ["nsenter", f"--net={netns.path}"]
    with serve_files(d, "10.77.0.2"):
        for _ in range(3):
            res = subprocess.run([*host, "sh", "-c", "curl -sS --max-time 30 "
                                  f"http://127.0.0.1:8443/{20 * MB} | sha256sum"],
                                 capture_output=True, timeout=60)
            assert res.returncode == 0, res.stderr
            assert res.stdout.split()[0].decode() == expected_sha256(20 * MB)
        res = subprocess.run([*host, sys.executable, "-c", PROXIED_GET, str(MB)],
                             capture_output=True, timeout=60)
        assert res.returncode == 0 and res.stdout.strip() == str(MB).encode(), res
        res = subprocess.run([*host, "curl", "-sS", "--max-time", "10",
                              "http://127.0.0.1:8445/hello.txt"], capture_output=True, timeout=30)
        assert res.stdout == b"hello from the host\n", res
    ends = wait_for(lambda: len(records(tmp_path, "flow_end")) >= 5
                    and records(tmp_path, "flow_end"), 10, "flow_end records")
    published = [r for r in ends if r["dport"] == 8000]
    assert len(published) == 4, ends
    assert {(r["client_leg"], r["server_leg"]) for r in published} == {
        ("tcp:accepted", "tcp:downgraded")}
    assert {r["src"] for r in published} == {"127.0.0.1", "203.0.113.7"}
    assert [r["sport"] for r in published if r["src"] == "203.0.113.7"] == [5555]
    assert all(r["close_reason"] == "fin" for r in published), published
    [public] = [r for r in ends if r["dport"] == 8080]
    assert (public["client_leg"], public["server_leg"]) == ("tcp:accepted", "tcp")
    # The device gone: the published service is unreachable (the connection is reset).
    res = subprocess.run([*host, "curl", "-sS", "--max-time", "10", "http://127.0.0.1:8443/1"],
                         capture_output=True, timeout=30)
    assert res.returncode != 0
    assert counter(d, "ipferry_drops_total", "reason").get("no_route", 0) >= 1


UDP_ECHO = """
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 5353))
print("listening", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(data[::-1], peer)
"""

UDP_CLIENT = """
import socket, sys
host, n = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.connect((host, 5353))
ok = 0
for i in range(n):
    data = (b"%d:" % i) * (1 + i * 97 % 1000)
    s.send(data)
    if s.recv(65535) == data[::-1]:
        ok += 1
print(ok)
"""


@pytest.mark.parametrize("layer", ["ip", "stream"])
def test_udp_between_devices_with_checksums_intact(daemon_factory, tmp_path, layer):
    """Datagrams between two devices (whose kernels leave UDP checksums to the TUN's offload)
    arrive whole, in both directions, IPv4 and IPv6, as packets or rebuilt from payloads."""
    rule = STREAM_RULE.replace('protocol = "tcp"', 'protocol = "udp"').replace('"8000"', '"5353"')
    extra = NETWORKS + (rule if layer == "stream" else "")
    d = daemon_factory("--workers", "2", config=config(tmp_path, extra))
    with device(d, "python3", "-c", UDP_ECHO, addresses=("10.77.0.2", "fd77::2")) as echo:
        assert echo.stdout is not None and echo.stdout.readline().strip() == b"listening"
        for host in ("10.77.0.2", "fd77::2"):
            res = run_in_device(d, "python3", "-c", UDP_CLIENT, host, "50")
            assert res.returncode == 0, res.stderr
            assert res.stdout.strip() == b"50", res.stdout
    ends = wait_for(lambda: [r for r in records(tmp_path, "flow_end") if r["dport"] == 5353]
                    or None, 10, "flow_end records")
    want = "udp:downgraded" if layer == "stream" else "ip"
    assert {r["server_leg"] for r in ends} == {want}, ends


def test_a_closed_port_of_a_device_is_refused_in_both_layers(daemon_factory, tmp_path):
    """Connect before accept towards a device: a port nothing listens on is refused, at once,
    whether the flow goes as packets or downgraded (the device's reset, seen by nsd's socket)."""
    rule = STREAM_RULE.replace('ports = "8000"\n', 'ports = "8001"\n')
    d = daemon_factory("--workers", "1", config=config(tmp_path, NETWORKS + rule))
    with serve_files(d, "10.77.0.2"):
        for port in (8001, 8002):  # downgraded, then as IP packets
            res = run_in_device(d, "curl", "-sS", "--max-time", "10",
                                f"http://10.77.0.2:{port}/1")
            assert res.returncode == 7, res.stderr  # (curl: "couldn't connect", at once)
    ends = wait_for(lambda: len({r["dport"] for r in records(tmp_path, "flow_end")
                                 if r["dport"] in (8001, 8002)}) == 2
                    and [r for r in records(tmp_path, "flow_end") if r["dport"] in (8001, 8002)],
                    10, "flow_end records")
    by_port = {r["dport"]: r for r in ends}
    assert by_port[8001]["close_reason"] == "upstream_refused", ends
    assert by_port[8001]["server_leg"] == "tcp:downgraded"
    assert by_port[8002]["close_reason"] == "rst" and by_port[8002]["server_leg"] == "ip", ends
    assert len([r for r in ends if r["dport"] == 8001]) == 1  # no retransmitted SYN's flows
