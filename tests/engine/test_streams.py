"""Upgraded TCP flows: connect before accept, the rewrite to the upgrade listener and back, the
ways a flow ends (either side's FIN first, resets, its tunnel closing), RFC 5961's reset window,
and what is held while the application decides and the off-ramp connects."""

from __future__ import annotations

import ipaddress

import pytest

from ipferry.engine.actions import (
    Audit,
    AuditFlowStart,
    ConnectOfframp,
    Count,
    DecideFlow,
    FlowEnded,
    FlowStarted,
    SendToTunnel,
    WriteTun,
)
from ipferry.engine.core import MAX_PENDING
from ipferry.engine.decisions import Decision
from ipferry.engine.flows import TcpState
from ipferry.engine.legs import StreamLeg

from .kit import (
    ACK,
    ANY,
    CLIENT_SEQ,
    FIN,
    NAT4,
    NAT6,
    PSH,
    RST,
    SERVER_SEQ,
    SYN,
    FakeTunnel,
    Has,
    Pkt,
    Placeholder,
    addrs,
    audit_written,
    close_tunnel,
    decided,
    end,
    end_all,
    establish,
    from_kernel,
    kernel,
    local_of,
    offramp_connected,
    packet,
    reset,
    rst_for,
    tcp,
    udp,
)


def text(address: bytes) -> str:
    return str(ipaddress.ip_address(address))


@pytest.mark.parametrize("version", [4, 6])
def test_connect_before_accept_holds_the_syn_until_the_offramp_connects(pb, engine, tunnel,
                                                                        version):
    c, s = addrs(version)
    syn = tcp(c, s)
    flow = Placeholder("flow")
    assert (pb >> packet(tunnel, syn) << FlowStarted(flow) << DecideFlow(flow)
            >> packet(tunnel, syn)  # retransmitted while the application decides: held
            >> decided(flow, Decision.upgrade())
            << AuditFlowStart(flow, {"decision": "upgrade", "reason": "", "upstream": None,
                                     "tenant": "acme", "protocol": "tcp", "src": text(c),
                                     "sport": 40000, "dst": text(s), "dport": 80, "tunnel": 1,
                                     "tunnel_worker": 0, "host": None, "client_leg": "tcp:upgraded",
                                     "server_leg": "tcp", "destination_tunnel": None,
                                     "destination_worker": None})
            >> audit_written(flow, True) << ConnectOfframp(flow)
            >> packet(tunnel, syn))  # and while the off-ramp connects: held
    f = flow()
    slot = f.slot
    assert ipaddress.ip_address(slot.address) in ipaddress.ip_network(NAT4 if version == 4
                                                                       else NAT6)
    assert isinstance(f.server, StreamLeg) and f.server.upstream == (text(s), 80)
    assert f.connecting and f.deadline == pb.now + engine.connect_timeout
    assert engine.stream_for(slot.address, slot.port) is None  # nothing to accept yet

    # Connected: the three SYNs reach the kernel, from the slot to the upgrade listener (port 1).
    into_kernel = Pkt(src=text(slot.address), sport=slot.port, dst=text(local_of(f)), dport=1,
                      flags=SYN, seq=CLIENT_SEQ)
    assert (pb >> offramp_connected(flow) << WriteTun(into_kernel, None)
            << WriteTun(into_kernel, None) << WriteTun(into_kernel, None))
    assert f.server.connected and not f.connecting and f.pending is None
    assert engine.stream_for(slot.address, slot.port) is f

    # The kernel's answer goes back into the tunnel, as if from the server.
    assert (pb >> kernel(from_kernel(f, SYN | ACK, SERVER_SEQ, CLIENT_SEQ + 1))
            << SendToTunnel(tunnel, Pkt(src=text(s), sport=80, dst=text(c), dport=40000,
                                        flags=SYN | ACK, seq=SERVER_SEQ, ack=CLIENT_SEQ + 1), None))
    assert f.state is TcpState.ESTABLISHED
    f.stream = object()  # the driver accepted it
    assert engine.stream_for(slot.address, slot.port) is None


def test_the_decision_picks_the_offramp(pb, tunnel):
    flow = Placeholder("flow")
    assert (pb >> packet(tunnel, tcp()) << FlowStarted(flow) << DecideFlow(flow)
            >> decided(flow, Decision.upgrade(("192.0.2.7", 8080), "rule 3"))
            << AuditFlowStart(flow, Has(decision="upgrade", reason="rule 3",
                                        upstream="192.0.2.7:8080"))
            >> audit_written(flow, True) << ConnectOfframp(flow))
    assert flow().server.upstream == ("192.0.2.7", 8080)


