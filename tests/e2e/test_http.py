"""The HTTP layer end to end: streams carried as HTTP through ``ipferry connect``, the HTTP
on-ramp as a forward proxy, TLS server names; real clients (curl, aiohttp's WebSocket client)
and real servers (nginx, an aiohttp upstream) inside the test's namespace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.dataplane import SERVER_ADDR, add_server_address, audit_records, config, connect
from tests.helpers import wait_for

UPSTREAM = str(Path(__file__).with_name("httpserver.py"))
PORT = 8080


@pytest.fixture
def origin(netns):
    """The aiohttp upstream on SERVER_ADDR:8080 (name "a")."""
    add_server_address(netns)
    proc = subprocess.Popen(["nsenter", f"--net={netns.path}", sys.executable, UPSTREAM,
                             SERVER_ADDR, str(PORT), "a"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline().strip()
        assert line == b"ready", (line, proc.stderr.read() if proc.poll() is not None else "")
        yield f"{SERVER_ADDR}:{PORT}"
    finally:
        proc.kill()
        proc.wait(5)
        proc.stdout.close()
        proc.stderr.close()


HTTP_RULES = """
[[rules]]
action = "deny"
name = "no-admin"
path = "/admin"

[[rules]]
action = "allow"
name = "web-as-http"
protocol = "tcp"
ports = "8080"
layer = "http"
"""


def http_records(tmp_path, n: int) -> list[dict]:
    return wait_for(lambda: (lambda r: r if len(r) >= n else None)(
        [r for r in audit_records(tmp_path / "audit.jsonl") if r["audit"] == "http_request"]),
        10, f"{n} http_request records")


def curl(d, *args: str) -> subprocess.CompletedProcess:
    return connect(d, "curl", "-sS", "--max-time", "20", *args, timeout=60)


def test_keep_alive_requests_are_each_decided_and_audited(daemon_factory, origin, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path, HTTP_RULES))
    res = curl(d, "-w", "%{http_code} %{num_connects}\\n", f"http://{origin}/hello",
               f"http://{origin}/admin/x", f"http://{origin}/hello")
    assert res.returncode == 0, res
    out = res.stdout.decode()
    assert out.count("hello from a") == 2, out
    assert "denied by rule no-admin" in out, out
    assert "403 0" in out, out  # the denied one went on the same connection
    records = http_records(tmp_path, 3)
    assert [(r["method"], r["path"], r["status"], r["decision"]) for r in records] == [
        ("GET", "/hello", 200, "allow"), ("GET", "/admin/x", 403, "deny"),
        ("GET", "/hello", 200, "allow")], records
    assert records[1]["reason"] == "denied by rule no-admin"
    assert all(r["tenant"] == "acme" and r["flow"]["dport"] == PORT for r in records), records
