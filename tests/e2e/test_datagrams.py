"""UDP and ICMP flows, IPv6 end to end, fragments and PMTU: through `ipferry connect`."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys

import dpkt
import pytest

from tests.e2e.conftest import DNS_PORT, UDP_ECHO_PORT
from tests.e2e.dataplane import (
    DATAGRAMS,
    SERVER_ADDR,
    SERVER_ADDR6,
    audit_records,
    config,
    connect,
    counter,
    drops,
    stream_client,
)
from tests.helpers import wait_for


def datagram_client(d, *args: str, linger: float = 0) -> dict:
    """Run a datagrams.py client in ``ipferry connect``; ``linger``: keep the tunnel that long."""
    cmd = [sys.executable, DATAGRAMS, *args]
    if linger:
        cmd = ["sh", "-c", f'"$0" "$@" && sleep {linger}', *cmd]
    res = connect(d, *cmd)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    return json.loads(res.stdout)


@pytest.mark.parametrize("server", [SERVER_ADDR, SERVER_ADDR6], ids=["ipv4", "ipv6"])
def test_ten_thousand_udp_datagrams_echo_intact(daemon_factory, udp_servers, tmp_path, server):
    d = daemon_factory("--workers", "2", config=config(tmp_path))
    out = datagram_client(d, "echo", server, str(UDP_ECHO_PORT), "10000")
    assert out == {"sent": 10000, "received": 10000, "corrupt": 0, "lost": 0}
    # The tunnel closed with the command: its flow ended then, with all it carried.
    [end] = wait_for(lambda: [r for r in audit_records(tmp_path / "audit.jsonl")
                              if r["audit"] == "flow_end"], 10, "the flow's end")
    assert (end["protocol"], end["dst"], end["close_reason"]) == ("udp", server, "tunnel_closed")
    assert end["packets"] == [10000, 10000]


def test_dns_query_resolves_and_the_flow_ends_idle_with_its_audit(daemon_factory, udp_servers,
                                                                   tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path, "[flows]\nudp_replied = 1\n"))
    out = datagram_client(d, "dns", SERVER_ADDR, str(DNS_PORT), "www.ipferry.test", linger=3)
    assert out == {"answers": ["192.0.2.7"], "id_matches": True}
    end = wait_for(lambda: [r for r in audit_records(tmp_path / "audit.jsonl")
                            if r["audit"] == "flow_end" and r["protocol"] == "udp"], 10,
                   "the DNS flow's end")[0]
    assert end["close_reason"] == "idle_timeout" and end["dport"] == DNS_PORT
    assert end["packets"] == [1, 1] and end["payload_bytes"][0] > 20


@pytest.mark.parametrize("server", [SERVER_ADDR, SERVER_ADDR6], ids=["ipv4", "ipv6"])
def test_udp_to_a_closed_port_is_refused(daemon_factory, udp_servers, tmp_path, server):
    d = daemon_factory("--workers", "1", config=config(tmp_path))
    assert datagram_client(d, "refused", server, "9") == {"outcome": "refused"}
    assert counter(d, "ipferry_icmp_errors_sent_total", "kind").get("port", 0) >= 1


def test_denied_udp_gets_admin_prohibited(daemon_factory, udp_servers, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path, f"""
[[rules]]
name = "no-udp-echo"
action = "deny"
protocol = "udp"
ports = "{UDP_ECHO_PORT}"
"""))
    # A connected UDP socket reports "administratively prohibited" as EHOSTUNREACH.
    res = connect(d, sys.executable, "-c", f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.connect(("{SERVER_ADDR}", {UDP_ECHO_PORT}))
s.send(b"x")
try:
    s.recv(10)
except OSError as e:
    print(e.errno)
""")
    assert res.stdout.strip() == b"113", res  # EHOSTUNREACH
    assert counter(d, "ipferry_icmp_errors_sent_total", "kind")["admin"] == 1


def allow_ping(netns) -> None:
    subprocess.run(["ip", "netns", "exec", netns.name, "sysctl", "-qw",
                    "net.ipv4.ping_group_range=0 2147483647"], check=True)


# iputils ping calls setuid(getuid()), which fails in a user namespace with no uid mapped: the
# namespace `ipferry connect` makes when run by root *without* capabilities (Linux >= 5.12 wants
# CAP_SETFCAP to map uid 0). A normal user, or root with capabilities, gets a mapped uid: the
# ping tests run `connect` as root; the daemon still runs with no capabilities.
PING_CLIENT = {"no_caps": False}


