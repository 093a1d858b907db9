"""Every way a flow is refused, and exactly what the client gets back: ICMP "administratively
prohibited" for policy, a TCP reset for a limit, nothing for a datagram over a limit."""

from __future__ import annotations

import errno

import pytest

from ipferry.engine.actions import (
    Audit,
    AuditFlowStart,
    ConnectOfframp,
    Count,
    DecideFlow,
    FlowEnded,
    FlowStarted,
    Log,
    RefusedPastLimit,
    SendToTunnel,
    WriteTun,
)
from ipferry.engine.decisions import Decision

from .conftest import make_engine
from .kit import (
    ACK,
    C4,
    C6,
    CLIENT_SEQ,
    FIN,
    RST,
    S4,
    S6,
    SYN,
    FakeTunnel,
    Has,
    Placeholder,
    Playbook,
    addrs,
    audit_written,
    decided,
    echo,
    hook_failed,
    icmp_about,
    ip,
    offramp_connected,
    offramp_failed,
    packet,
    rst_for,
    tcp,
    timer,
    udp,
)


def started(pb: Playbook, tunnel: FakeTunnel, first: bytes) -> Placeholder:
    flow = Placeholder("flow")
    assert pb >> packet(tunnel, first) << FlowStarted(flow) << DecideFlow(flow)
    return flow


# -- policy -------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [4, 6])
def test_policy_deny_answers_admin_prohibited(pb, engine, tunnel, version):
    c, s = addrs(version)
    syn = tcp(c, s)
    flow = started(pb, tunnel, syn)
    assert (pb >> packet(tunnel, syn)  # a retransmission, held meanwhile
            >> decided(flow, Decision.drop("rule 9"))
            << AuditFlowStart(flow, Has(decision="drop", reason="rule 9", upstream=None))
            >> audit_written(flow, True)
            << Count("drop", "denied") << Count("icmp_sent", "admin")
            << SendToTunnel(tunnel, icmp_about(syn, "admin"), None)
            << Count("drop", "held_at_end", 1)  # the first was answered, the copy was not
            << Audit("flow_end", Has(decision="drop", reason="rule 9", close_reason="denied",
                                     packets=[0, 0]))
            << FlowEnded(flow, "denied", False))
    assert len(engine.flows) == 0 and engine.pools[version].in_use == 0


def test_policy_deny_of_a_datagram_flow(pb, tunnel):
    query = udp()
    flow = started(pb, tunnel, query)
    assert (pb >> decided(flow, Decision.drop("no dns")) << AuditFlowStart
            >> audit_written(flow, False)  # fail_closed is off: denied anyway
            << Count("drop", "denied") << Count("icmp_sent", "admin")
            << SendToTunnel(tunnel, icmp_about(query, "admin"), None)
            << Audit("flow_end", Has(close_reason="denied")) << FlowEnded(flow, "denied", False))


@pytest.mark.parametrize("dst", ["127.0.0.1", "127.200.0.9", "0.0.0.0", "0.1.2.3", "::1", "::",
                                 "::ffff:10.0.0.9", "::ffff:127.0.0.1", "::10.0.0.9"])
@pytest.mark.parametrize("proto", ["tcp", "udp", "icmp"])
def test_forbidden_destinations_whatever_the_rules(pb, engine, tunnel, dst, proto):
    src = C6 if ":" in dst else C4
    first = {"tcp": tcp, "udp": udp, "icmp": echo}[proto](src, ip(dst))
    assert (pb >> packet(tunnel, first) << Count("drop", "forbidden_destination")
            << Count("icmp_sent", "admin") << SendToTunnel(tunnel, icmp_about(first, "admin"),
                                                           None))
    assert len(engine.flows) == 0


def test_own_gue_endpoints_are_forbidden_to_udp_only(pb, engine, tunnel):
    engine.own_endpoints.update({(None, 6080), (S4, 6081)})
    to_any = udp(dport=6080)
    to_ours = udp(dport=6081)
    assert (pb >> packet(tunnel, to_any) << Count("drop", "forbidden_destination")
            << Count("icmp_sent", "admin") << SendToTunnel(tunnel, icmp_about(to_any, "admin"))
            >> packet(tunnel, to_ours) << Count("drop", "forbidden_destination")
            << Count("icmp_sent", "admin") << SendToTunnel(tunnel, icmp_about(to_ours, "admin"))
            >> packet(tunnel, udp(C4, ip("198.18.0.2"), dport=6081))  # another address: a flow
            << FlowStarted << DecideFlow
            >> packet(tunnel, tcp(dport=6080)) << FlowStarted << DecideFlow)  # TCP: a flow


