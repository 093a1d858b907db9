"""Fixtures of the end-to-end tests: upstream servers inside the test's namespace."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e.dataplane import (
    DATAGRAMS,
    SERVER_ADDR,
    SERVER_ADDR6,
    STREAM_PORT,
    STREAMS,
    add_server_address,
    can_connect,
)
from tests.helpers import wait_for


def _http_server(netns, www, addr: str):
    www.mkdir(exist_ok=True)
    add_server_address(netns)
    proc = subprocess.Popen(["nsenter", f"--net={netns.path}", sys.executable, "-m",
                             "http.server", "--bind", addr, "8080"], cwd=www,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: netns.run(can_connect, addr, 8080), 10, "the upstream server")
        yield www
    finally:
        proc.kill()
        proc.wait(5)


@pytest.fixture
def upstream(netns, tmp_path):
    """An HTTP server inside the test's namespace, serving tmp_path/www."""
    yield from _http_server(netns, tmp_path / "www", SERVER_ADDR)


@pytest.fixture
def upstream6(netns, tmp_path):
    """The same on the namespace's IPv6 address."""
    yield from _http_server(netns, tmp_path / "www", SERVER_ADDR6)


def _server(netns, *argv: str) -> subprocess.Popen:
    """A test server inside the namespace, once it said ``ready`` (killed by the caller)."""
    proc = subprocess.Popen(["nsenter", f"--net={netns.path}", sys.executable, *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if proc.stdout.readline().strip() != b"ready":
        proc.kill()
        proc.wait(5)
        raise AssertionError(f"test server {argv} did not start")
    return proc


@pytest.fixture
def servers(netns):
    """Start test servers in the test's namespace; all are killed at teardown."""
    add_server_address(netns)
    procs: list[subprocess.Popen] = []

    def start(*argv: str) -> subprocess.Popen:
        procs.append(_server(netns, *argv))
        return procs[-1]

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def streams(servers):
    """The stream test server (tests/e2e/streams.py) inside the test's namespace."""
    return servers(STREAMS, "serve", SERVER_ADDR, str(STREAM_PORT))


@pytest.fixture
def streams6(servers):
    """The stream test server on the namespace's IPv6 address."""
    return servers(STREAMS, "serve", SERVER_ADDR6, str(STREAM_PORT))


UDP_ECHO_PORT = 7007
DNS_PORT = 5353


@pytest.fixture
def udp_servers(servers):
    """UDP echo servers on both server addresses, and a DNS server on the IPv4 one."""
    for addr in (SERVER_ADDR, SERVER_ADDR6):
        servers(DATAGRAMS, "echo-server", addr, str(UDP_ECHO_PORT))
    servers(DATAGRAMS, "dns-server", SERVER_ADDR, str(DNS_PORT))
