"""A small client for the admin API, used by ``ipferry status``, ``reload``, ``restart-worker``."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ipferry.runtime.paths import default_runtime_dir


class AdminClientError(Exception):
    pass


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix stream socket (the admin socket)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def call(target: str | None, method: str, path: str, token: str | None = None,
         timeout: float = 10.0) -> tuple[int, Any]:
    """One request; returns (status, decoded JSON or text). ``target``: socket path or URL."""
    if target is None:
        # The caller's environment may name another runtime dir than the service's (root with
        # XDG_RUNTIME_DIR set, say): try ours, then the system service's.
        candidates = [default_runtime_dir() / "admin.sock", Path("/run/ipferry/admin.sock")]
        target = str(next((p for p in candidates if p.exists()), candidates[0]))
    if target.startswith(("http://", "https://")):
        url = urlsplit(target)
        if not url.hostname:
            raise AdminClientError(f"{target}: no host in the URL")
        conn: http.client.HTTPConnection = http.client.HTTPConnection(
            url.hostname, url.port or 80, timeout=timeout)
    else:
        conn = UnixHTTPConnection(target, timeout)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise AdminClientError(f"cannot reach the admin API at {target}: {exc}; "
                               f"is ipferry running? (--admin selects another)") from None
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw.decode(errors="replace").strip()
