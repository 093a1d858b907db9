"""Sharding: a worker serves the flows it owns and forwards the rest over the mesh; what the
kernel's steering program sent here is served here (and counted)."""

from __future__ import annotations

import pytest

from ipferry.engine.actions import Count, DecideFlow, FlowStarted, Forward, SendToTunnel
from ipferry.wire.packet import IPPROTO_TCP, IPPROTO_UDP
from ipferry.wire.sharding import owner
from ipferry.wire.vnet import PLAIN

from .conftest import make_engine
from .kit import (
    ACK,
    C4,
    S4,
    FakeTunnel,
    Placeholder,
    Playbook,
    icmp_error,
    packet,
    rst_for,
    tcp,
    udp,
)

WORKERS = 2


def sport_owned_by(worker: int, protocol: int = IPPROTO_TCP, dport: int = 80) -> int:
    return next(p for p in range(40000, 41000)
                if owner(protocol, C4, p, S4, dport, WORKERS) == worker)


@pytest.fixture
def pb() -> Playbook:
    return Playbook(make_engine(workers=WORKERS, index=0))


@pytest.mark.parametrize("vnet", [False, True])
def test_a_flow_of_another_worker_is_forwarded_as_it_came(pb, vnet):
    tunnel = FakeTunnel(vnet=vnet)
    frame = PLAIN if vnet else b""
    theirs = frame + tcp(sport=sport_owned_by(1))
    ours = frame + tcp(sport=sport_owned_by(0))
    theirs_udp = frame + udp(sport=sport_owned_by(1, IPPROTO_UDP, 53))
    assert (pb >> packet(tunnel, theirs) << Forward(1, tunnel, theirs)
            >> packet(tunnel, theirs_udp) << Forward(1, tunnel, theirs_udp)
            >> packet(tunnel, ours) << FlowStarted << DecideFlow)
    assert len(pb.engine.flows) == 1


def test_an_icmp_error_goes_to_the_owner_of_the_flow_it_is_about(pb, tunnel):
    about_theirs = tcp(S4, C4, 80, sport_owned_by(1), ACK)  # (the hash is symmetric)
    error = icmp_error(C4, S4, 3, 4, about_theirs, mtu=1400)
    about_ours = tcp(S4, C4, 80, sport_owned_by(0), ACK)
    assert (pb >> packet(tunnel, error) << Forward(1, tunnel, error)
            >> packet(tunnel, icmp_error(C4, S4, 3, 4, about_ours, mtu=1400))
            << Count("drop", "icmp_error_no_flow"))


def test_a_steered_tunnel_is_served_where_the_kernel_put_it_and_counted(pb):
    steered = FakeTunnel(steered=True)
    syn = tcp(sport=sport_owned_by(1))
    flow = Placeholder("flow")
    assert (pb >> packet(steered, syn) << Count("gue_missteered") << FlowStarted(flow)
            << DecideFlow(flow)
            >> packet(steered, syn))  # its flow is here now: no hash, no count (held)
    assert len(flow().pending) == 2


def test_a_packet_from_the_mesh_is_never_forwarded_again(pb):
    remote = FakeTunnel(id=7, origin=1, local=False)  # a tunnel another worker holds
    assert pb >> packet(remote, tcp(sport=sport_owned_by(1))) << FlowStarted << DecideFlow


def test_one_worker_hashes_nothing(tunnel):
    pb = Playbook(make_engine())
    assert pb >> packet(tunnel, tcp(sport=sport_owned_by(1))) << FlowStarted << DecideFlow


def test_behind_ecmp_a_mid_flow_packet_of_no_flow_is_another_nodes(pb):
    """On an anycast GUE on-ramp, a segment of no flow we know (not a SYN) was another node's
    until the router's group changed: reset, counted not_this_node (elsewhere no_flow)."""
    stray = tcp(sport=sport_owned_by(0), flags=ACK, seq=1000, ack=2000)
    anycast, plain = FakeTunnel(anycast=True, steered=True), FakeTunnel(steered=True)
    assert (pb >> packet(anycast, stray) << Count("drop", "not_this_node")
            << SendToTunnel(anycast, rst_for(stray), None)
            >> packet(plain, stray) << Count("drop", "no_flow")
            << SendToTunnel(plain, rst_for(stray), None))
    assert len(pb.engine.flows) == 0


def test_a_tun_queue_serves_new_flows_where_they_land_and_forwards_the_rest(pb):
    """An attached TUN's queue (``lands``): the kernel's queue choice is not our hash, so a
    SYN or an echo request is served by the worker it reached (the answers keep the flow's
    later packets there); a stray segment or a UDP datagram still goes to its hash's owner
    (a device's answer in a flow another worker routed to it)."""
    queue = FakeTunnel(lands=True)
    theirs = sport_owned_by(1)
    syn = tcp(sport=theirs)
    stray = tcp(sport=next(p for p in range(41000, 42000)
                           if owner(IPPROTO_TCP, C4, p, S4, 80, WORKERS) == 1), flags=ACK)
    datagram = udp(sport=sport_owned_by(1, IPPROTO_UDP, 53))
    assert (pb >> packet(queue, syn) << FlowStarted << DecideFlow
            >> packet(queue, stray) << Forward(1, queue, stray)
            >> packet(queue, datagram) << Forward(1, queue, datagram))
    assert len(pb.engine.flows) == 1


def test_a_tun_queues_icmp_error_is_served_here_or_asked_of_every_worker(pb):
    queue = FakeTunnel(lands=True)
    ours = sport_owned_by(1)  # hashed to worker 1, but it landed here: ours
    assert pb >> packet(queue, tcp(sport=ours)) << FlowStarted << DecideFlow
    about_ours = icmp_error(C4, S4, 3, 4, tcp(S4, C4, 80, ours, ACK), mtu=1400)
    about_none = icmp_error(C4, S4, 3, 4, tcp(S4, C4, 80, sport_owned_by(0), ACK), mtu=1400)
    assert (pb >> packet(queue, about_ours) << Count("drop", "icmp_error_no_flow")  # undecided
            >> packet(queue, about_none) << Forward(1, queue, about_none))
