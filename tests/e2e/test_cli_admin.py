"""The admin verbs of the CLI, against a running daemon, over its unix socket."""

from __future__ import annotations

import subprocess

from tests.helpers import IPFERRY, wait_for


def cli(*args: str, runtime_dir) -> subprocess.CompletedProcess:
    return subprocess.run([IPFERRY, *args], capture_output=True, text=True, timeout=30,
                          env={"RUNTIME_DIRECTORY": str(runtime_dir), "PATH": "/usr/bin:/bin"})


def test_status_reload_restart_worker(daemon_factory, runtime_dir):
    d = daemon_factory("--workers", "2")
    res = cli("status", runtime_dir=runtime_dir)
    assert res.returncode == 0, res
    lines = res.stdout.splitlines()
    assert lines[0].startswith("ready: nsd ready, 2/2 workers ready")
    assert lines[2].startswith("worker 0: pid ") and "tun ipf0" in lines[2]
    assert lines[-1] == f"on-ramp tunnel: {runtime_dir}/tunnel.sock"

    res = cli("reload", runtime_dir=runtime_dir)
    assert res.returncode == 0 and "built-in default" in res.stdout

    old = d.workers()[1]["pid"]
    res = cli("restart-worker", "1", runtime_dir=runtime_dir)
    assert res.returncode == 0 and f"pid {old}" in res.stdout
    wait_for(lambda: (w := d.workers()[1])["pid"] != old and w["state"] == "ready", 10, "restart")
    assert d.workers()[1]["restarts"] == 1

    assert cli("restart-worker", "9", runtime_dir=runtime_dir).returncode == 1


def test_cli_without_a_daemon_says_so(tmp_path):
    res = cli("status", runtime_dir=tmp_path)
    assert res.returncode == 1
    assert res.stderr.startswith(f"ipferry: cannot reach the admin API at {tmp_path}/admin.sock")
    assert "Traceback" not in res.stderr


def test_tcp_mutations_without_a_configured_token_are_forbidden(daemon_factory):
    d = daemon_factory("--workers", "1")
    status, body = d.netns.http("POST", "127.0.0.1", 9180, "/api/reload")
    assert status == 403 and b"admin.token" in body
    assert d.netns.http("GET", "127.0.0.1", 9180, "/healthz")[0] == 200
    assert d.netns.http("GET", "127.0.0.1", 9180, "/readyz")[0] == 200
