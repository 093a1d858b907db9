"""Hostile input: whatever bytes a tunnel or the kernel sends, in whatever order with whatever
answers from the driver, the engine never raises, returns only actions the driver knows, and
keeps its books (flows, NAT slots, starts and ends) straight."""

from __future__ import annotations

import errno
import typing

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipferry.engine.actions import (
    Action,
    AuditFlowStart,
    ConnectOfframp,
    Count,
    DecideFlow,
    FlowEnded,
    FlowStarted,
    Log,
    OpenDatagram,
    SendToTunnel,
    WriteTun,
)
from ipferry.engine.core import FlowEngine
from ipferry.engine.decisions import Decision
from ipferry.engine.flows import Flow
from ipferry.wire.packet import Parsed, parse
from ipferry.wire.vnet import HEADER_SIZE, PLAIN

from .conftest import make_engine
from .kit import (
    ACK,
    C4,
    C6,
    FIN,
    RST,
    S4,
    S6,
    FakeTunnel,
    Playbook,
    echo,
    establish,
    from_kernel,
    icmp_error,
    open_datagram,
    tcp,
    udp,
)

ACTION_TYPES = typing.get_args(Action)
COUNTERS = {"drop", "icmp_sent", "icmp_received", "upstream_failure", "gue_missteered"}


def checked(actions: object) -> list:
    """The actions, each of a type the driver carries out, with fields it can use."""
    assert isinstance(actions, list)
    for a in actions:
        assert type(a) in ACTION_TYPES, a
        if isinstance(a, Count):
            assert a.counter in COUNTERS and isinstance(a.label, str) and a.n >= 1, a
        elif isinstance(a, Log):
            assert a.level in ("debug", "info", "warning", "error"), a
        elif isinstance(a, SendToTunnel | WriteTun):
            # Whatever we send is an IP packet (a reply, an answer, or a rewritten packet that
            # parsed when it came in), never one addressed to a group (RFC 1122 3.2.1.3).
            assert isinstance(parse(a.packet), Parsed), a
    return actions


def live_engine() -> tuple[FlowEngine, FakeTunnel, FakeTunnel]:
    """An engine with flows of every kind to hit: TCP (v4, v6), UDP, echo; a vnet tunnel too."""
    engine = make_engine()
    engine.own_endpoints.add((None, 6080))
    pb = Playbook(engine)
    plain, vnet = FakeTunnel(id=1), FakeTunnel(id=2, tenant="other", vnet=True)
    establish(pb, plain, 4)
    establish(pb, plain, 6)
    open_datagram(pb, plain, udp())
    open_datagram(pb, plain, echo(C6, S6))
    return engine, plain, vnet


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120), st.booleans())
def test_any_bytes_from_a_tunnel_or_the_kernel(data, vnet_tun):
    engine, plain, vnet = live_engine()
    engine.tun_vnet = vnet_tun
    checked(engine.tunnel_packet(plain, data, 1.0))
    checked(engine.tunnel_packet(vnet, data, 1.0))
    checked(engine.tun_packet(data, 1.0))
    checked(engine.reset(vnet, data))


# Valid packets that reach deep: the live flows' own, errors about them, new flows.
SEEDS = (tcp(), tcp(flags=ACK, seq=1001, ack=5001, payload=b"data"), tcp(flags=RST, seq=1001),
         tcp(C6, S6, flags=FIN | ACK, seq=1001), udp(payload=b"q", pad=b"\0\0"), udp(dport=6080),
         echo(), echo(C6, S6), echo(reply=True),
         icmp_error(C4, S4, 3, 4, tcp(S4, C4, 80, 40000, ACK), mtu=576),
         icmp_error(C6, S6, 2, 0, tcp(S6, C6, 80, 40000, ACK), mtu=1280),
         icmp_error(C4, S4, 3, 3, udp(S4, C4, 53, 40000)),
         icmp_error(C6, S6, 1, 4, echo(S6, C6, reply=True)))


def seeds(engine: FlowEngine) -> list[bytes]:
    """:data:`SEEDS` and the kernel's packets to the live flows' NAT slots."""
    out = list(SEEDS)
    for flow in list(engine.by_slot.values()):
        out.append(from_kernel(flow, ACK, payload=b"reply"))
        out.append(from_kernel(flow, FIN | ACK))
    return out


