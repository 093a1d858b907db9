"""`ipferry connect --gue`'s source ports: each inner flow leaves from the port its hash picks
(opened on first use), both directions of a flow alike, replies on any port are read, and a
fixed --gue-port is a single sender. Real UDP sockets on loopback."""

from __future__ import annotations

import os
import socket
import threading

import dpkt
import pytest

from ipferry.nsd import connect
from ipferry.wire import gue

CLIENT, SERVER = socket.inet_aton("10.0.0.1"), socket.inet_aton("198.18.0.1")


def packet(sport: int, dport: int = 80, *, reverse: bool = False) -> bytes:
    """A TCP packet of the flow CLIENT:sport -> SERVER:dport (``reverse``: the server's)."""
    src, dst = (SERVER, CLIENT) if reverse else (CLIENT, SERVER)
    if reverse:
        sport, dport = dport, sport
    return bytes(dpkt.ip.IP(src=src, dst=dst, p=6, ttl=64,
                            data=dpkt.tcp.TCP(sport=sport, dport=dport, flags=dpkt.tcp.TH_ACK)))


@pytest.fixture
def onramp():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


def received(onramp: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """(source port, inner packet) of ``count`` datagrams."""
    out = []
    for _ in range(count):
        datagram, peer = onramp.recvfrom(65536)
        out.append((peer[1], gue.decapsulate(datagram)[1]))
    return out


def test_each_flow_keeps_one_port_and_flows_spread_over_the_ports(onramp):
    t = connect.GueTunnel("127.0.0.1", onramp.getsockname()[1], b'{"tenant":"acme"}', ports=8)
    try:
        flows = range(40000, 40064)
        for _ in range(2):
            for sport in flows:
                t.send(packet(sport))
        seen = received(onramp, 2 * len(flows))
        port_of: dict[int, set[int]] = {}
        for port, inner in seen:
            port_of.setdefault(dpkt.ip.IP(inner).data.sport, set()).add(port)
        assert len(port_of) == len(flows) and all(len(p) == 1 for p in port_of.values())
        used = set().union(*port_of.values())
        assert len(used) == 8, used  # 64 flows over 8 ports: every port used
        for sport in flows:  # the same port as its flow's hash says, whoever computes it
            index = gue.flow_entropy(packet(sport)) % 8
            assert t.socks[index] is not None
            assert port_of[sport] == {t.socks[index].getsockname()[1]}

        # The daemon answers each flow on the port it came from: all are read.
        for sport in flows:
            onramp.sendto(gue.reply_header(4) + packet(sport, reverse=True),
                          ("127.0.0.1", next(iter(port_of[sport]))))
        back = {dpkt.ip.IP(t.recv(65536)).data.dport for _ in flows}
        assert back == set(flows)
    finally:
        t.close()


def test_shutdown_wakes_a_reader_waiting_on_every_port(onramp):
    t = connect.GueTunnel("127.0.0.1", onramp.getsockname()[1], b'{"tenant":"acme"}', ports=4)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(t.recv(65536)))
    reader.start()
    try:
        reader.join(0.2)
        assert reader.is_alive()  # waiting
        t.shutdown(socket.SHUT_RDWR)
        reader.join(5)
        assert not reader.is_alive() and got == [b""]
    finally:
        t.close()


def test_a_fixed_port_is_one_sender(onramp):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    t = connect.GueTunnel("127.0.0.1", onramp.getsockname()[1], b'{"tenant":"acme"}',
                          local_port=free, ports=32)
    try:
        for sport in range(40000, 40020):
            t.send(packet(sport))
        assert {port for port, _ in received(onramp, 20)} == {free}
        assert len(t.socks) == 1
    finally:
        t.close()


def test_out_of_fds_a_bucket_falls_back_to_the_first_port_for_good(onramp):
    import resource

    t = connect.GueTunnel("127.0.0.1", onramp.getsockname()[1], b'{"tenant":"acme"}', ports=16)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        # A limit with exactly 3 free fd numbers below it (a new fd takes the lowest free).
        taken = {int(fd) for fd in os.listdir("/proc/self/fd")}
        limit, free = 0, 0
        while free < 3:
            free += limit not in taken
            limit += 1
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        flows = range(40000, 40064)
        for _ in range(2):
            for sport in flows:
                t.send(packet(sport))  # never raises: the sender goes on
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        port_of: dict[int, set[int]] = {}
        for port, inner in received(onramp, 2 * len(flows)):
            port_of.setdefault(dpkt.ip.IP(inner).data.sport, set()).add(port)
        assert len(port_of) == len(flows) and all(len(p) == 1 for p in port_of.values())
        first = t.sock.getsockname()[1]
        used = set().union(*port_of.values())
        assert first in used and 1 < len(used) <= 5, used  # some opened, the rest on the first
        assert all(s is not None for s in t.socks)  # every bucket pinned
    finally:
        t.close()