def test_ping_and_ping6_get_replies(daemon_factory, netns, udp_servers, tmp_path):
    allow_ping(netns)  # the daemon runs as uid/gid 0 without capabilities: ping sockets
    d = daemon_factory("--workers", "2", config=config(tmp_path))
    for cmd in (["ping", "-c", "3", "-i", "0.2", "-W", "2", SERVER_ADDR],
                ["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", SERVER_ADDR6]):
        res = connect(d, *cmd, **PING_CLIENT)
        assert res.returncode == 0 and b"3 received" in res.stdout, res
    ends = wait_for(lambda: (e := [r for r in audit_records(tmp_path / "audit.jsonl")
                                   if r["audit"] == "flow_end"]) and len(e) == 2 and e, 10, "ends")
    assert sorted(e["dst"] for e in ends) == sorted([SERVER_ADDR, SERVER_ADDR6])
    assert all(e["protocol"] == "icmp" and e["packets"] == [3, 3] for e in ends), ends


def test_ping_without_ping_sockets_says_why(daemon_factory, netns, udp_servers, tmp_path):
    subprocess.run(["ip", "netns", "exec", netns.name, "sysctl", "-qw",
                    "net.ipv4.ping_group_range=1 0"], check=True)  # nobody (a kernel default)
    d = daemon_factory("--workers", "1", config=config(tmp_path))
    res = connect(d, "ping", "-c", "2", "-i", "0.2", "-W", "1", SERVER_ADDR, **PING_CLIENT)
    assert res.returncode != 0 and b"0 received" in res.stdout, res
    assert drops(d)["icmp_not_permitted"] == 2
    [event] = [e for e in d.log_events() if e.get("event") == "ping_not_permitted"]
    assert "ping_group_range" in event["fix"]


def test_ipv6_http_through_the_tunnel(daemon_factory, upstream6, tmp_path):
    (upstream6 / "hello.txt").write_bytes(b"hello over IPv6\n" * 1000)
    d = daemon_factory("--workers", "2", config=config(tmp_path))
    res = connect(d, "curl", "-sS", "-g", "--max-time", "10", f"http://[{SERVER_ADDR6}]:8080/hello.txt")
    assert res.returncode == 0 and res.stdout == b"hello over IPv6\n" * 1000, res.stderr
    start = [r for r in audit_records(tmp_path / "audit.jsonl") if r["audit"] == "flow_start"]
    assert start and start[0]["dst"] == SERVER_ADDR6 and start[0]["decision"] == "upgrade"


@pytest.mark.parametrize("workers", [1, 2])
def test_ipv6_100mb_both_ways_intact(daemon_factory, streams6, tmp_path, workers):
    from tests.e2e.streams import pattern
    d = daemon_factory("--workers", str(workers), config=config(tmp_path))
    size = 100 << 20
    expected = hashlib.sha256()
    block = pattern(1 << 22)
    for _ in range(size // len(block)):
        expected.update(block)
    down = stream_client(d, "get", size, server=SERVER_ADDR6)
    assert down["bytes"] == size and down["sha256"] == expected.hexdigest()
    up = stream_client(d, "put", size, server=SERVER_ADDR6)
    assert up["server_sha256"] == expected.hexdigest()
    ends = wait_for(lambda: (e := [r for r in audit_records(tmp_path / "audit.jsonl")
                                   if r["audit"] == "flow_end"]) and len(e) == 2 and e, 10, "ends")
    assert sorted(e["payload_bytes"][1] for e in ends)[1] == size


def raw_tunnel(d) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    s.connect(str(d.runtime_dir / "tunnel.sock"))
    s.send(b'{"tenant": "acme"}')
    return s


def test_fragments_and_ipv6_extension_headers_are_dropped_and_counted(daemon_factory, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path))
    tcp = dpkt.tcp.TCP(sport=40000, dport=9000, flags=dpkt.tcp.TH_SYN)
    frag4 = dpkt.ip.IP(src=b"\x0a\0\0\x01", dst=socket.inet_aton(SERVER_ADDR), p=6, ttl=64,
                       data=tcp, mf=1)
    v6 = dict(src=socket.inet_pton(socket.AF_INET6, "fd98::1"),
              dst=socket.inet_pton(socket.AF_INET6, SERVER_ADDR6), hlim=64)
    frag6 = bytes(dpkt.ip6.IP6(nxt=44, plen=8 + 20, **v6)) + bytes([6, 0, 0, 1, 0, 0, 0, 1]) + bytes(tcp)
    ah6 = bytes(dpkt.ip6.IP6(nxt=51, plen=16 + 20, **v6)) + bytes([6, 2]) + bytes(14) + bytes(tcp)
    with raw_tunnel(d) as s:
        for packet in (bytes(frag4), frag6, ah6):
            s.send(packet)
        wait_for(lambda: drops(d).get("fragment") == 2 and drops(d).get("ipv6_ext_header") == 1,
                 5, "the drops")


