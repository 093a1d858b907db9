"""A daemon that cannot start says why before its shutdown's ``stopping``/``stopped`` log lines,
not only in the one line after them."""

from __future__ import annotations

import json
import subprocess

from tests.helpers import IPFERRY


def test_second_daemon_says_why_before_stopping(daemon_factory, runtime_dir, netns):
    d = daemon_factory("--workers", "1")
    env = {"RUNTIME_DIRECTORY": str(runtime_dir), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    res = subprocess.run(["nsenter", f"--net={netns.path}", IPFERRY, "run", "--workers", "1",
                          "--admin-listen", "127.0.0.1:9181", "--log-format", "json"],
                         capture_output=True, text=True, timeout=30, env=env,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 1
    reason = f"{runtime_dir}/tunnel.sock: another process is listening there (is ipferry " \
             "already running?)"
    *logged, last = res.stderr.strip().splitlines()
    assert last == f"ipferry: cannot start: {reason}"
    events = [json.loads(line) for line in logged]
    assert [e["event"] for e in events] == ["cannot_start", "stopping", "stopped"], events
    assert events[0]["reason"] == reason and events[0]["level"] == "error"
    assert d.ready(), "the first daemon is untouched"
