"""Tunnels and a TUN that speak virtio-net headers: the header goes along with its packet (only
what it may truthfully say), and a TCP superframe is many segments, not one packet too big."""

from __future__ import annotations

import ipaddress
import struct

from ipferry.engine.actions import (
    AuditFlowStart,
    ConnectOfframp,
    Count,
    DecideFlow,
    FlowStarted,
    SendToTunnel,
    WriteTun,
)
from ipferry.engine.decisions import Decision
from ipferry.wire.checksum import ones_sum
from ipferry.wire.vnet import GSO_TCPV4, NEEDS_CSUM, PLAIN, complete_checksum

from .conftest import make_engine
from .kit import (
    ACK,
    C4,
    CLIENT_SEQ,
    S4,
    SERVER_SEQ,
    SYN,
    FakeTunnel,
    Pkt,
    Placeholder,
    Playbook,
    audit_written,
    decided,
    from_kernel,
    kernel,
    local_of,
    offramp_connected,
    packet,
    tcp,
)


def text(address: bytes) -> str:
    return str(ipaddress.ip_address(address))


def gso(packet: bytes, mss: int = 1400) -> tuple[bytes, bytes]:
    """``packet`` (IPv4 TCP, no options) as TSO leaves it, and its virtio-net header: the
    checksum field holds the pseudo-header's sum only."""
    raw = bytearray(packet)
    pseudo = bytes(raw[12:20]) + b"\0\6" + (len(raw) - 20).to_bytes(2, "big")
    raw[36:38] = (ones_sum(pseudo) % 0xFFFF).to_bytes(2, "big")
    return bytes(raw), struct.pack("<BBHHHH", NEEDS_CSUM, GSO_TCPV4, 40, mss, 20, 16)


def vnet_flow(pb: Playbook, tunnel: FakeTunnel) -> Placeholder:
    flow = Placeholder("flow")
    assert (pb >> packet(tunnel, PLAIN + tcp()) << FlowStarted(flow) << DecideFlow(flow)
            >> decided(flow, Decision.upgrade()) << AuditFlowStart
            >> audit_written(flow, True) << ConnectOfframp
            >> offramp_connected(flow) << WriteTun(Pkt(flags=SYN, dport=1), PLAIN))
    return flow


def test_the_header_travels_with_its_packet_both_ways():
    engine = make_engine()
    engine.tun_vnet = True
    pb = Playbook(engine)
    vnet = FakeTunnel(vnet=True)
    flow = vnet_flow(pb, vnet)
    assert (pb >> kernel(PLAIN + from_kernel(flow(), SYN | ACK, SERVER_SEQ, CLIENT_SEQ + 1))
            << SendToTunnel(vnet, Pkt(flags=SYN | ACK, sport=80), PLAIN))


def test_a_lying_header_is_dropped(pb):
    vnet = FakeTunnel(vnet=True)
    lie = struct.pack("<BBHHHH", NEEDS_CSUM, GSO_TCPV4, 40, 1400, 99, 16)  # checksum elsewhere
    assert (pb >> packet(vnet, lie + tcp()) << Count("drop", "bad_vnet_header")
            >> packet(vnet, b"\0" * 5) << Count("drop", "truncated"))


def test_a_superframe_is_not_too_big_for_the_tun():
    pb = Playbook(make_engine(mtu=1500))
    vnet = FakeTunnel(vnet=True)
    flow = vnet_flow(pb, vnet)
    frame, header = gso(tcp(flags=ACK, seq=CLIENT_SEQ + 1, ack=SERVER_SEQ + 1,
                            payload=bytes(2960)))
    written = Placeholder("written")
    trailing = b"junk after the IP packet"
    assert pb >> packet(vnet, header + frame + trailing) << WriteTun(written, header)
    out = bytearray(written())
    assert len(out) == 3000  # cut at the IP length
    complete_checksum(out, header)  # the kernel's part: the partial sum was kept right
    f = flow()
    assert Pkt(src=text(f.slot.address), sport=f.slot.port, dst=text(local_of(f)), dport=1,
               length=3000) == out
    assert f.payload == [2960, 0]


def test_a_kernel_superframe_is_not_too_big_for_the_tunnel():
    engine = make_engine()
    engine.tun_vnet = True
    pb = Playbook(engine)
    vnet = FakeTunnel(vnet=True, mtu=1500)
    flow = vnet_flow(pb, vnet)
    f = flow()
    frame, header = gso(tcp(local_of(f), f.slot.address, 1, f.slot.port, ACK, SERVER_SEQ + 1,
                            CLIENT_SEQ + 1, bytes(4000)))
    sent = Placeholder("sent")
    assert pb >> kernel(header + frame) << SendToTunnel(vnet, sent, header)
    out = bytearray(sent())
    complete_checksum(out, header)
    assert Pkt(src=text(S4), sport=80, dst=text(C4), dport=40000, length=4040) == out
