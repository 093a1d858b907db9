"""A worker never promises more flows than its fd limit holds: ``flows.max_per_worker`` is capped
at what the limit allows (six fds a relayed TCP flow), said once in the log with the fix, and the
flows past it are refused as past any limit, instead of failing on EMFILE."""

from __future__ import annotations

import socket
import subprocess

import dpkt

from tests.e2e.dataplane import SERVER_ADDR, STREAM_PORT, config, counter
from tests.helpers import wait_for

FD_LIMIT = 1000
BUDGET = (FD_LIMIT - 256) // 6  # worker.__main__.FD_RESERVE, FDS_PER_FLOW


def test_the_fd_limit_caps_the_flows_a_worker_takes(daemon_factory, streams, tmp_path, netns):
    subprocess.run(["ip", "netns", "exec", netns.name, "sysctl", "-qw",
                    "net.core.somaxconn=4096"], check=True)
    d = daemon_factory("--workers", "1", config=config(tmp_path),
                       sh_prefix=f"ulimit -n {FD_LIMIT};")
    [capped] = [e for e in d.log_events() if e.get("event") == "flow_limit_capped"]
    assert capped["capped_to"] == BUDGET and capped["max_per_worker"] == 100_000  # the default
    assert "LimitNOFILE" in capped["fix"]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(d.runtime_dir / "tunnel.sock"))
    s.send(b'{"tenant": "acme"}')
    try:
        dst = socket.inet_aton(SERVER_ADDR)
        for i in range(BUDGET + 50):
            s.send(bytes(dpkt.ip.IP(src=bytes([10, 9, i >> 8, i & 0xFF]), dst=dst, p=6, ttl=64,
                                    data=dpkt.tcp.TCP(sport=40000, dport=STREAM_PORT,
                                                      flags=dpkt.tcp.TH_SYN, seq=i))))
        wait_for(lambda: counter(d, "ipferry_drops_total", "reason").get("flow_limit_worker")
                 == 50, 10, "the SYNs past the budget to be refused")
        assert d.get_json("/api/flows")["total"] == BUDGET
        # Every flow within the budget got its off-ramp: no fd ran out, nothing failed inside.
        drops = counter(d, "ipferry_drops_total", "reason")
        assert "internal_error" not in drops and \
            counter(d, "ipferry_upstream_failures_total", "reason") == {}
    finally:
        s.close()