def test_too_big_for_the_path_gets_fragmentation_needed(daemon_factory, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path, "[namespace]\nmtu = 9000\n"))
    big = dpkt.tcp.TCP(sport=40000, dport=9000, flags=dpkt.tcp.TH_SYN, data=bytes(9500))
    v4 = dpkt.ip.IP(src=b"\x0a\0\0\x01", dst=socket.inet_aton(SERVER_ADDR), p=6, ttl=64,
                    data=big, df=1)
    v6 = dpkt.ip6.IP6(src=socket.inet_pton(socket.AF_INET6, "fd98::1"), nxt=6, hlim=64,
                      dst=socket.inet_pton(socket.AF_INET6, SERVER_ADDR6), data=big, plen=len(big))
    with raw_tunnel(d) as s:
        s.send(bytes(v4))
        icmp = dpkt.ip.IP(s.recv(65535)).data
        assert (icmp.type, icmp.code) == (3, 4) and int.from_bytes(bytes(icmp)[6:8], "big") == 9000
        s.send(bytes(v6))
        icmp6 = dpkt.ip6.IP6(s.recv(65535)).data
        assert icmp6.type == 2 and int.from_bytes(bytes(icmp6)[4:8], "big") == 9000
    assert counter(d, "ipferry_icmp_errors_sent_total", "kind")["too_big"] == 2


def _icmp4(src: bytes, dst: bytes, type_: int, code: int, rest: bytes, embedded: bytes) -> bytes:
    from ipferry.wire.checksum import checksum
    message = bytearray(bytes([type_, code, 0, 0]) + rest + embedded)
    message[2:4] = checksum(bytes(message)).to_bytes(2, "big")
    return bytes(dpkt.ip.IP(src=src, dst=dst, p=1, ttl=64, data=bytes(message)))


def _recv_from(s: socket.socket, proto: int, sport: int, seconds: float = 5):
    """The next packet from the tunnel of ``proto`` from port ``sport`` (others skipped)."""
    import time
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            ip = dpkt.ip.IP(s.recv(65535))
        except TimeoutError:
            break
        if ip.p == proto and ip.data.sport == sport:
            return ip
    raise AssertionError(f"no packet of protocol {proto} from port {sport}")


CLIENT = socket.inet_aton("10.98.200.1")
SERVER = socket.inet_aton(SERVER_ADDR)


def test_client_port_unreachable_ends_its_udp_flow(daemon_factory, udp_servers, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path))
    with raw_tunnel(d) as s:
        udp = dpkt.udp.UDP(sport=40002, dport=UDP_ECHO_PORT, data=b"are you there?")
        udp.ulen = 8 + len(udp.data)
        s.send(bytes(dpkt.ip.IP(src=CLIENT, dst=SERVER, p=17, ttl=64, data=udp)))
        reply = _recv_from(s, 17, UDP_ECHO_PORT)
        assert reply.data.data == b"are you there?"
        # The client's socket is gone: its kernel answers the reply with "port unreachable".
        s.send(_icmp4(CLIENT, SERVER, 3, 3, bytes(4), bytes(reply)[:28]))
        [end] = wait_for(lambda: [r for r in audit_records(tmp_path / "audit.jsonl")
                                  if r["audit"] == "flow_end"], 5, "the flow's end")
    assert end["close_reason"] == "client_unreachable" and end["packets"] == [2, 1]
    assert counter(d, "ipferry_icmp_errors_received_total", "protocol") == {"udp": 1}


