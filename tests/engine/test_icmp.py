"""ICMP errors both ways, and path MTU discovery on either side of the engine.

A client's error about one of our packets reaches the namespace's kernel translated to the flow's
NAT slot (its PMTU cache learns); a datagram flow whose client says "unreachable" ends. A packet
too big for the next hop is answered "fragmentation needed" / "packet too big", as a router would.
"""

from __future__ import annotations

import ipaddress

import pytest

from ipferry.engine.actions import (
    Audit,
    AuditFlowStart,
    Count,
    DecideFlow,
    FlowEnded,
    FlowStarted,
    OpenDatagram,
    SendDatagram,
    SendToTunnel,
    WriteTun,
)
from ipferry.engine.decisions import Decision

from .conftest import make_engine
from .kit import (
    ACK,
    CLIENT_SEQ,
    PSH,
    SERVER_SEQ,
    FakeTunnel,
    Has,
    Pkt,
    Placeholder,
    Playbook,
    addrs,
    audit_written,
    datagram_opened,
    decided,
    echo,
    establish,
    from_kernel,
    icmp_about,
    icmp_error,
    ip,
    kernel,
    local_of,
    packet,
    tcp,
    udp,
)


def text(address: bytes) -> str:
    return str(ipaddress.ip_address(address))


ROUTER4, ROUTER6 = ip("10.0.0.254"), ip("fd00:1::fe")


def router(version: int) -> bytes:
    """A router on the client's path: its errors come from its own address."""
    return ROUTER4 if version == 4 else ROUTER6


# -- the client's errors, about our packets ----------------------------------------------------

@pytest.mark.parametrize(("version", "type_", "code", "mtu"), [(4, 3, 4, 1400), (6, 2, 0, 1280)])
def test_a_clients_too_big_about_a_tcp_flow_reaches_the_kernel_as_about_its_own(
        pb, tunnel, version, type_, code, mtu):
    c, s = addrs(version)
    flow = establish(pb, tunnel, version)
    slot, local = flow.slot, local_of(flow)
    # What we sent the client (the kernel's segment, rewritten), and the error about it.
    ours = tcp(s, c, 80, 40000, ACK | PSH, SERVER_SEQ + 1, CLIENT_SEQ + 1, b"x" * 1400)
    error = icmp_error(router(version), s, type_, code, ours, mtu=mtu)
    translated = Pkt(src=text(slot.address), dst=text(local), type=type_, code=code, rest=mtu,
                     inner=Has(src=text(local), dst=text(slot.address), sport=1,
                               dport=slot.port))
    assert (pb >> packet(tunnel, error) << Count("icmp_received", "tcp")
            << WriteTun(translated, None))
    assert not flow.ended and flow.packets == [3, 1]


def datagram_flow(pb: Playbook, tunnel: FakeTunnel, first: bytes) -> Placeholder:
    flow = Placeholder("flow")
    assert (pb >> packet(tunnel, first) << FlowStarted(flow) << DecideFlow(flow)
            >> decided(flow, Decision.upgrade()) << AuditFlowStart
            >> audit_written(flow, True) << OpenDatagram(flow)
            >> datagram_opened(flow) << SendDatagram)
    return flow


@pytest.mark.parametrize(("version", "type_", "code"), [(4, 3, 3), (4, 3, 1), (4, 3, 13),
                                                        (6, 1, 4), (6, 1, 0)])
def test_a_datagram_flow_whose_client_is_unreachable_ends(pb, engine, tunnel, version, type_,
                                                          code):
    c, s = addrs(version)
    flow = datagram_flow(pb, tunnel, udp(c, s))
    reply = udp(s, c, 53, 40000, b"answer")
    assert (pb >> packet(tunnel, icmp_error(c, s, type_, code, reply))
            << Count("icmp_received", "udp")
            << Audit("flow_end", Has(close_reason="client_unreachable"))
            << FlowEnded(flow, "client_unreachable", False))
    assert len(engine.flows) == 0


@pytest.mark.parametrize(("version", "type_", "code"), [(4, 3, 4), (6, 2, 0), (4, 11, 0),
                                                        (6, 3, 0)])
def test_too_big_or_time_exceeded_is_no_goodbye(pb, engine, tunnel, version, type_, code):
    c, s = addrs(version)
    flow = datagram_flow(pb, tunnel, udp(c, s))
    reply = udp(s, c, 53, 40000, b"answer")
    assert (pb >> packet(tunnel, icmp_error(router(version), s, type_, code, reply, mtu=1280))
            << Count("icmp_received", "udp"))
    assert not flow().ended


