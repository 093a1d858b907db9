"""``ipferry top`` against a real daemon in the test's namespace, with a TCP stream flowing
through it: ``--once`` into a pipe, and the live view in a pseudo-terminal."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import socket
import struct
import subprocess
import termios
import time

from tests.e2e.dataplane import SERVER_ADDR, STREAM_PORT
from tests.helpers import IPFERRY, NO_CAPS, wait_for

# Inside `ipferry connect`: a PUT to the stream server that sends about 1.5 MiB/s for SECONDS.
CLIENT = f"""
import socket, sys, time
s = socket.create_connection(("{SERVER_ADDR}", {STREAM_PORT}), timeout=30)
s.sendall(b"PUT 1000000000000\\n")
print("flowing", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    s.sendall(b"x" * 16384)
    time.sleep(0.01)
s.close()
"""
ANSI = re.compile(rb"\x1b(\[[0-9;?]*[a-zA-Z]|[()][0-9A-B])")


def env(daemon) -> dict[str, str]:
    return {"RUNTIME_DIRECTORY": str(daemon.runtime_dir), "PATH": "/usr/bin:/bin"}


def start_traffic(daemon, seconds: int = 60) -> subprocess.Popen:
    """A client streaming to the upstream server through the daemon's tunnel, once its bytes
    show in /api/flows (killed by the caller)."""
    proc = subprocess.Popen([*NO_CAPS, IPFERRY, "connect", "--tunnel",
                             str(daemon.runtime_dir / "tunnel.sock"), "--tenant", "acme", "--",
                             "python3", "-c", CLIENT, str(seconds)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else b""
        if line.strip() != b"flowing":
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"the client did not start streaming: {line!r} {err[-2000:]!r}")

        def streaming() -> bool:
            flows = daemon.get_json("/api/flows?tenant=acme")["flows"]
            return any(f["dport"] == STREAM_PORT and f["payload_bytes"][0] > 100_000
                       for f in flows)

        wait_for(streaming, 20, "the client's bytes in /api/flows")
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return proc


def bad_packets(daemon, count: int) -> None:
    """``count`` datagrams that are no IP packet (version 0) over a raw tunnel: bad_version."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(daemon.runtime_dir / "tunnel.sock"))
        s.send(json.dumps({"tenant": "probe"}).encode())
        for _ in range(count):
            s.send(bytes(40))
        time.sleep(0.2)  # the worker reads them before the close


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(10)


def rate_bytes(text: str) -> float:
    value, unit = text.removesuffix("/s").split()
    return float(value) * {"B": 1, "KiB": 1024, "MiB": 1 << 20, "GiB": 1 << 30}[unit]


def test_top_once_shows_the_busy_flow_and_the_drops(daemon_factory, streams):
    d = daemon_factory("--workers", "2")
    traffic = start_traffic(d)
    try:
        bad_packets(d, 3)
        wait_for(lambda: d.metrics().get(("ipferry_drops_total",
                                          (("reason", "bad_version"), ("worker", "0")))) or
                 d.metrics().get(("ipferry_drops_total",
                                  (("reason", "bad_version"), ("worker", "1")))), 10,
                 "the bad_version drops in /metrics")
        started = time.monotonic()
        res = subprocess.run([IPFERRY, "top", "--once", "--interval", "1", "--limit", "5"],
                             capture_output=True, text=True, timeout=60, env=env(d))
        took = time.monotonic() - started
        assert res.returncode == 0, res
        assert res.stderr == ""
        out = res.stdout
        assert "\x1b" not in out, "escape codes in --once output into a pipe"
        assert 1 <= took < 30
        lines = out.splitlines()
        assert lines[0].startswith("ready: nsd ready, 2/2 workers ready (supervisor pid "), out
        assert re.search(r"; rates over \d+\.\ds$", lines[1]), out
        for w in (0, 1):
            assert re.search(rf"^ *{w} +\d+ +ready +0 ", out, re.M), out

        assert re.search(r"^bad_version +3 ", out, re.M), out
        assert re.search(r"^ *\d +\d+ +tunnel +tunnel +acme ", out, re.M), out  # connect's tunnel

        head = next((i for i, line in enumerate(lines)
                     if re.fullmatch(r"flows: busiest \d+ of \d+ by byte rate", line)), None)
        assert head is not None, f"no flows section:\n{out}"
        assert lines[head + 1].split() == ["TENANT", "PROTO", "SOURCE", "DESTINATION", "STATE",
                                           "WORKER", "RATE", "UP/S", "DOWN/S", "PKT/S", "BYTES",
                                           "AGE"]
        m = re.match(rf"^acme +tcp +10\.98\.\d+\.\d+:\d+ +{re.escape(SERVER_ADDR)}:{STREAM_PORT} "
                     r"+established +[01] +(\S+ \S+/s) +(\S+ \S+/s) +(\S+ \S+/s) ", lines[head + 2])
        assert m, out
        rate, up, down = (rate_bytes(g) for g in m.groups())
        assert 100 * 1024 < rate == up, out  # the client sends about 1.5 MiB/s
        assert down < 1024, out

        res = subprocess.run([IPFERRY, "top", "--once", "--interval", "0", "--sort", "duration",
                              "--tenant", "nobody"], capture_output=True, text=True, timeout=60,
                             env=env(d))
        assert res.returncode == 0, res
        assert "one sample: no rates" in res.stdout and "flows: none of tenant nobody" in \
            res.stdout.splitlines(), res.stdout
    finally:
        stop(traffic)


def test_top_live_view_sorts_on_keys_and_quits(daemon_factory, streams):
    d = daemon_factory("--workers", "1")
    traffic = start_traffic(d)
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 200, 0, 0))  # rows, columns
    try:
        proc = subprocess.Popen([IPFERRY, "top", "--interval", "0.5"], stdin=slave, stdout=slave,
                                stderr=subprocess.PIPE, env={**env(d), "TERM": "xterm"})
        screen = bytearray()

        def shows(text: str) -> bool:
            while select.select([master], [], [], 0.05)[0]:
                try:
                    screen.extend(os.read(master, 1 << 16))
                except OSError:
                    break
            return text.encode() in ANSI.sub(b"", bytes(screen))

        try:
            where = f"{SERVER_ADDR}:{STREAM_PORT}"
            wait_for(lambda: shows(where) and shows("rates over"), 20,
                     f"the flow to {where} with rates on the screen")
            assert shows(" by byte rate")
            os.write(master, b"d")
            wait_for(lambda: shows("by duration"), 10, "the view sorted by duration")
            os.write(master, b"q")
            assert proc.wait(10) == 0
            shows("")
            assert b"\x1b[?1049l" in screen  # the alternate screen left behind
            assert proc.stderr.read() == b""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            proc.stderr.close()
    finally:
        os.close(slave)
        os.close(master)
        stop(traffic)
