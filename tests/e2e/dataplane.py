"""Shared pieces of the data-path tests: the upstream servers and the client side."""

from __future__ import annotations

import json
import socket
import subprocess
import textwrap
from pathlib import Path

from tests.helpers import IPFERRY, NO_CAPS

SERVER_ADDR = "198.18.0.1"  # benchmark range, on the test namespace's own loopback
STREAMS = str(Path(__file__).with_name("streams.py"))
STREAM_PORT = 9000


def add_server_address(netns) -> None:
    subprocess.run(["ip", "-n", netns.name, "addr", "add", f"{SERVER_ADDR}/32", "dev", "lo"],
                   capture_output=True)  # idempotent: a second fixture may have added it


def can_connect(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def connect(daemon, *cmd: str, tenant: str = "acme", context: str | None = None,
            address: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``cmd`` inside ``ipferry connect`` (no capabilities) against ``daemon``'s tunnel."""
    extra = ["--context", context] if context else []
    extra += ["--address", address] if address else []
    return subprocess.run([*NO_CAPS, IPFERRY, "connect", "--tunnel",
                           str(daemon.runtime_dir / "tunnel.sock"), "--tenant", tenant, *extra,
                           "--", *cmd], capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def stream_client(daemon, mode: str, *args, port: int = STREAM_PORT, tenant: str = "acme",
                  address: str | None = None, timeout: float = 240) -> dict:
    res = connect(daemon, "python3", STREAMS, mode, SERVER_ADDR, str(port), *map(str, args),
                  tenant=tenant, address=address, timeout=timeout)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    return json.loads(res.stdout)


def audit_records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def config(tmp_path, extra: str = "") -> str:
    """A daemon config with the audit stream in tmp_path/audit.jsonl, plus ``extra``."""
    return textwrap.dedent(f"""\
        [audit]
        sink = "{tmp_path / 'audit.jsonl'}"
        """) + extra
