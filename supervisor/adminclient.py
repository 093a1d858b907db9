"""A small client for the admin API, used by ``ipferry status``, ``reload``, ``restart-worker``."""

from __future__ import annotations

import http.client
import json
import os
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


def admin_target(target: str) -> tuple[str, int] | str:
    """What ``--admin`` names: (host, port) for http://HOST:PORT, HOST:PORT or [IPV6]:PORT, else
    the path of a unix socket (it contains a ``/`` or exists)."""
    if target.startswith(("http://", "https://")):
        try:
            url = urlsplit(target)
            port = url.port
        except ValueError as exc:
            raise AdminClientError(f"--admin {target!r}: not a valid URL ({exc}); give it as "
                                   f"http://127.0.0.1:9180") from None
        if not url.hostname:
            raise AdminClientError(f"--admin {target!r}: no host in the URL; give it as "
                                   f"http://127.0.0.1:9180")
        return url.hostname, port or 80
    if "/" in target or os.path.exists(target):
        return target
    host, sep, digits = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address without brackets: its port cannot be told apart
    if sep and host and digits.isdigit() and 0 < int(digits) < 65536:
        return host, int(digits)
    raise AdminClientError(f"--admin {target!r}: neither HOST:PORT ([IPV6]:PORT) nor an existing "
                           f"socket path; give the admin listener as 127.0.0.1:9180 or the admin "
                           f"socket's path (e.g. ./admin.sock)")


def call(target: str | None, method: str, path: str, token: str | None = None,
         timeout: float = 10.0) -> tuple[int, Any]:
    """One request; returns (status, decoded JSON or text). ``target``: socket path or URL."""
    if target is None:
        # The caller's environment may name another runtime dir than the service's (root with
        # XDG_RUNTIME_DIR set, say): try ours, then the system service's.
        candidates = [default_runtime_dir() / "admin.sock", Path("/run/ipferry/admin.sock")]
        target = str(next((p for p in candidates if p.exists()), candidates[0]))
    where = admin_target(target)
    if isinstance(where, tuple):
        conn: http.client.HTTPConnection = http.client.HTTPConnection(*where, timeout=timeout)
    else:
        conn = UnixHTTPConnection(where, timeout)
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
