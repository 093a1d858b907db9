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


def test_forged_virtio_headers_are_dropped_and_honest_ones_answered(daemon_factory, streams,
                                                                    tmp_path):
    """A vnet tunnel's header steers the kernel and the worker's software GSO: one that lies
    about the packet is dropped and counted, nothing else is touched."""
    import socket
    import struct

    import dpkt

    from ipferry.wire import vnet
    from tests.e2e.dataplane import drops

    d = daemon_factory("--workers", "1", config=config(tmp_path))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    s.connect(str(d.runtime_dir / "tunnel.sock"))
    s.send(vnet.TUNNEL_MAGIC + b'{"tenant": "acme"}')

    def syn(sport: int, payload: bytes = b"") -> bytes:
        tcp = dpkt.tcp.TCP(sport=sport, dport=STREAM_PORT, flags=dpkt.tcp.TH_SYN, data=payload)
        return bytes(dpkt.ip.IP(src=b"\x0a\x62\x09\x09", dst=bytes([198, 18, 0, 1]), p=6, ttl=64,
                                data=tcp))

    lies = [struct.pack("<BBHHHH", vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 40, 1, 20, 16),
            struct.pack("<BBHHHH", vnet.NEEDS_CSUM, 0, 0, 0, 22, 0),
            struct.pack("<BBHHHH", vnet.NEEDS_CSUM, 0, 0, 0, 60000, 16)]
    with s:
        for i, lie in enumerate(lies):
            s.send(lie + syn(41000 + i, bytes(3000)))
        s.send(vnet.PLAIN + syn(42000))
        reply = s.recv(65600)
        header, packet = reply[:vnet.HEADER_SIZE], dpkt.ip.IP(reply[vnet.HEADER_SIZE:])
        assert packet.data.dport == 42000 and packet.data.flags & dpkt.tcp.TH_SYN
        assert len(header) == vnet.HEADER_SIZE
    assert drops(d)["bad_vnet_header"] == len(lies)
    assert d.ready()  # the worker took it all in its stride


def test_random_headers_and_packets_on_a_vnet_tunnel_disturb_nothing(daemon_factory, streams,
                                                                     tmp_path):
    """3,000 datagrams of random virtio-net headers in front of real and broken packets, from
    a vnet tunnel, while a transfer runs through another one: the transfer is intact, every
    datagram is handled or counted, and no exception reaches the workers' loops."""
    import random
    import socket
    import struct

    import dpkt

    from ipferry.wire import vnet
    from tests.e2e.dataplane import drops, stream_client

    d = daemon_factory("--workers", "2", config=config(tmp_path))
    rng = random.Random(4321)

    def datagram() -> bytes:
        tcp = dpkt.tcp.TCP(sport=rng.randrange(1024, 65535), dport=STREAM_PORT,
                           flags=rng.choice([dpkt.tcp.TH_SYN, dpkt.tcp.TH_ACK]),
                           data=bytes(rng.randrange(0, 3000)))
        packet = bytes(dpkt.ip.IP(src=b"\x0a\x62\x09\x0a", dst=bytes([198, 18, 0, 1]), p=6,
                                  ttl=64, data=tcp))
        if rng.random() < 0.3:
            packet = packet[:rng.randrange(len(packet))]
        header = struct.pack("<BBHHHH", rng.choice([0, 1, 2, 3, 0x40]),
                             rng.choice([0, 1, 3, 4, 0x81, 0x7F]), rng.randrange(65536),
                             rng.choice([0, 1, 100, 536, 1448, 65535]),
                             rng.choice([0, 20, 22, 40, 65535]), rng.choice([0, 6, 16, 65535]))
        # (never empty: an empty datagram is how SEQPACKET says the tunnel closed)
        return header + packet if rng.random() < 0.95 else header[:rng.randrange(1, 10)]

    result: dict = {}

    def transfer():
        try:
            result.update(stream_client(d, "get", 20 << 20, timeout=90))
        except AssertionError as exc:
            result["error"] = str(exc)[-300:]

    t = threading.Thread(target=transfer)
    t.start()
    noisy = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    noisy.connect(str(d.runtime_dir / "tunnel.sock"))
    noisy.send(vnet.TUNNEL_MAGIC + b'{"tenant": "noise"}')
    for _ in range(3000):
        noisy.send(datagram())
    t.join(120)
    noisy.close()
    assert result.get("bytes") == 20 << 20, (result, d.logs()[-3000:], drops(d))
    assert result["sha256"] == expected_sha256(20 << 20)
    assert drops(d).get("bad_vnet_header", 0) > 100
    assert not [e for e in d.log_events() if e.get("event") == "loop_exception"]
    assert [w["restarts"] for w in d.workers()] == [0, 0]
