"""``ipferry connect`` against a tunnel end the test plays itself: raw IP both ways.

End to end: connect opens a real TUN (/dev/net/tun) in a fresh namespace, which takes root where
/dev/net/tun is not open to all (its distribution default is 0666). What needs no TUN is in
tests/nsd/test_connect.py.
"""

from __future__ import annotations

import json
import socket
import textwrap
import threading

import dpkt
import pytest

from ipferry.wire import vnet
from tests.e2e.tunnelend import TunnelEnd
from tests.nsd.test_connect import connect

UDP_ECHO_CLIENT = textwrap.dedent("""\
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(10)
    s.sendto(b"ping", ("198.18.0.1", 7))
    data, peer = s.recvfrom(100)
    print(data.decode(), peer[0], peer[1])
""")


def tunnel_end(path, seen: list, echo: bool):
    """Accept one tunnel; record the context and packets; answer UDP with a swapped packet."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(str(path))
    srv.listen(1)
    srv.settimeout(30)

    def serve():
        conn, _ = srv.accept()
        end = TunnelEnd(conn)
        try:
            first = end.first
            offload = first.startswith(vnet.TUNNEL_MAGIC)  # then a header before each packet
            seen.append(first)
            while True:
                try:
                    pkt = end.recv()
                except (TimeoutError, OSError):
                    return
                if not pkt:
                    return
                if offload:
                    pkt = pkt[vnet.HEADER_SIZE:]
                seen.append(pkt)
                ip = dpkt.ip.IP(pkt) if pkt[0] >> 4 == 4 else None
                if echo and ip is not None and ip.p == dpkt.ip.IP_PROTO_UDP:
                    udp = ip.data
                    reply = dpkt.ip.IP(src=ip.dst, dst=ip.src, p=17, ttl=64, data=dpkt.udp.UDP(
                        sport=udp.dport, dport=udp.sport, data=b"pong:" + udp.data))
                    reply.len = 20 + 8 + len(udp.data) + 5
                    reply.data.ulen = 8 + len(udp.data) + 5
                    end.send((vnet.PLAIN if offload else b"") + bytes(reply))
        finally:
            end.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


@pytest.mark.parametrize("offload", [True, False])
@pytest.mark.parametrize("attach", [True, False], ids=["attach", "no-attach"])
def test_packets_cross_both_ways_with_the_context_first(tmp_path, offload, attach):
    path = tmp_path / "tunnel.sock"
    seen: list[bytes] = []
    srv, t = tunnel_end(path, seen, echo=True)
    res = connect("--tunnel", str(path), "--tenant", "acme", "--context", '{"device": "d1"}',
                  "--source", "10.98.1.2", *([] if offload else ["--no-offload"]),
                  *([] if attach else ["--no-attach"]), "--",
                  "python3", "-c", UDP_ECHO_CLIENT)
    srv.close()
    t.join(10)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["pong:ping", "198.18.0.1", "7"]
    magic = vnet.TUNNEL_MAGIC if offload else b""
    assert seen[0].startswith(magic)
    assert json.loads(seen[0][len(magic):]) == {"device": "d1", "tenant": "acme"}
    udp = [dpkt.ip.IP(p) for p in seen[1:] if p[0] >> 4 == 4]
    udp = [ip for ip in udp if ip.p == 17]
    assert len(udp) == 1
    assert socket.inet_ntoa(udp[0].src) == "10.98.1.2"
    assert socket.inet_ntoa(udp[0].dst) == "198.18.0.1"
    assert udp[0].data.data == b"ping"


def test_exit_status_is_the_commands(tmp_path):
    path = tmp_path / "tunnel.sock"
    srv, t = tunnel_end(path, [], echo=False)
    res = connect("--tunnel", str(path), "--", "sh", "-c", "exit 7")
    srv.close()
    assert res.returncode == 7, res.stderr
