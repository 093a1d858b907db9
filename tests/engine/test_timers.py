"""Time: idle timeouts per state, as ``timer(now)`` finds them (the engine reads no clock)."""

from __future__ import annotations

import pytest

from ipferry.engine.actions import (
    Audit,
    Count,
    DecideFlow,
    FlowEnded,
    FlowStarted,
    SendDatagram,
    SendToTunnel,
    WriteTun,
)
from ipferry.engine.decisions import Decision
from ipferry.engine.flows import DatagramState, TcpState, Timeouts

from .conftest import make_engine
from .kit import (
    ACK,
    CLIENT_SEQ,
    FIN,
    SERVER_SEQ,
    Has,
    Placeholder,
    Playbook,
    addrs,
    decided,
    echo,
    establish,
    from_kernel,
    kernel,
    open_datagram,
    packet,
    tcp,
    timer,
    udp,
    upstream_reply,
)


def idle_end(flow, **fields) -> list:
    return [Audit("flow_end", Has(close_reason="idle_timeout", **fields)),
            FlowEnded(flow, "idle_timeout", False)]


@pytest.mark.parametrize("version", [4, 6])
def test_an_unreplied_udp_flow_goes_after_30_s(pb, engine, tunnel, version):
    flow = open_datagram(pb, tunnel, udp(*addrs(version)))
    assert (pb >> timer(at=29.9)
            >> timer(at=30.0) << idle_end(flow, packets=[1, 0], duration=30.0))
    assert len(engine.flows) == 0


def test_traffic_restarts_the_idle_clock(pb, tunnel):
    flow = open_datagram(pb, tunnel, udp())
    pb.now = 20.0
    assert (pb >> packet(tunnel, udp(payload=b"more")) << SendDatagram
            >> timer(at=49.9)
            >> timer(at=50.0) << idle_end(flow, packets=[2, 0]))


def test_a_replied_udp_flow_goes_after_120_s(pb, tunnel):
    flow = open_datagram(pb, tunnel, udp())
    assert (pb >> upstream_reply(flow, b"answer", at=10.0) << SendToTunnel
            >> timer(at=40.0))
    assert flow.state is DatagramState.REPLIED
    assert (pb >> timer(at=129.9)
            >> timer(at=130.0) << idle_end(flow, packets=[1, 1], payload_bytes=[5, 6]))


def test_an_echo_flow_goes_after_30_s_replied_or_not(pb, tunnel):
    flow = open_datagram(pb, tunnel, echo())
    assert (pb >> upstream_reply(flow, bytes([0, 0, 0, 0, 0, 1, 0, 7]) + b"ping", at=1.0)
            << SendToTunnel
            >> timer(at=30.9)
            >> timer(at=31.0) << idle_end(flow))


def test_timeouts_are_the_tables(tunnel):
    pb = Playbook(make_engine(timeouts=Timeouts(udp_unreplied=2.0)))
    flow = open_datagram(pb, tunnel, udp())
    assert pb >> timer(at=1.9) >> timer(at=2.0) << idle_end(flow)


def test_an_undecided_flow_goes_after_the_syn_timeout(pb, engine, tunnel):
    flow = Placeholder("flow")
    assert (pb >> packet(tunnel, tcp()) << FlowStarted(flow) << DecideFlow(flow)
            >> timer(at=119.0)
            >> timer(at=120.0)
            << Count("drop", "held_at_end", 1)  # never decided: no audit record
            << FlowEnded(flow, "idle_timeout", False)
            >> decided(flow, Decision.upgrade()))  # the hook, far too late: nothing
    assert len(engine.flows) == 0 and engine.pools[4].in_use == 0


def test_an_established_flow_goes_after_two_hours(pb, engine, tunnel):
    flow = establish(pb, tunnel)
    assert flow.state is TcpState.ESTABLISHED
    assert (pb >> timer(at=7199.0)
            >> timer(at=7200.0) << idle_end(flow, decision="upgrade"))
    assert engine.pools[4].in_use == 0 and not engine.by_slot


def test_half_closed_and_closing_flows_have_shorter_timeouts(pb, engine, tunnel):
    half = establish(pb, tunnel)  # the client sends its FIN, the server stays silent
    assert (pb >> packet(tunnel, tcp(flags=FIN | ACK, seq=CLIENT_SEQ + 1, ack=SERVER_SEQ + 1))
            << WriteTun)
    assert half.state is TcpState.FIN_WAIT
    closing = establish(pb, tunnel, version=6)  # both FINs, the last ACK never comes
    c, s = addrs(6)
    assert (pb >> packet(tunnel, tcp(c, s, flags=FIN | ACK, seq=CLIENT_SEQ + 1,
                                     ack=SERVER_SEQ + 1)) << WriteTun
            >> kernel(from_kernel(closing, FIN | ACK, SERVER_SEQ + 1, CLIENT_SEQ + 2))
            << SendToTunnel)
    assert closing.state is TcpState.CLOSING
    assert (pb >> timer(at=59.0)
            >> timer(at=60.0) << idle_end(closing)
            >> timer(at=119.0)
            >> timer(at=120.0) << idle_end(half))
    assert engine.pools[4].in_use == engine.pools[6].in_use == 0


def test_time_wait_is_not_waited_out_in_the_table(pb, engine, tunnel):
    """Both FINs acknowledged: the flow ends at once, gracefully; the slot's quarantine in the
    pool keeps the 4-tuple out of use while the kernel holds it in TIME_WAIT."""
    flow = establish(pb, tunnel)
    slot = flow.slot
    assert (pb >> kernel(from_kernel(flow, FIN | ACK, SERVER_SEQ + 1, CLIENT_SEQ + 1))
            << SendToTunnel
            >> packet(tunnel, tcp(flags=FIN | ACK, seq=CLIENT_SEQ + 1, ack=SERVER_SEQ + 2))
            << WriteTun
            >> kernel(from_kernel(flow, ACK, SERVER_SEQ + 2, CLIENT_SEQ + 2))
            << SendToTunnel << Audit("flow_end", Has(close_reason="fin"))
            << FlowEnded(flow, "fin", True)
            >> timer(at=1000.0))
    assert len(engine.flows) == 0 and engine.pools[4].in_use == 0 and slot not in engine.by_slot
