"""Offload: TSO superframes through connect and the worker TUNs, and the mixed settings."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest

from tests.e2e.dataplane import SERVER_ADDR, STREAM_PORT, STREAMS, config, connect
from tests.e2e.streams import pattern
from tests.helpers import wait_for

SIZE = 20 << 20


def expected_sha256(size: int) -> str:
    h, block = hashlib.sha256(), pattern(1 << 22)
    for _ in range(size // len(block)):
        h.update(block)
    return h.hexdigest()


@pytest.mark.parametrize("daemon_offload,client_offload", [(False, True), (True, False)],
                         ids=["plain-tun-vnet-client", "vnet-tun-plain-client"])
def test_mixed_offload_settings_carry_data_intact(daemon_factory, streams, tmp_path,
                                                  daemon_offload, client_offload):
    """A superframe meets a TUN without offload (cut in software, namespace MTU 1500), and
    the kernel's superframes meet a plain tunnel (cut to the client's MSS)."""
    extra = "" if daemon_offload else "[namespace]\nmtu = 1500\noffload = false\n"
    d = daemon_factory("--workers", "1", config=config(tmp_path, extra))
    options = [] if client_offload else ["--no-offload"]
    for mode, key in (("get", "sha256"), ("put", "server_sha256")):
        res = connect(d, "python3", STREAMS, mode, SERVER_ADDR, str(STREAM_PORT), str(SIZE),
                      mtu=1500, options=options)
        assert res.returncode == 0, res.stderr.decode()[-2000:]
        assert json.loads(res.stdout)[key] == expected_sha256(SIZE), mode


def test_tunnels_say_whether_they_carry_superframes(daemon_factory, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path))
    runs = [threading.Thread(target=connect, args=(d, "sleep", "3"), kwargs={"options": o})
            for o in ([], ["--no-offload"])]
    for t in runs:
        t.start()
    try:
        tunnels = wait_for(lambda: (t := d.get_json("/api/tunnels")) and len(t) == 2 and t, 10,
                           "two tunnels")
        assert sorted(t["offload"] for t in tunnels) == [False, True]
    finally:
        for t in runs:
            t.join(30)