# -- limits ---------------------------------------------------------------------------------------

LIMITS = [("flow_limit_worker", {"max_flows": 1}),
          ("flow_limit_tenant", {"max_flows_per_tenant": 1})]


@pytest.mark.parametrize(("reason", "limits"), LIMITS)
def test_flow_limits_reset_tcp(tunnel, reason, limits):
    pb = Playbook(make_engine(**limits))
    syn = tcp(sport=40001)
    assert (pb >> packet(tunnel, tcp()) << FlowStarted << DecideFlow
            >> packet(tunnel, syn) << Count("drop", reason) << RefusedPastLimit("acme", reason)
            << SendToTunnel(tunnel, rst_for(syn), None))
    assert len(pb.engine.flows) == 1


@pytest.mark.parametrize(("reason", "limits"), LIMITS)
def test_flow_limits_answer_datagrams_with_nothing(tunnel, reason, limits):
    pb = Playbook(make_engine(**limits))
    assert (pb >> packet(tunnel, tcp()) << FlowStarted << DecideFlow
            >> packet(tunnel, udp()) << Count("drop", reason) << RefusedPastLimit("acme", reason)
            >> packet(tunnel, echo()) << Count("drop", reason)
            << RefusedPastLimit("acme", reason))


def test_the_tenant_limit_is_per_tenant(tunnel):
    pb = Playbook(make_engine(max_flows_per_tenant=1))
    assert (pb >> packet(tunnel, tcp()) << FlowStarted << DecideFlow
            >> packet(FakeTunnel(id=2, tenant="other"), tcp()) << FlowStarted << DecideFlow)


def test_datagram_flow_limit_per_tenant(tunnel):
    pb = Playbook(make_engine(max_datagram_flows_per_tenant=1))
    assert (pb >> packet(tunnel, udp()) << FlowStarted << DecideFlow
            >> packet(tunnel, echo()) << Count("drop", "datagram_flow_limit_tenant")
            << RefusedPastLimit("acme", "datagram_flow_limit_tenant")
            >> packet(tunnel, tcp()) << FlowStarted << DecideFlow  # TCP holds no local port
            >> packet(FakeTunnel(id=2, tenant="other"), udp()) << FlowStarted << DecideFlow)


def test_nat_exhausted_resets_and_is_summed_up_not_audited(tunnel):
    engine = make_engine()
    engine.pools[4].capacity = 1  # a tiny pool: one slot
    pb = Playbook(engine)
    first = started(pb, tunnel, tcp())
    syn = tcp(sport=40001)
    second = started(pb, tunnel, syn)
    assert (pb >> decided(first, Decision.upgrade()) << AuditFlowStart
            >> decided(second, Decision.upgrade())
            << Count("drop", "nat_exhausted") << RefusedPastLimit("acme", "nat_exhausted")
            << SendToTunnel(tunnel, rst_for(syn), None)
            << FlowEnded(second, "nat_exhausted", False))  # no flow_end record
    assert second().slot is None and engine.pools[4].in_use == 1
    assert len(engine.flows) == 1 and len(engine.by_slot) == 1


# -- the audit --------------------------------------------------------------------------------

def test_fail_closed_refuses_a_flow_whose_record_was_not_written(tunnel):
    pb = Playbook(make_engine(fail_closed=True))
    syn = tcp()
    flow = started(pb, tunnel, syn)
    assert (pb >> decided(flow, Decision.upgrade()) << AuditFlowStart
            >> audit_written(flow, False)
            << Count("drop", "audit_unavailable") << RefusedPastLimit("acme", "audit_unavailable")
            << SendToTunnel(tunnel, rst_for(syn), None)
            << FlowEnded(flow, "audit_unavailable", False))
    assert pb.engine.pools[4].in_use == 0 and not pb.engine.by_slot  # its slot went back