def test_client_fragmentation_needed_reaches_the_namespace_kernel(daemon_factory, streams,
                                                                   tmp_path):
    """A client-side hop with a 1280-byte MTU: its ICMP, matched to the TCP flow and translated
    to the NAT slot, makes the namespace's kernel resend the lost segment smaller."""
    d = daemon_factory("--workers", "1", config=config(tmp_path))
    mss = b"\x02\x04" + (60000).to_bytes(2, "big")

    def tcp(flags: int, seq: int, ack: int = 0, data: bytes = b"", opts: bytes = b"") -> bytes:
        seg = dpkt.tcp.TCP(sport=40003, dport=9000, seq=seq, ack=ack, flags=flags, win=65535,
                           opts=opts, data=data)
        seg.off = (20 + len(opts)) // 4
        return bytes(dpkt.ip.IP(src=CLIENT, dst=SERVER, p=6, ttl=64, data=seg, df=1))

    with raw_tunnel(d) as s:
        s.send(tcp(dpkt.tcp.TH_SYN, 1000, opts=mss))
        synack = _recv_from(s, 6, 9000)
        server_seq = synack.data.seq + 1
        request = b"GET 100000\n"
        s.send(tcp(dpkt.tcp.TH_ACK, 1001, server_seq, request))
        big = _recv_from(s, 6, 9000)
        while not big.data.data:  # skip a bare ACK of the request
            big = _recv_from(s, 6, 9000)
        assert big.len > 1280 and big.data.seq == server_seq
        s.send(_icmp4(CLIENT, SERVER, 3, 4, (1280).to_bytes(4, "big"), bytes(big)[:28]))
        again = _recv_from(s, 6, 9000)
        while again.data.seq != server_seq:
            again = _recv_from(s, 6, 9000)
        assert again.len <= 1280, again.len  # the first segment again, cut to the new MTU
    assert counter(d, "ipferry_icmp_errors_received_total", "protocol") == {"tcp": 1}


def test_the_daemons_own_host_is_out_of_reach(daemon_factory, tmp_path):
    """Loopback (the admin API, the GUE on-ramp), "this host" and IPv4-mapped IPv6 addresses:
    refused whatever the rules say, with ICMP "administratively prohibited"."""
    d = daemon_factory("--workers", "1", config=config(tmp_path))
    syn = dpkt.tcp.TCP(sport=40004, dport=9180, flags=dpkt.tcp.TH_SYN)
    six = socket.inet_pton
    with raw_tunnel(d) as s:
        for dst in ("127.0.0.1", "0.0.0.0"):
            s.send(bytes(dpkt.ip.IP(src=CLIENT, dst=socket.inet_aton(dst), p=6, ttl=64, data=syn)))
            icmp = dpkt.ip.IP(s.recv(65535)).data
            assert (icmp.type, icmp.code) == (3, 13), dst
        for dst in ("::ffff:127.0.0.1", "::ffff:198.18.0.1", "::1", "::"):
            s.send(bytes(dpkt.ip6.IP6(src=six(socket.AF_INET6, "fd98::1"), nxt=6, hlim=64,
                                      dst=six(socket.AF_INET6, dst), data=syn, plen=20)))
            icmp6 = dpkt.ip6.IP6(s.recv(65535)).data
            assert (icmp6.type, icmp6.code) == (1, 1), dst
    assert drops(d)["forbidden_destination"] == 6
    assert not audit_records(tmp_path / "audit.jsonl")


def test_ip_padding_after_a_udp_datagram_is_not_payload(daemon_factory, udp_servers, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path))
    with raw_tunnel(d) as s:
        udp = dpkt.udp.UDP(sport=40003, dport=UDP_ECHO_PORT, data=b"hello")
        udp.ulen = 8 + 5
        datagram = bytearray(bytes(udp))
        datagram += b"PADDING!!!"  # in the IP packet, past the UDP length: not the datagram's
        ip = dpkt.ip.IP(src=CLIENT, dst=SERVER, p=17, ttl=64, data=bytes(datagram))
        s.send(bytes(ip))
        reply = _recv_from(s, 17, UDP_ECHO_PORT)
        assert reply.data.data == b"hello"  # what a kernel would have delivered
    assert d.terminate() == 0
    [end] = [r for r in audit_records(tmp_path / "audit.jsonl") if r["audit"] == "flow_end"]
    assert end["payload_bytes"] == [5, 5]