def mutated(data: st.DataObject, packet: bytes) -> bytes:
    raw = bytearray(packet)
    for at, value in data.draw(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)),
                                        max_size=4)):
        raw[at % len(raw)] = value
    cut = data.draw(st.integers(0, len(raw)))
    return bytes(raw[:cut] if data.draw(st.booleans()) else raw)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_mutated_packets_of_live_flows(data):
    engine, plain, vnet = live_engine()
    for _ in range(3):
        packet = mutated(data, data.draw(st.sampled_from(seeds(engine))))
        header = data.draw(st.sampled_from([PLAIN, bytes([1, 1, 40, 0, 120, 5, 20, 0, 16, 0])])
                           | st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
        engine.tun_vnet = data.draw(st.booleans())
        checked(engine.tunnel_packet(plain, packet, 2.0))
        checked(engine.tunnel_packet(vnet, header + packet, 2.0))
        checked(engine.tun_packet(header + packet if engine.tun_vnet else packet, 2.0))


class Books:
    """A driver that keeps count: every flow started ends once, the table and the NAT pools
    agree with what is live."""

    def __init__(self, engine: FlowEngine) -> None:
        self.engine = engine
        self.live: dict[Flow, None] = {}  # (in start order: draws from it replay alike)
        self.answers: list[tuple[str, Flow]] = []  # what the engine waits for

    def take(self, actions: object) -> None:
        for a in checked(actions):
            if isinstance(a, FlowStarted):
                assert a.flow not in self.live
                self.live[a.flow] = None
            elif isinstance(a, FlowEnded):
                assert a.flow in self.live, "ended twice, or never started"
                del self.live[a.flow]
                assert a.flow.ended
            elif isinstance(a, DecideFlow | AuditFlowStart | ConnectOfframp | OpenDatagram):
                self.answers.append((type(a).__name__, a.flow))
        engine = self.engine
        assert set(engine.by_key.values()) == set(self.live)
        assert all(not f.ended for f in engine.by_key.values())
        assert all(engine.by_key.get(f.key) is f for f in engine.by_slot.values())
        assert sum(p.in_use for p in engine.pools.values()) == len(engine.by_slot)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_order_of_inputs_and_answers_keeps_the_books(data):
    engine = make_engine(max_flows=6, max_flows_per_tenant=5, max_datagram_flows_per_tenant=2,
                         mtu=data.draw(st.sampled_from([1280, 65520])),
                         fail_closed=data.draw(st.booleans()),
                         workers=data.draw(st.sampled_from([1, 2])))
    engine.pools[4].capacity = 3  # soon exhausted
    engine.own_endpoints.add((None, 6080))
    tunnels = [FakeTunnel(id=1), FakeTunnel(id=2, mtu=1280), FakeTunnel(id=3, vnet=True),
               FakeTunnel(id=4, steered=True), FakeTunnel(id=5, origin=1, local=False)]
    books = Books(engine)
    now = 0.0
    for _ in range(data.draw(st.integers(1, 30))):
        now += data.draw(st.sampled_from([0.0, 0.5, 11.0, 61.0]))
        step = data.draw(st.sampled_from(["tunnel", "tunnel", "tunnel", "kernel", "answer",
                                          "answer", "answer", "timer", "datagram", "close"]))
        if step == "tunnel":
            tunnel = data.draw(st.sampled_from(tunnels))
            packet = data.draw(st.sampled_from(seeds(engine)))
            if data.draw(st.booleans()):
                packet = mutated(data, packet)
            books.take(engine.tunnel_packet(tunnel, (PLAIN if tunnel.vnet else b"") + packet,
                                            now))
        elif step == "kernel":
            packet = data.draw(st.sampled_from(seeds(engine)))
            books.take(engine.tun_packet(mutated(data, packet), now))
        elif step == "answer" and books.answers:
            what, flow = books.answers.pop(data.draw(st.integers(0, len(books.answers) - 1)))
            books.take(answer(data, engine, what, flow, now))
        elif step == "timer":
            books.take(engine.timer(now))
        elif step == "datagram" and books.live:
            flow = data.draw(st.sampled_from(list(books.live)))
            if data.draw(st.booleans()):
                books.take(engine.upstream_reply(flow, data.draw(st.binary(max_size=40)), now))
            else:
                kind = data.draw(st.sampled_from(["port", "host", "net", "admin", "too_big"]))
                books.take(engine.upstream_error(flow, kind, now))
        elif step == "close":
            if data.draw(st.booleans()):
                books.take(engine.close_tunnel(data.draw(st.sampled_from(tunnels)), now))
            elif books.live:
                books.take(engine.end(next(iter(books.live)), "internal_error", now))
    books.take(engine.end_all("shutdown", now))
    assert not books.live and len(engine.flows) == 0 and not engine.by_slot
    assert sum(p.in_use for p in engine.pools.values()) == 0


def answer(data: st.DataObject, engine: FlowEngine, what: str, flow: Flow, now: float) -> list:
    """The driver's answer to what the engine asked (maybe late: the flow may be over)."""
    if what == "DecideFlow":
        choice = data.draw(st.sampled_from(["upgrade", "upstream", "drop", "junk", "raised"]))
        if choice == "raised":
            return engine.hook_failed(flow, "RuntimeError()", now)
        decision = {"upgrade": Decision.upgrade(), "drop": Decision.drop("rule"),
                    "upstream": Decision.upgrade(("2001:db8::9", 443)), "junk": "allow"}[choice]
        return engine.decided(flow, decision, now)
    if what == "AuditFlowStart":
        return engine.audit_written(flow, data.draw(st.booleans()), now)
    if what == "ConnectOfframp":
        outcome = data.draw(st.sampled_from(["connected", "refused", "unreachable", "error"]))
        if outcome == "connected":
            return engine.offramp_connected(flow, now)
        err = {"refused": errno.ECONNREFUSED, "unreachable": errno.EHOSTUNREACH,
               "error": errno.EMFILE}[outcome]
        return engine.offramp_failed(flow, outcome, err, now)
    outcome = data.draw(st.sampled_from(["opened", "unreachable", "icmp_not_permitted"]))
    if outcome == "opened":
        return engine.datagram_opened(flow, now)
    return engine.datagram_failed(flow, outcome, "net" if outcome == "unreachable" else "", now)


def test_the_books_catch_a_flow_started_twice():
    """The invariants above can fail (a sanity check of the checker)."""
    engine = make_engine()
    books = Books(engine)
    books.take(engine.tunnel_packet(FakeTunnel(), tcp(), 0.0))
    flow = next(iter(books.live))
    try:
        books.take([FlowStarted(flow)])
    except AssertionError:
        return
    raise AssertionError("a second start went unnoticed")

