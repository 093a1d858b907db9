"""``ipferry connect`` notices the daemon closing its tunnel however the close shows first: as EOF
on the reading side, or as EPIPE/ECONNRESET on the sending side (a worker restarted while the
command sends fast). Either way it ends the command, says why and exits non-zero (issue #9)."""

from __future__ import annotations

import subprocess
import textwrap
import time

from tests.e2e.conftest import UDP_ECHO_PORT
from tests.e2e.dataplane import SERVER_ADDR
from tests.helpers import IPFERRY, NO_CAPS, wait_for

# A datagram every 0.5 ms for 20 s: the tunnel's send side is busy when the worker goes.
SENDER = textwrap.dedent(f"""\
    import socket, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    end = time.monotonic() + 20
    while time.monotonic() < end:
        try:
            s.sendto(b"x" * 64, ("{SERVER_ADDR}", {UDP_ECHO_PORT}))
        except OSError:
            pass
        time.sleep(0.0005)
""")
TRIALS = 4


def test_connect_ends_its_command_when_a_restart_closes_a_busy_tunnel(daemon_factory,
                                                                       udp_servers, tmp_path):
    d = daemon_factory("--workers", "1")
    for trial in range(TRIALS):
        pid = d.workers()[0]["pid"]
        proc = subprocess.Popen(
            [*NO_CAPS, IPFERRY, "connect", "--tunnel", str(d.runtime_dir / "tunnel.sock"),
             "--tenant", "acme", "--", "python3", "-c", SENDER],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            time.sleep(2)
            assert proc.poll() is None, proc.communicate()
            status, body = d.request("POST", "/api/workers/0/restart")
            assert status in (200, 202), body
            restarted = time.monotonic()
            try:
                _, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"trial {trial}: connect ran on with a closed tunnel") from None
            took = time.monotonic() - restarted
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 1, (trial, proc.returncode, err)
        assert err.decode().strip() == (
            "ipferry connect: the daemon closed the tunnel (it stopped, or the tunnel failed; "
            "see its log)"), (trial, err)
        assert took < 5, (trial, took)  # the worker's graceful stop, then a fraction of a second
        wait_for(lambda old=pid: (w := d.workers()[0])["state"] == "ready"
                 and w["pid"] != old, 20,
                 "the restarted worker")
