"""A zero-length datagram on a connected tunnel is dropped and counted (``empty_datagram``): it
is not the end of the tunnel, which only the client's close (or shutdown) is."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import threading

from tests.e2e.dataplane import SERVER_ADDR, STREAM_PORT, STREAMS, config, counter, drops
from tests.e2e.streams import pattern
from tests.e2e.test_tunnels import open_tunnel
from tests.helpers import IPFERRY, NO_CAPS, wait_for

READ_SIZE = 65536 + 64


class EmptyInjector:
    """A SEQPACKET relay between ``ipferry connect`` and the daemon's tunnel on-ramp that slips
    a zero-length datagram in before every ``every``-th datagram from the client (the context
    excepted), so each one has traffic behind it."""

    def __init__(self, path: str, upstream: str, every: int) -> None:
        self.upstream, self.every = upstream, every
        self.injected = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(path)
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        daemon = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        daemon.connect(self.upstream)
        back = threading.Thread(target=self._pump, args=(daemon, client, False), daemon=True)
        back.start()
        self._pump(client, daemon, True)
        back.join(10)
        client.close()
        daemon.close()

    def _pump(self, src: socket.socket, dst: socket.socket, inject: bool) -> None:
        n = 0
        while True:
            try:
                data = src.recv(READ_SIZE)
            except OSError:
                data = b""
            if not data:  # neither connect nor the daemon ever sends an empty datagram
                break
            try:
                if inject and n and n % self.every == 0:
                    dst.send(b"")
                    self.injected += 1
                dst.send(data)
            except OSError:
                break
            n += 1
        for s in (dst, src):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


def tunnels_closed(d) -> dict[str, float]:
    return counter(d, "ipferry_tunnels_closed_total", "reason")


def test_empty_datagrams_do_not_close_a_tunnel(daemon_factory, streams, tmp_path):
    d = daemon_factory("--workers", "2", config=config(tmp_path))
    # A bare tunnel: its context, then an empty datagram, which must leave it open.
    s = open_tunnel(d, b'{"tenant": "acme"}')
    wait_for(lambda: len(d.get_json("/api/tunnels")) == 1, 10, "the tunnel to open")
    s.send(b"")
    wait_for(lambda: drops(d).get("empty_datagram") == 1, 10, "the empty datagram counted")
    assert len(d.get_json("/api/tunnels")) == 1
    assert "closed_by_peer" not in tunnels_closed(d)
    s.close()
    wait_for(lambda: tunnels_closed(d).get("closed_by_peer") == 1, 10, "the close seen")
    assert drops(d).get("empty_datagram") == 1

    # An empty first datagram is an empty context, which the default application refuses.
    s = open_tunnel(d, b"")
    s.settimeout(5)
    assert s.recv(100) == b""
    s.close()
    assert tunnels_closed(d).get("bad_context") == 1

    # A transfer through ipferry connect with empty datagrams slipped into its tunnel.
    relay = EmptyInjector(str(tmp_path / "relay.sock"), str(d.runtime_dir / "tunnel.sock"), 4)
    try:
        # (--no-attach: the packets cross the tunnel socket, where the empty datagrams go)
        res = subprocess.run([*NO_CAPS, IPFERRY, "connect", "--tunnel", str(tmp_path / "relay.sock"),
                              "--no-attach", "--tenant", "acme", "--", "python3", STREAMS, "put", SERVER_ADDR,
                              str(STREAM_PORT), str(16 << 20)],
                             capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    finally:
        relay.close()
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    got = json.loads(res.stdout)
    assert got["server_sha256"] == hashlib.sha256(pattern(16 << 20)).hexdigest(), got
    assert relay.injected >= 10
    wait_for(lambda: drops(d).get("empty_datagram") == 1 + relay.injected, 10,
             f"{relay.injected} more empty datagrams counted")
    # The tunnel ended once, at the end, by the client's close.
    wait_for(lambda: tunnels_closed(d).get("closed_by_peer") == 2, 10, "the relay's tunnel closed")
    assert [w["restarts"] for w in d.workers()] == [0, 0]
