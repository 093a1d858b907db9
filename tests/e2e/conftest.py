"""Fixtures of the end-to-end tests: upstream servers inside the test's namespace."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e.dataplane import SERVER_ADDR, STREAM_PORT, STREAMS, add_server_address, can_connect
from tests.helpers import wait_for


@pytest.fixture
def upstream(netns, tmp_path):
    """An HTTP server inside the test's namespace, serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    add_server_address(netns)
    proc = subprocess.Popen(["nsenter", f"--net={netns.path}", sys.executable, "-m",
                             "http.server", "--bind", SERVER_ADDR, "8080"], cwd=www,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: netns.run(can_connect, SERVER_ADDR, 8080), 10, "the upstream server")
        yield www
    finally:
        proc.kill()
        proc.wait(5)


@pytest.fixture
def streams(netns):
    """The stream test server (tests/e2e/streams.py) inside the test's namespace."""
    add_server_address(netns)
    proc = subprocess.Popen(["nsenter", f"--net={netns.path}", sys.executable, STREAMS, "serve",
                             SERVER_ADDR, str(STREAM_PORT)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        yield proc
    finally:
        proc.kill()
        proc.wait(5)
