"""Datagram flows (UDP, ICMP echo): what leaves by the datagram leg, how replies are wrapped back
into IP towards the tunnel, and the ways the leg fails."""

from __future__ import annotations

import ipaddress
import struct

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
)
from ipferry.engine.core import MAX_UDP_PAYLOAD
from ipferry.engine.decisions import Decision
from ipferry.engine.flows import DatagramState
from ipferry.engine.legs import DatagramLeg

from .kit import (
    C4,
    S4,
    Has,
    Pkt,
    Placeholder,
    Playbook,
    addrs,
    audit_written,
    datagram_failed,
    datagram_opened,
    decided,
    echo,
    icmp_about,
    packet,
    udp,
    upstream_error,
    upstream_reply,
)


def text(address: bytes) -> str:
    return str(ipaddress.ip_address(address))


def opening(pb: Playbook, tunnel, first: bytes, decision: Decision | None = None,
            held: tuple[bytes, ...] = ()) -> Placeholder:
    """A datagram flow decided, audited, its leg being opened (``held`` came meanwhile)."""
    flow = Placeholder("flow")
    assert pb >> packet(tunnel, first) << FlowStarted(flow) << DecideFlow(flow)
    for more in held:
        assert pb >> packet(tunnel, more)
    assert (pb >> decided(flow, decision or Decision.upgrade()) << AuditFlowStart
            >> audit_written(flow, True) << OpenDatagram(flow))
    return flow


def opened(pb: Playbook, tunnel, first: bytes, payload: bytes, **kw) -> Placeholder:
    flow = opening(pb, tunnel, first, **kw)
    assert pb >> datagram_opened(flow) << SendDatagram(flow, payload)
    return flow


@pytest.mark.parametrize("version", [4, 6])
def test_udp_payload_ends_at_the_udp_length_not_the_ip_length(pb, tunnel, version):
    c, s = addrs(version)
    padded = udp(c, s, payload=b"query", pad=b"\0" * 6)
    flow = opening(pb, tunnel, padded, held=(udp(c, s, payload=b"again"),))
    leg = flow().server
    assert isinstance(leg, DatagramLeg) and leg.protocol == "udp"
    assert leg.upstream == (("198.18.0.1" if version == 4 else "2001:db8::1"), 53)
    assert (pb >> datagram_opened(flow)  # what was held goes out, in order
            << SendDatagram(flow, b"query") << SendDatagram(flow, b"again")
            >> packet(tunnel, udp(c, s, payload=b"")) << SendDatagram(flow, b""))
    assert flow().payload == [10, 0] and flow().packets == [3, 0]


@pytest.mark.parametrize("version", [4, 6])
def test_udp_replies_are_wrapped_back_to_the_client(pb, tunnel, version):
    c, s = addrs(version)
    flow = opened(pb, tunnel, udp(c, s), b"query")
    assert flow().state is DatagramState.UNREPLIED
    reply = Pkt(src=("198.18.0.1" if version == 4 else "2001:db8::1"), sport=53,
                dst=("10.0.0.2" if version == 4 else "fd00:1::2"), dport=40000, payload=b"answer")
    assert pb >> upstream_reply(flow, b"answer") << SendToTunnel(tunnel, reply, None)
    assert flow().state is DatagramState.REPLIED and flow().payload == [5, 6]


def test_the_decision_picks_the_datagram_upstream(pb, tunnel):
    flow = opening(pb, tunnel, udp(), Decision.upgrade(("192.0.2.53", 5353)))
    assert flow().server.upstream == ("192.0.2.53", 5353)


@pytest.mark.parametrize("version", [4, 6])
def test_replies_bigger_than_ip_carries_are_dropped(pb, tunnel, version):
    c, s = addrs(version)
    flow = opened(pb, tunnel, udp(c, s), b"query")
    largest = MAX_UDP_PAYLOAD[version]
    assert pb >> upstream_reply(flow, bytes(largest + 1)) << Count("drop", "reply_too_big")
    assert (pb >> upstream_reply(flow, bytes(largest))
            << SendToTunnel(tunnel, Pkt(length=65535 + (40 if version == 6 else 0)), None))


