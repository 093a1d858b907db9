"""Real web servers for the end-to-end tests, inside the test's namespace: nginx (name-based
virtual hosts, TLS with a throw-away certificate) and the aiohttp upstream of httpserver.py."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

from tests.e2e.dataplane import SERVER_ADDR, add_server_address, can_connect
from tests.helpers import wait_for

UPSTREAM = str(Path(__file__).with_name("httpserver.py"))
TLS_PORT = 8443


def need(*commands: str) -> None:
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        raise AssertionError(f"the HTTP tests need {', '.join(missing)}: run deploy/setup.sh "
                             "(it installs nginx, openssl and curl)")


@contextlib.contextmanager
def aiohttp_upstream(netns, addr: str, port: int, name: str) -> Iterator[str]:
    """httpserver.py on ``addr``:``port``, answering as ``name``."""
    add_server_address(netns)
    proc = subprocess.Popen(["nsenter", f"--net={netns.path}", sys.executable, UPSTREAM, addr,
                             str(port), name], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline().strip()
        if line != b"ready":
            proc.kill()
            raise AssertionError(f"the aiohttp upstream did not start: {proc.stderr.read()!r}")
        yield f"{addr}:{port}"
    finally:
        proc.kill()
        proc.wait(5)
        proc.stdout.close()
        proc.stderr.close()


@contextlib.contextmanager
def nginx(netns, tmp: Path) -> Iterator[Path]:
    """nginx on SERVER_ADDR: port 80 with virtual hosts a.test (the default) and b.test, port
    8443 with TLS (a self-signed certificate for good.test and bad.test)."""
    need("nginx", "openssl")
    add_server_address(netns)
    tmp.mkdir(exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=good.test", "-addext", "subjectAltName=DNS:good.test,"
                    "DNS:bad.test", "-keyout", str(tmp / "key.pem"), "-out",
                    str(tmp / "cert.pem")], check=True, capture_output=True, timeout=60)
    conf = tmp / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""\
        daemon off;
        master_process off;
        worker_processes 1;
        pid {tmp}/nginx.pid;
        error_log {tmp}/error.log warn;
        events {{ worker_connections 1024; }}
        http {{
            access_log off;
            client_body_temp_path {tmp}/body;
            proxy_temp_path {tmp}/proxy;
            fastcgi_temp_path {tmp}/fastcgi;
            uwsgi_temp_path {tmp}/uwsgi;
            scgi_temp_path {tmp}/scgi;
            keepalive_requests 10000;
            server {{
                listen {SERVER_ADDR}:80 default_server;
                server_name a.test;
                location / {{ return 200 "site a\\n"; }}
            }}
            server {{
                listen {SERVER_ADDR}:80;
                server_name b.test;
                location / {{ return 200 "site b\\n"; }}
            }}
            server {{
                listen {SERVER_ADDR}:{TLS_PORT} ssl;
                server_name _;
                ssl_certificate {tmp}/cert.pem;
                ssl_certificate_key {tmp}/key.pem;
                location / {{ return 200 "tls site\\n"; }}
            }}
        }}
        """))
    proc = subprocess.Popen(["nsenter", f"--net={netns.path}", "nginx", "-c", str(conf), "-p",
                             str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"nginx exited: {proc.stderr.read()!r} "
                                     f"{(tmp / 'error.log').read_text(errors='replace')}")
            return netns.run(can_connect, SERVER_ADDR, 80) and \
                netns.run(can_connect, SERVER_ADDR, TLS_PORT)
        wait_for(up, 15, "nginx")
        yield tmp
    finally:
        proc.kill()
        proc.wait(5)
        proc.stderr.close()
