"""Devices of a tenant's private network for the end-to-end tests: ``ipferry connect --address``
namespaces, run in the background, and what they serve."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import IPFERRY, NO_CAPS, wait_for

NETWORKS = """
[[networks]]
tenant = "acme"
cidr = "10.77.0.0/16"

[[networks]]
tenant = "acme"
cidr = "fd77::/64"

[[networks]]
tenant = "globex"
cidr = "10.88.0.0/16"
"""

# A file server for the transfers: GET /<n> sends n deterministic bytes; PUT/POST answers the
# sha256 of the body. On every address of the namespace (IPv4 and IPv6).
SERVER = textwrap.dedent("""\
    import hashlib, http.server, socket, sys

    def chunk(i):
        return hashlib.sha256(str(i).encode()).digest() * 2048  # 64 KiB

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a): pass
        def do_GET(self):
            n = int(self.path.strip("/") or 0)
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            sent, i = 0, 0
            while sent < n:
                c = chunk(i)[:n - sent]
                self.wfile.write(c)
                sent += len(c)
                i += 1
        def do_PUT(self):
            n = int(self.headers["Content-Length"])
            h, left = hashlib.sha256(), n
            while left:
                b = self.rfile.read(min(left, 1 << 20))
                if not b: break
                h.update(b)
                left -= len(b)
            body = h.hexdigest().encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        do_POST = do_PUT

    class S(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6
        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    S(("::", int(sys.argv[1])), H).serve_forever()
    """)


def expected_sha256(n: int) -> str:
    h, sent, i = hashlib.sha256(), 0, 0
    while sent < n:
        c = (hashlib.sha256(str(i).encode()).digest() * 2048)[:n - sent]
        h.update(c)
        sent += len(c)
        i += 1
    return h.hexdigest()


def connect_argv(daemon, *cmd: str, tenant: str = "acme", options: tuple | list = (),
                 gue: str | None = None, no_caps: bool = True) -> list[str]:
    where = ["--gue", gue] if gue else ["--tunnel", str(daemon.runtime_dir / "tunnel.sock")]
    enter = ["nsenter", f"--net={daemon.netns.path}"] if gue else []
    return [*enter, *(NO_CAPS if no_caps else []), IPFERRY, "connect", *where,
            "--tenant", tenant, *options, "--", *cmd]


@contextlib.contextmanager
def device(daemon, *cmd: str, tenant: str = "acme", addresses: tuple = (),
           gue: str | None = None, options: tuple | list = (),
           wait_routes: bool = True, no_caps: bool = True) -> Iterator[subprocess.Popen]:
    """``cmd`` in the background in a device namespace holding ``addresses``; stopped (its
    process group) at the end. Waits until the daemon lists its routes (a connected tunnel)."""
    opts = [o for a in addresses for o in ("--address", a)] + list(options)
    proc = subprocess.Popen(connect_argv(daemon, *cmd, tenant=tenant, options=opts, gue=gue,
                                         no_caps=no_caps),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        if wait_routes and addresses and not gue:
            def listed() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"the device exited: {proc.communicate()}")
                rows = daemon.get_json(f"/api/routes?tenant={tenant}")["routes"]
                held = {r["prefix"].split("/")[0] for r in rows}
                return all(a in held for a in addresses)
            wait_for(listed, 20, f"routes of {addresses}")
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()


@contextlib.contextmanager
def serve_files(daemon, address: str | tuple, port: int = 8000, tenant: str = "acme",
                gue: str | None = None, options: tuple | list = ()) -> Iterator[subprocess.Popen]:
    """A device with ``address`` (or addresses) serving :data:`SERVER` on ``port``; ready once
    the server prints that it listens."""
    addresses = (address,) if isinstance(address, str) else tuple(address)
    ready = SERVER.replace('S(("::", int(sys.argv[1])), H).serve_forever()',
                           'srv = S(("::", int(sys.argv[1])), H)\n'
                           'print("listening", flush=True)\nsrv.serve_forever()')
    with device(daemon, "python3", "-c", ready, str(port), tenant=tenant,
                addresses=addresses, gue=gue, options=options) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # (bounded: the server starts at once or exits)
        assert line.strip() == b"listening", (line, proc.poll())
        yield proc


def run_in_device(daemon, *cmd: str, tenant: str = "acme", timeout: float = 120,
                  options: tuple | list = (), gue: str | None = None,
                  ) -> subprocess.CompletedProcess:
    """``cmd`` in a device namespace (without capabilities; ``ping``, a setuid program, keeps
    them)."""
    return subprocess.run(connect_argv(daemon, *cmd, tenant=tenant, options=options, gue=gue,
                                       no_caps=cmd[0] != "ping"),
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def script_path(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)