@pytest.mark.parametrize("version", [4, 6])
def test_echo_identifier_is_the_clients_both_ways(pb, tunnel, version):
    c, s = addrs(version)
    request = echo(c, s, ident=0x1234, seq=7, data=b"ping")
    ihl = 40 if version == 6 else 20
    flow = opened(pb, tunnel, request, request[ihl:])  # the whole ICMP message leaves
    leg = flow().server
    assert leg.protocol == "icmp" and leg.upstream[1] == 0 and flow().key.sport == 0x1234
    # The kernel's ping socket put its own identifier (0x9999) in the reply.
    reply_type = 129 if version == 6 else 0
    kernels = struct.pack("!BBHHH", reply_type, 0, 0, 0x9999, 7) + b"ping"
    assert (pb >> upstream_reply(flow, kernels)
            << SendToTunnel(tunnel, Pkt(src=text(s), dst=text(c), type=reply_type,
                                        code=0, id=0x1234, seq=7, body=b"ping"), None))
    assert flow().payload == [4, 4]
    assert (pb >> upstream_reply(flow, struct.pack("!BBHI", 3, 3, 0, 0))
            << Count("drop", "upstream_unexpected")
            >> upstream_reply(flow, bytes([reply_type, 0, 0])) << Count("drop",
                                                                        "upstream_unexpected"))


def test_an_echo_cannot_change_ip_version_on_the_way(pb, tunnel):
    flow = opening(pb, tunnel, echo(C4, S4), Decision.upgrade(("2001:db8::9", 0)))
    assert flow().server.upstream == ("198.18.0.1", 0)


@pytest.mark.parametrize("kind", ["port", "host", "net", "admin"])
@pytest.mark.parametrize("version", [4, 6])
def test_an_unreachable_upstream_is_answered_with_its_icmp(pb, tunnel, kind, version):
    c, s = addrs(version)
    query = udp(c, s)
    flow = opening(pb, tunnel, query)
    assert (pb >> datagram_failed(flow, "unreachable", kind)
            << Count("upstream_failure", "unreachable") << Count("icmp_sent", kind)
            << SendToTunnel(tunnel, icmp_about(query, kind), None)
            << Audit("flow_end", Has(close_reason="upstream_unreachable"))
            << FlowEnded(flow, "upstream_unreachable", False)
            >> datagram_opened(flow))  # late: nothing


@pytest.mark.parametrize("reason", ["icmp_not_permitted", "local_ports_exhausted"])
def test_a_datagram_leg_we_cannot_open_is_counted_once(pb, engine, tunnel, reason):
    flow = opening(pb, tunnel, echo(), held=(echo(seq=8),))
    assert (pb >> datagram_failed(flow, reason, "")
            << Count("drop", reason)  # its first packet
            << Count("drop", "held_at_end", 1)  # the one held after it
            << Audit("flow_end", Has(decision="upgrade", close_reason=reason))
            << FlowEnded(flow, reason, False))
    assert len(engine.flows) == 0


@pytest.mark.parametrize("version", [4, 6])
def test_the_offramps_icmp_errors_reach_the_client(pb, engine, tunnel, version):
    c, s = addrs(version)
    query = udp(c, s)
    flow = opening(pb, tunnel, query)
    assert pb >> upstream_error(flow, "port")  # nothing went out yet: nothing to answer
    assert (pb >> datagram_opened(flow) << SendDatagram
            >> upstream_error(flow, "port")
            << Count("icmp_sent", "port") << SendToTunnel(tunnel, icmp_about(query, "port"), None)
            >> upstream_error(flow, "too_big")
            << Count("icmp_sent", "too_big")
            << SendToTunnel(tunnel, icmp_about(query, "too_big", mtu=engine.mtu), None))
    assert not flow().ended  # the client decides what an error means
