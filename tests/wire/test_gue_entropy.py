"""The source-port entropy of a GUE sender (RFC 8086): one value per inner flow, the same both
ways, an ICMP error with the flow it quotes, every fragment of a datagram alike."""

from __future__ import annotations

import socket

import dpkt
from hypothesis import given
from hypothesis import strategies as st

from ipferry.wire.gue import flow_entropy
from ipferry.wire.sharding import flow_hash

ports = st.integers(1, 65535)
v4 = st.binary(min_size=4, max_size=4)
v6 = st.binary(min_size=16, max_size=16)


def ip4(src: bytes, dst: bytes, proto: int, l4) -> bytes:
    return bytes(dpkt.ip.IP(src=src, dst=dst, p=proto, data=l4))


def ip6(src: bytes, dst: bytes, proto: int, l4) -> bytes:
    return bytes(dpkt.ip6.IP6(src=src, dst=dst, nxt=proto, hlim=64, data=l4, plen=len(bytes(l4))))


@given(v4, v4, ports, ports, st.sampled_from([6, 17]))
def test_both_directions_of_an_ipv4_flow_hash_alike(a, b, pa, pb, proto):
    l4 = dpkt.tcp.TCP if proto == 6 else dpkt.udp.UDP
    there = flow_entropy(ip4(a, b, proto, l4(sport=pa, dport=pb)))
    back = flow_entropy(ip4(b, a, proto, l4(sport=pb, dport=pa)))
    assert there == back == flow_hash(proto, a, pa, b, pb)


@given(v6, v6, ports, ports)
def test_both_directions_of_an_ipv6_flow_hash_alike(a, b, pa, pb):
    there = flow_entropy(ip6(a, b, 17, dpkt.udp.UDP(sport=pa, dport=pb)))
    back = flow_entropy(ip6(b, a, 17, dpkt.udp.UDP(sport=pb, dport=pa)))
    assert there == back == flow_hash(17, a, pa, b, pb)


def test_flows_spread_and_offsets_count():
    src, dst = socket.inet_aton("10.0.0.1"), socket.inet_aton("198.18.0.1")
    values = {flow_entropy(ip4(src, dst, 6, dpkt.tcp.TCP(sport=p, dport=80))) % 32
              for p in range(40000, 40300)}
    assert len(values) == 32  # 300 flows fill 32 ports
    packet = ip4(src, dst, 6, dpkt.tcp.TCP(sport=40000, dport=80))
    assert flow_entropy(b"\0" * 10 + packet, 10) == flow_entropy(packet) != 0


def test_an_icmp_error_travels_with_the_flow_it_quotes():
    client, server = socket.inet_aton("10.0.0.1"), socket.inet_aton("198.18.0.1")
    answer = ip4(server, client, 17, dpkt.udp.UDP(sport=53, dport=40000, data=b"x"))
    error = ip4(client, server, 1, dpkt.icmp.ICMP(type=3, code=3,
                                                  data=dpkt.icmp.ICMP.Unreach(data=answer)))
    query = ip4(client, server, 17, dpkt.udp.UDP(sport=40000, dport=53, data=b"q"))
    assert flow_entropy(error) == flow_entropy(query)
    c6, s6 = socket.inet_pton(socket.AF_INET6, "fd00::1"), socket.inet_pton(socket.AF_INET6, "fd00::2")
    answer6 = ip6(s6, c6, 17, dpkt.udp.UDP(sport=53, dport=40000, data=b"x"))
    error6 = ip6(c6, s6, 58, dpkt.icmp6.ICMP6(type=1, code=4, data=b"\0\0\0\0" + answer6))
    assert flow_entropy(error6) == flow_entropy(ip6(c6, s6, 17, dpkt.udp.UDP(sport=40000,
                                                                               dport=53)))
    # An echo request is no error: it hashes by its addresses.
    echo = ip4(client, server, 1, dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(id=7)))
    assert flow_entropy(echo) == flow_hash(1, client, 0, server, 0)


def test_every_fragment_of_a_datagram_hashes_alike():
    src, dst = socket.inet_aton("10.0.0.1"), socket.inet_aton("198.18.0.1")
    first = bytearray(ip4(src, dst, 17, dpkt.udp.UDP(sport=40000, dport=53, data=b"x" * 64)))
    first[6] |= 0x20  # more fragments
    later = bytearray(first)
    later[6], later[7] = 0, 9  # offset 72, the last
    assert flow_entropy(bytes(first)) == flow_entropy(bytes(later)) == \
        flow_hash(17, src, 0, dst, 0)


@given(st.binary(max_size=80))
def test_garbage_never_raises(data):
    assert flow_entropy(data) >= 0


def test_an_error_quoting_an_error_is_followed_one_level_only():
    client, server = socket.inet_aton("10.0.0.1"), socket.inet_aton("198.18.0.1")
    packet = ip4(client, server, 17, dpkt.udp.UDP(sport=40000, dport=53, data=b"q"))
    for _ in range(1200):  # 33 KB of nested errors: no recursion to speak of
        packet = ip4(client, server, 1, dpkt.icmp.ICMP(type=3, code=1,
                                                       data=dpkt.icmp.ICMP.Unreach(data=packet)))
    assert flow_entropy(packet) == flow_hash(1, client, 0, server, 0)