def test_data_both_ways_is_rewritten_and_counted_once(pb, engine, tunnel):
    flow = establish(pb, tunnel)
    data = tcp(flags=ACK | PSH, seq=CLIENT_SEQ + 1, ack=SERVER_SEQ + 1, payload=b"GET /")
    assert (pb >> packet(tunnel, data) << WriteTun(Pkt(payload=b"GET /", dport=1), None)
            >> packet(tunnel, data) << WriteTun(Pkt(payload=b"GET /"), None)  # a retransmission
            >> kernel(from_kernel(flow, ACK | PSH, SERVER_SEQ + 1, CLIENT_SEQ + 6, b"200 OK"))
            << SendToTunnel(tunnel, Pkt(sport=80, dport=40000, payload=b"200 OK"), None))
    assert flow.payload == [5, 6]
    assert flow.packets == [4, 2]


def client_fin_first(pb, tunnel, flow):
    assert (pb >> packet(tunnel, tcp(flags=FIN | ACK, seq=CLIENT_SEQ + 1, ack=SERVER_SEQ + 1))
            << WriteTun(Pkt(flags=FIN | ACK), None)
            >> kernel(from_kernel(flow, ACK, SERVER_SEQ + 1, CLIENT_SEQ + 2))
            << SendToTunnel(tunnel, Pkt(flags=ACK), None)
            >> kernel(from_kernel(flow, FIN | ACK, SERVER_SEQ + 1, CLIENT_SEQ + 2))
            << SendToTunnel(tunnel, Pkt(flags=FIN | ACK), None))
    assert flow.state is TcpState.CLOSING


def test_client_fin_first_ends_gracefully_on_the_last_ack(pb, engine, tunnel):
    flow = establish(pb, tunnel)
    client_fin_first(pb, tunnel, flow)
    assert (pb >> packet(tunnel, tcp(flags=ACK, seq=CLIENT_SEQ + 2, ack=SERVER_SEQ + 2))
            << WriteTun(Pkt(flags=ACK), None)
            << Audit("flow_end", Has(decision="upgrade", close_reason="fin", packets=[4, 3],
                                     payload_bytes=[0, 0]))
            << FlowEnded(flow, "fin", True))
    assert len(engine.flows) == 0 and engine.by_slot == {}
    assert engine.pools[4].in_use == 0  # the slot waits out TIME_WAIT in the pool's quarantine


def test_server_fin_first_ends_gracefully_on_the_clients_last_ack_through_the_kernel(pb, engine,
                                                                                   tunnel):
    flow = establish(pb, tunnel, version=6)
    c, s = addrs(6)
    assert (pb >> kernel(from_kernel(flow, FIN | ACK, SERVER_SEQ + 1, CLIENT_SEQ + 1))
            << SendToTunnel(tunnel, Pkt(flags=FIN | ACK), None)
            >> packet(tunnel, tcp(c, s, flags=ACK, seq=CLIENT_SEQ + 1, ack=SERVER_SEQ + 2))
            << WriteTun(Pkt(flags=ACK), None)
            >> packet(tunnel, tcp(c, s, flags=FIN | ACK, seq=CLIENT_SEQ + 1, ack=SERVER_SEQ + 2))
            << WriteTun(Pkt(flags=FIN | ACK), None)
            >> kernel(from_kernel(flow, ACK, SERVER_SEQ + 2, CLIENT_SEQ + 2))
            << SendToTunnel(tunnel, Pkt(flags=ACK), None)
            << Audit("flow_end", Has(close_reason="fin")) << FlowEnded(flow, "fin", True))
    assert engine.pools[6].in_use == 0


def test_rst_from_the_kernel_ends_the_flow(pb, engine, tunnel):
    flow = establish(pb, tunnel)
    assert (pb >> kernel(from_kernel(flow, RST, SERVER_SEQ + 1))
            << SendToTunnel(tunnel, Pkt(flags=RST, sport=80), None)
            << Audit("flow_end", Has(close_reason="rst")) << FlowEnded(flow, "rst", False))
    assert len(engine.flows) == 0
    assert engine.stream_for(flow.slot.address, flow.slot.port) is None


