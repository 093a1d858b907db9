"""``ipferry connect``'s command line and errors, before any namespace or TUN is made (no root).

Packets crossing a tunnel both ways need a real TUN: tests/e2e/test_connect.py.
"""

from __future__ import annotations

import subprocess

from tests.helpers import IPFERRY, NO_CAPS


def connect(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*NO_CAPS, IPFERRY, "connect", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_no_daemon_is_one_clear_line(tmp_path):
    res = connect("--tunnel", str(tmp_path / "nothing.sock"), "--", "true")
    assert res.returncode == 1
    assert res.stderr.strip() == (f"ipferry connect: no tunnel on-ramp at {tmp_path}/nothing.sock: "
                                  "is ipferry running? (--tunnel selects another)")


def test_bad_arguments(tmp_path):
    assert connect("--tunnel", str(tmp_path / "x"), "--").returncode == 2
    res = connect("--context", "[1]", "--", "true")
    assert res.returncode == 2 and "bad --context" in res.stderr
