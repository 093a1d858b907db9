"""Shared pieces of the data-path tests: the upstream servers and the client side."""

from __future__ import annotations

import json
import socket
import subprocess
import textwrap
from pathlib import Path

from tests.helpers import IPFERRY, NO_CAPS

SERVER_ADDR = "198.18.0.1"  # benchmark range, on the test namespace's own loopback
SERVER_ADDR6 = "fd18::1"  # a unique local address, on the same loopback
STREAMS = str(Path(__file__).with_name("streams.py"))
DATAGRAMS = str(Path(__file__).with_name("datagrams.py"))
STREAM_PORT = 9000


def add_server_address(netns) -> None:
    # Idempotent: a second fixture may have added them.
    subprocess.run(["ip", "-n", netns.name, "addr", "add", f"{SERVER_ADDR}/32", "dev", "lo"],
                   capture_output=True)
    subprocess.run(["ip", "-n", netns.name, "-6", "addr", "add", f"{SERVER_ADDR6}/128", "dev",
                    "lo", "nodad"], capture_output=True)


def can_connect(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def connect(daemon, *cmd: str, tenant: str = "acme", context: str | None = None,
            address: str | None = None, timeout: float = 120, gue: str | None = None,
            mtu: int | None = None, no_caps: bool = True,
            options: list[str] | tuple = ()) -> subprocess.CompletedProcess:
    """Run ``cmd`` inside ``ipferry connect`` (no capabilities) against ``daemon``'s tunnel, or
    its GUE on-ramp at ``gue`` (then from inside the daemon's namespace, where it listens)."""
    extra = ["--context", context] if context else []
    extra += ["--source", address] if address else []  # (a fixed source: no route claimed)
    extra += ["--mtu", str(mtu)] if mtu else []
    extra += list(options)
    where = ["--gue", gue] if gue else ["--tunnel", str(daemon.runtime_dir / "tunnel.sock")]
    enter = ["nsenter", f"--net={daemon.netns.path}"] if gue else []
    drop = NO_CAPS if no_caps else []
    return subprocess.run([*enter, *drop, IPFERRY, "connect", *where, "--tenant", tenant,
                           *extra, "--", *cmd], capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def stream_client(daemon, mode: str, *args, port: int = STREAM_PORT, tenant: str = "acme",
                  address: str | None = None, timeout: float = 240, server: str = SERVER_ADDR,
                  gue: str | None = None, mtu: int | None = None, options=()) -> dict:
    res = connect(daemon, "python3", STREAMS, mode, server, str(port), *map(str, args),
                  tenant=tenant, address=address, timeout=timeout, gue=gue, mtu=mtu,
                  options=options)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    return json.loads(res.stdout)


def drops(daemon) -> dict[str, float]:
    """ipferry_drops_total by reason, summed over workers."""
    return counter(daemon, "ipferry_drops_total", "reason")


def counter(daemon, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (metric, labels), v in daemon.metrics().items():
        if metric == name:
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0) + v
    return out


def audit_records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def config(tmp_path, extra: str = "") -> str:
    """A daemon config with the audit stream in tmp_path/audit.jsonl, plus ``extra``."""
    return textwrap.dedent(f"""\
        [audit]
        sink = "{tmp_path / 'audit.jsonl'}"
        """) + extra


def syn_flood(tunnel_path, count: int, tenant: str = "acme", dport: int = STREAM_PORT):
    """``count`` SYNs to SERVER_ADDR:``dport`` from distinct sources, over one raw tunnel that
    is left open (closing it ends its flows): the caller closes it, and may :func:`read_all` the
    answers meanwhile."""
    import time

    import dpkt
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(tunnel_path))
    s.send(json.dumps({"tenant": tenant}).encode())
    s.setblocking(False)
    dst = socket.inet_aton(SERVER_ADDR)
    try:
        for i in range(count):
            src = bytes([10, 9, (i >> 16) & 0xFF, 2 + (i >> 14 & 3)])
            syn = bytes(dpkt.ip.IP(src=src, dst=dst, p=6, ttl=64, data=dpkt.tcp.TCP(
                sport=1024 + i % 60000, dport=dport, flags=dpkt.tcp.TH_SYN, seq=i)))
            while True:
                try:
                    s.send(syn)
                    break
                except BlockingIOError:
                    read_all(s)  # the resets coming back: keep our receive side moving
                    time.sleep(0.0005)
    except BaseException:
        s.close()
        raise
    return s


def read_all(s: socket.socket) -> None:
    """Read (and forget) what waits on a non-blocking tunnel socket."""
    try:
        while s.recv(65536):
            pass
    except BlockingIOError:
        pass