def test_rfc5961_only_an_in_window_client_rst_ends_the_flow(pb, engine, tunnel):
    flow = establish(pb, tunnel)
    blind = tcp(flags=RST, seq=CLIENT_SEQ + 1 + 100_000)
    # Out of window: the kernel gets it (and may send a challenge ACK); the flow goes on.
    assert pb >> packet(tunnel, blind) << WriteTun(Pkt(flags=RST, dport=1), None)
    assert engine.flows.get(flow.key) is flow and not flow.ended
    assert flow.packets == [2, 1]  # not counted either
    # At the sequence the client is at: the flow ends.
    assert (pb >> packet(tunnel, tcp(flags=RST, seq=CLIENT_SEQ + 1))
            << WriteTun(Pkt(flags=RST, seq=CLIENT_SEQ + 1), None)
            << Audit("flow_end", Has(close_reason="rst")) << FlowEnded(flow, "rst", False))
    assert len(engine.flows) == 0 and engine.pools[4].in_use == 0


def test_rfc5961_window_allows_one_past_a_fin(pb, engine, tunnel):
    flow = establish(pb, tunnel)
    assert (pb >> packet(tunnel, tcp(flags=FIN | ACK, seq=CLIENT_SEQ + 1, ack=SERVER_SEQ + 1))
            << WriteTun(ANY, None)
            >> packet(tunnel, tcp(flags=RST, seq=CLIENT_SEQ + 2))
            << WriteTun(Pkt(flags=RST), None) << Audit << FlowEnded(flow, "rst", False))


def test_rfc5961_window_wraps_around_the_sequence_space(pb, engine, tunnel):
    syn = tcp(seq=0xFFFFFFFF)  # the next sequence number is 0
    flow = Placeholder("flow")
    assert (pb >> packet(tunnel, syn) << FlowStarted(flow) << DecideFlow(flow)
            >> decided(flow, Decision.upgrade()) << AuditFlowStart
            >> audit_written(flow, True) << ConnectOfframp
            >> offramp_connected(flow) << WriteTun
            >> packet(tunnel, tcp(flags=RST, seq=0xFFFFFFFF)) << WriteTun  # one before: blind
            >> packet(tunnel, tcp(flags=RST, seq=0)) << WriteTun << Audit
            << FlowEnded(flow, "rst", False))


def test_the_same_flow_from_another_tunnel_never_touches_it(pb, engine, tunnel):
    flow = establish(pb, tunnel)
    impostor = FakeTunnel(id=2)  # same tenant, same 4-tuple
    assert (pb >> packet(impostor, tcp(flags=RST, seq=CLIENT_SEQ + 1))
            << Count("drop", "tunnel_mismatch")
            >> packet(impostor, tcp(flags=ACK, seq=CLIENT_SEQ + 1, payload=b"spoof"))
            << Count("drop", "tunnel_mismatch"))
    assert not flow.ended and flow.packets == [2, 1] and flow.payload == [0, 0]
    # Also while it is being made: nothing is held for the impostor.
    held = Placeholder("held")
    syn = tcp(sport=40001)
    assert (pb >> packet(tunnel, syn) << FlowStarted(held) << DecideFlow(held)
            >> packet(impostor, syn) << Count("drop", "tunnel_mismatch"))
    assert len(held().pending) == 1


def test_close_tunnel_ends_its_flows_cleanly_only_if_both_fins_crossed(pb, engine, tunnel):
    closing = establish(pb, tunnel)
    client_fin_first(pb, tunnel, closing)  # only the last ACK missing
    open_ = establish(pb, tunnel, version=6)
    other = FakeTunnel(id=2, tenant="other")  # (the same 4-tuple: another tenant's flow)
    bystander = establish(pb, other)
    assert (pb >> close_tunnel(tunnel)
            << Audit("flow_end", Has(close_reason="fin")) << FlowEnded(closing, "fin", True)
            << Audit("flow_end", Has(close_reason="tunnel_closed"))
            << FlowEnded(open_, "tunnel_closed", False))
    assert list(engine.flows) == [bystander]
    assert engine.pools[4].in_use == 1 and engine.pools[6].in_use == 0


