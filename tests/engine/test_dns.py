"""Flows to the daemon's DNS address go to the host's resolver (the engine's part of it)."""

from __future__ import annotations

from ipferry.engine.actions import (
    Audit,
    AuditFlowStart,
    Count,
    DecideFlow,
    FlowEnded,
    FlowStarted,
    SendToTunnel,
)
from ipferry.engine.decisions import Decision
from ipferry.engine.legs import DatagramLeg, StreamLeg

from .conftest import make_engine
from .kit import C4, C6, FakeTunnel, Has, Placeholder, Playbook, decided, icmp_about, ip, packet, tcp, udp

DNS4, DNS6 = ip("100.100.100.100"), ip("fd53::53")


def test_a_query_goes_to_the_hosts_resolver_whatever_its_address():
    engine = make_engine(dns_upstreams=[("127.0.0.53", 53)])
    pb, tunnel = Playbook(engine), FakeTunnel()
    for src, dst, make in ((C4, DNS4, udp), (C6, DNS6, udp), (C4, DNS4, tcp)):
        flow = Placeholder("flow")
        first = make(src, dst, 40000, 53)
        assert (pb >> packet(tunnel, first) << FlowStarted(flow) << DecideFlow(flow)
                >> decided(flow, Decision.upgrade())
                << AuditFlowStart(flow, Has(upstream="127.0.0.53:53")))
        leg = flow().server
        assert isinstance(leg, DatagramLeg if make is udp else StreamLeg)
        assert leg.upstream == ("127.0.0.53", 53)
    # Another port of the address, or an application's own upstream, is left alone.
    flow = Placeholder("other")
    assert (pb >> packet(tunnel, udp(C4, DNS4, 40001, 54)) << FlowStarted(flow)
            << DecideFlow(flow) >> decided(flow, Decision.upgrade())
            << AuditFlowStart(flow, Has(upstream=None)))


def test_with_no_resolver_a_query_is_refused_as_an_unreachable_port():
    engine = make_engine()
    pb, tunnel = Playbook(engine), FakeTunnel()
    query = udp(C4, DNS4, 40000, 53)
    flow = Placeholder("flow")
    assert (pb >> packet(tunnel, query) << FlowStarted(flow) << DecideFlow(flow)
            >> decided(flow, Decision.upgrade()) << Count("drop", "no_dns_upstream")
            << Count("icmp_sent", "port") << SendToTunnel(tunnel, icmp_about(query, "port"))
            << Audit("flow_start", Has(decision="drop", reason="no_dns_upstream"))
            << Audit << FlowEnded)