def test_fail_closed_answers_a_datagram_with_admin_prohibited(tunnel):
    pb = Playbook(make_engine(fail_closed=True))
    query = udp(C6, S6)
    flow = started(pb, tunnel, query)
    assert (pb >> decided(flow, Decision.upgrade()) << AuditFlowStart
            >> audit_written(flow, False)
            << Count("drop", "audit_unavailable") << RefusedPastLimit("acme", "audit_unavailable")
            << Count("icmp_sent", "admin") << SendToTunnel(tunnel, icmp_about(query, "admin"))
            << FlowEnded(flow, "audit_unavailable", False))


def test_fail_open_goes_on_without_the_record(pb, tunnel):
    flow = started(pb, tunnel, tcp())
    assert (pb >> decided(flow, Decision.upgrade()) << AuditFlowStart
            >> audit_written(flow, False) << ConnectOfframp(flow))


# -- the application's hook -----------------------------------------------------------------

@pytest.mark.parametrize(("answer", "error"), [
    (None, "RuntimeError('boom')"),  # it raised (the driver says so)
    ("allow", "TypeError(\"not a Decision: 'allow'\")"),  # it answered no Decision
])
def test_hook_failure_resets_and_audits_start_and_end(pb, engine, tunnel, answer, error):
    syn = tcp()
    flow = started(pb, tunnel, syn)
    step = hook_failed(flow, error) if answer is None else decided(flow, answer)
    reason = f"hook error: {error}"
    assert (pb >> step
            << Count("drop", "hook_error") << SendToTunnel(tunnel, rst_for(syn), None)
            << Audit("flow_start", {"decision": "drop", "reason": reason, "upstream": None,
                                    "tenant": "acme", "protocol": "tcp", "src": "10.0.0.2",
                                    "sport": 40000, "dst": "198.18.0.1", "dport": 80,
                                    "tunnel": 1, "tunnel_worker": 0, "host": None, "client_leg": "ip",
                                    "server_leg": None, "destination_tunnel": None,
                                    "destination_worker": None})
            << Audit("flow_end", Has(decision="drop", reason=reason, close_reason="evicted"))
            << FlowEnded(flow, "evicted", False)
            >> hook_failed(flow, error)  # once only
            >> decided(flow, Decision.upgrade()))
    assert len(engine.flows) == 0 and engine.pools[4].in_use == 0


def test_hook_failure_of_a_datagram_flow_sends_nothing(pb, tunnel):
    flow = started(pb, tunnel, udp())
    assert (pb >> packet(tunnel, udp())
            >> hook_failed(flow, "ValueError()") << Count("drop", "hook_error")
            << Count("drop", "held_at_end", 1) << Audit("flow_start", Has(decision="drop"))
            << Audit("flow_end", Has(close_reason="evicted")) << FlowEnded(flow, "evicted", False))


# -- packets of no flow -------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [ACK, ACK | FIN, SYN | ACK, FIN, 0])
def test_a_segment_of_no_flow_is_reset(pb, engine, tunnel, flags):
    segment = tcp(flags=flags, seq=CLIENT_SEQ + 10, ack=777, payload=b"late")
    assert (pb >> packet(tunnel, segment) << Count("drop", "no_flow")
            << SendToTunnel(tunnel, rst_for(segment), None))
    assert len(engine.flows) == 0


@pytest.mark.parametrize("flags", [RST, RST | ACK, SYN | RST])
def test_a_reset_of_no_flow_gets_nothing(pb, tunnel, flags):
    assert pb >> packet(tunnel, tcp(flags=flags)) << Count("drop", "no_flow")


@pytest.mark.parametrize("src", ["224.0.0.5", "239.1.2.3", "255.255.255.255"])
def test_no_answer_to_a_source_that_is_no_host(pb, tunnel, src):
    """RFC 1122 3.2.1.3: such a source is invalid, its datagram silently discarded (and
    3.2.2: never answered with an ICMP error)."""
    for first in (tcp(ip(src), S4, flags=ACK), tcp(ip(src), ip("127.0.0.1"))):
        assert pb.play(packet(tunnel, first)) == [Count("drop", "multicast")]


@pytest.mark.parametrize("version", [4, 6])
def test_an_echo_reply_nobody_asked_for_is_dropped(pb, engine, tunnel, version):
    c, s = addrs(version)
    assert pb >> packet(tunnel, echo(c, s, reply=True)) << Count("drop", "icmp_unsolicited")
    assert len(engine.flows) == 0