def test_end_all_and_end_evict_with_the_drivers_reason(pb, engine, tunnel):
    a = establish(pb, tunnel)
    b = establish(pb, FakeTunnel(id=2), version=6)
    assert (pb >> end(a, "internal_error")
            << Audit("flow_end", Has(close_reason="internal_error", decision="upgrade"))
            << FlowEnded(a, "internal_error", False)
            >> end(a, "again")  # ended once only
            >> end_all("shutdown")
            << Audit("flow_end", Has(close_reason="shutdown")) << FlowEnded(b, "shutdown", False)
            >> end_all("shutdown"))
    assert len(engine.flows) == 0 and engine.by_slot == {}
    assert engine.pools[4].in_use == engine.pools[6].in_use == 0


def test_pending_overflow_before_and_after_the_decision_then_a_client_rst(pb, engine, tunnel):
    syn = tcp()
    flow = Placeholder("flow")
    assert pb >> packet(tunnel, syn) << FlowStarted(flow) << DecideFlow(flow)
    for _ in range(MAX_PENDING - 1):
        assert pb >> packet(tunnel, syn)  # held (the client retransmits its SYN)
    assert len(flow().pending) == MAX_PENDING
    assert pb >> packet(tunnel, syn) << Count("drop", "decision_pending")
    assert (pb >> decided(flow, Decision.upgrade()) << AuditFlowStart
            >> audit_written(flow, True) << ConnectOfframp(flow)
            >> packet(tunnel, syn) << Count("drop", "connect_pending"))
    # The client gives up while the off-ramp connects: the flow ends now, what it held counted.
    assert (pb >> packet(tunnel, tcp(flags=RST, seq=CLIENT_SEQ + 1))
            << Count("drop", "held_at_end", MAX_PENDING)
            << Audit("flow_end", Has(close_reason="rst", packets=[1, 0]))
            << FlowEnded(flow, "rst", False)
            >> offramp_connected(flow)  # too late: nothing
            >> packet(tunnel, tcp(flags=ACK, seq=CLIENT_SEQ + 1, ack=1))  # no flow now
            << Count("drop", "no_flow") << SendToTunnel(tunnel, rst_for(
                tcp(flags=ACK, seq=CLIENT_SEQ + 1, ack=1)), None))
    assert len(engine.flows) == 0 and engine.pools[4].in_use == 0 and not engine.by_slot


def test_release_after_overflow_sends_what_was_held_in_order(pb, tunnel):
    flow = Placeholder("flow")
    assert (pb >> packet(tunnel, tcp()) << FlowStarted(flow) << DecideFlow(flow)
            >> packet(tunnel, tcp(flags=ACK, seq=CLIENT_SEQ + 1, payload=b"early"))
            >> decided(flow, Decision.upgrade()) << AuditFlowStart
            >> audit_written(flow, True) << ConnectOfframp
            >> offramp_connected(flow)
            << WriteTun(Pkt(flags=SYN, payload=b""), None)
            << WriteTun(Pkt(flags=ACK, payload=b"early"), None))
    assert flow().payload == [5, 0]


def test_client_rst_before_the_decision_ends_it_and_the_late_decision_is_ignored(pb, engine,
                                                                                 tunnel):
    flow = Placeholder("flow")
    assert (pb >> packet(tunnel, tcp()) << FlowStarted(flow) << DecideFlow(flow)
            >> packet(tunnel, tcp(flags=RST | ACK, seq=CLIENT_SEQ + 1))
            << Count("drop", "held_at_end", 1)  # never audited: no flow_end record
            << FlowEnded(flow, "rst", False)
            >> decided(flow, Decision.upgrade()))  # the hook answered late: nothing
    assert engine.pools[4].in_use == 0 and flow().slot is None


def test_kernel_packets_of_no_flow_are_dropped(pb, engine, tunnel):
    flow = establish(pb, tunnel)
    slot = flow.slot
    stray = tcp(local_of(flow), slot.address, 1, slot.port + 1, ACK)
    assert (pb >> kernel(stray) << Count("drop", "kernel_no_flow")
            >> kernel(b"\x45\x00") << Count("drop", "kernel_truncated")
            >> kernel(udp(local_of(flow), slot.address, 1, slot.port))
            << Count("drop", "kernel_no_flow"))


def test_reset_answers_tcp_but_never_a_reset_or_udp(pb, tunnel):
    ack = tcp(flags=ACK, seq=7, ack=99)
    assert (pb >> reset(tunnel, ack) << SendToTunnel(tunnel, rst_for(ack), None)
            >> reset(tunnel, tcp(flags=RST)) >> reset(tunnel, udp()) >> reset(tunnel, b"junk"))