@pytest.mark.parametrize("version", [4, 6])
def test_an_error_about_an_echo_reply_is_matched_by_its_identifier(pb, tunnel, version):
    c, s = addrs(version)
    flow = datagram_flow(pb, tunnel, echo(c, s, ident=0x4321))
    reply = echo(s, c, ident=0x4321, reply=True)
    assert (pb >> packet(tunnel, icmp_error(c, s, *((1, 4) if version == 6 else (3, 3)), reply))
            << Count("icmp_received", "icmp"))
    assert not flow().ended  # an echo flow ends by its idle timeout


def test_errors_about_no_flow_of_this_tunnel_are_dropped(pb, tunnel):
    flow = establish(pb, tunnel)
    ours = tcp(addrs(4)[1], addrs(4)[0], 80, 40000, ACK, SERVER_SEQ + 1, CLIENT_SEQ + 1)
    other_port = tcp(addrs(4)[1], addrs(4)[0], 80, 40001, ACK)
    undecided = Placeholder("undecided")
    assert (pb >> packet(tunnel, icmp_error(ROUTER4, addrs(4)[1], 3, 4, other_port))
            << Count("drop", "icmp_error_no_flow")
            >> packet(FakeTunnel(id=2), icmp_error(ROUTER4, addrs(4)[1], 3, 4, ours))
            << Count("drop", "icmp_error_no_flow")  # the flow's, but from another tunnel
            >> packet(tunnel, udp(sport=5000)) << FlowStarted(undecided) << DecideFlow
            >> packet(tunnel, icmp_error(ROUTER4, addrs(4)[1], 3, 3,
                                         udp(addrs(4)[1], addrs(4)[0], 53, 5000)))
            << Count("drop", "icmp_error_no_flow"))  # not decided yet
    assert not flow.ended and not undecided().ended


# -- path MTU: client packets bigger than the TUN takes ---------------------------------------

def big(version: int, size: int, df: bool = True) -> bytes:
    c, s = addrs(version)
    header = 40 if version == 6 else 20
    return tcp(c, s, flags=ACK, seq=CLIENT_SEQ + 1, ack=SERVER_SEQ + 1,
               payload=bytes(size - header - 20), df=df)


@pytest.mark.parametrize("version", [4, 6])
def test_a_client_packet_larger_than_the_tun_is_answered_too_big(tunnel, version):
    pb = Playbook(make_engine(mtu=1400))
    flow = establish(pb, tunnel, version)
    packet_ = big(version, 1401)
    assert (pb >> packet(tunnel, packet_) << Count("drop", "too_big")
            << Count("icmp_sent", "too_big")
            << SendToTunnel(tunnel, icmp_about(packet_, "too_big", mtu=1400), None)
            >> packet(tunnel, big(version, 1400)) << WriteTun(Pkt(length=1400), None))
    assert flow.packets == [3, 1]  # the one too big was not the flow's


def test_without_df_a_too_big_ipv4_packet_is_dropped_silently(tunnel):
    pb = Playbook(make_engine(mtu=1400))
    establish(pb, tunnel)
    assert pb >> packet(tunnel, big(4, 1500, df=False)) << Count("drop", "too_big")


def test_too_big_is_answered_before_any_flow_starts(tunnel):
    pb = Playbook(make_engine(mtu=1280))
    syn = tcp(payload=bytes(1300))  # a SYN with data (TCP Fast Open)
    assert (pb >> packet(tunnel, syn) << Count("drop", "too_big") << Count("icmp_sent", "too_big")
            << SendToTunnel(tunnel, icmp_about(syn, "too_big", mtu=1280), None)
            >> packet(tunnel, udp(payload=bytes(1400)))  # a datagram leaves by a socket
            << FlowStarted << DecideFlow)
    assert len(pb.engine.flows) == 1


# -- path MTU: kernel packets bigger than the flow's tunnel carries -----------------------------

@pytest.mark.parametrize(("version", "type_", "code"), [(4, 3, 4), (6, 2, 0)])
def test_a_kernel_packet_larger_than_the_tunnel_is_answered_too_big(pb, version, type_, code):
    tunnel = FakeTunnel(mtu=1280)
    flow = establish(pb, tunnel, version)
    slot, local = flow.slot, local_of(flow)
    header = 40 if version == 6 else 20
    too_big = from_kernel(flow, ACK, SERVER_SEQ + 1, CLIENT_SEQ + 1, bytes(1281 - header - 20))
    fits = from_kernel(flow, ACK, SERVER_SEQ + 1, CLIENT_SEQ + 1, bytes(1280 - header - 20))
    assert (pb >> kernel(too_big) << Count("drop", "too_big")
            << WriteTun(Pkt(src=text(slot.address), dst=text(local), type=type_, code=code,
                            rest=1280, inner=Has(src=text(local), dst=text(slot.address),
                                                 sport=1, dport=slot.port)))
            >> kernel(fits) << SendToTunnel(tunnel, Pkt(length=1280, sport=80), None))
    assert flow.payload[1] == 1280 - header - 20