def test_garbage_is_counted_by_the_parsers_reason(pb, tunnel):
    assert (pb >> packet(tunnel, b"") << Count("drop", "truncated")
            >> packet(tunnel, b"\x50" + bytes(40)) << Count("drop", "bad_version")
            >> packet(tunnel, udp(dst=ip("224.0.0.1"))) << Count("drop", "multicast"))


# -- the off-ramp -------------------------------------------------------------------------------

def connecting(pb: Playbook, tunnel: FakeTunnel, syn: bytes) -> Placeholder:
    flow = started(pb, tunnel, syn)
    assert (pb >> decided(flow, Decision.upgrade()) << AuditFlowStart
            >> audit_written(flow, True) << ConnectOfframp(flow))
    return flow


def test_offramp_refused_resets_the_client(pb, engine, tunnel):
    syn = tcp()
    flow = connecting(pb, tunnel, syn)
    assert (pb >> offramp_failed(flow, "refused", errno.ECONNREFUSED)
            << Count("upstream_failure", "refused")
            << Log("info", "upstream_failed", Has(reason="refused", error="ECONNREFUSED",
                                                   dst="198.18.0.1", dport=80))
            << SendToTunnel(tunnel, rst_for(syn), None)
            << Audit("flow_end", Has(decision="upgrade", close_reason="upstream_refused"))
            << FlowEnded(flow, "upstream_refused", False))
    assert engine.pools[4].in_use == 0 and not engine.by_slot


def test_offramp_error_of_ours_resets_the_client_too(pb, tunnel):
    syn = tcp()
    flow = connecting(pb, tunnel, syn)
    assert (pb >> offramp_failed(flow, "error", errno.EMFILE)
            << Count("upstream_failure", "error") << Log("info", "upstream_failed",
                                                         Has(error="EMFILE"))
            << SendToTunnel(tunnel, rst_for(syn), None)
            << Audit("flow_end", Has(close_reason="upstream_error"))
            << FlowEnded(flow, "upstream_error", False))


@pytest.mark.parametrize(("err", "kind"), [(errno.EHOSTUNREACH, "host"),
                                           (errno.ENETUNREACH, "net"), (errno.EACCES, "admin"),
                                           (errno.EPERM, "admin")])
@pytest.mark.parametrize("version", [4, 6])
def test_offramp_unreachable_answers_the_icmp_of_its_errno(pb, tunnel, err, kind, version):
    c, s = addrs(version)
    syn = tcp(c, s)
    flow = connecting(pb, tunnel, syn)
    assert (pb >> packet(tunnel, syn)  # a retransmission while connecting
            >> offramp_failed(flow, "unreachable", err)
            << Count("upstream_failure", "unreachable") << Log
            << Count("icmp_sent", kind) << SendToTunnel(tunnel, icmp_about(syn, kind), None)
            << Count("drop", "held_at_end", 1)
            << Audit("flow_end", Has(close_reason="upstream_unreachable"))
            << FlowEnded(flow, "upstream_unreachable", False))


def test_offramp_timeout_is_silence(pb, engine, tunnel):
    flow = connecting(pb, tunnel, tcp())
    deadline = flow().deadline
    assert deadline == engine.connect_timeout
    assert (pb >> timer(at=deadline - 0.5)
            >> timer(at=deadline)
            << Count("upstream_failure", "timeout")
            << Log("info", "upstream_failed", Has(reason="timeout", error="ETIMEDOUT"))
            << Count("drop", "held_at_end", 1)  # its SYN, never answered
            << Audit("flow_end", Has(close_reason="upstream_timeout"))
            << FlowEnded(flow, "upstream_timeout", False)
            >> offramp_failed(flow, "refused", errno.ECONNREFUSED)  # the driver's, late: nothing
            >> timer(at=deadline + 1))
    assert not engine.connecting and engine.pools[4].in_use == 0


def test_connect_timeouts_in_deadline_order_and_connected_flows_left_alone(pb, engine, tunnel):
    first = connecting(pb, tunnel, tcp(sport=1))
    pb.now = 3.0
    second = connecting(pb, tunnel, tcp(sport=2))
    pb.now = 4.0
    third = connecting(pb, tunnel, tcp(sport=3))
    assert pb >> offramp_connected(first) << WriteTun
    assert (pb >> timer(at=engine.connect_timeout + 3.0)
            << Count("upstream_failure", "timeout") << Log << Count << Audit
            << FlowEnded(second, "upstream_timeout", False))
    assert third().connecting and len(engine.connecting) == 1

