"""The flow state machine and its accounting, driven by packet events (no sockets)."""

from hypothesis import given
from hypothesis import strategies as st

from ipferry.engine.flows import (
    CloseReason,
    Direction,
    FlowKey,
    FlowTable,
    LimitReached,
    TcpState,
    Timeouts,
)
from ipferry.wire.packet import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN

KEY = FlowKey("acme", 6, b"\x0a\0\0\x02", 40000, b"\xc6\x12\0\x01", 80)
C, S = Direction.TO_SERVER, Direction.TO_CLIENT


def handshake(table: FlowTable, now: float = 0.0):
    flow = table.start(KEY, "allow", now)
    table.observe(flow, C, TCP_SYN, 60, now)
    table.observe(flow, S, TCP_SYN | TCP_ACK, 60, now)
    table.observe(flow, C, TCP_ACK, 52, now)
    return flow


def test_key_reply_is_an_involution():
    assert KEY.reply().reply() == KEY
    assert KEY.reply() == FlowKey("acme", 6, KEY.dst, 80, KEY.src, 40000)


def test_handshake_data_fin_fin_ack_is_a_clean_close_with_accounting():
    t = FlowTable()
    flow = handshake(t)
    assert flow.state is TcpState.ESTABLISHED
    t.observe(flow, C, TCP_ACK, 152, 1.0)
    t.observe(flow, S, TCP_ACK, 1052, 1.5)
    t.observe(flow, C, TCP_FIN | TCP_ACK, 52, 2.0)
    assert flow.state is TcpState.FIN_WAIT
    t.observe(flow, S, TCP_ACK, 1052, 2.1)  # half-closed: the server keeps sending
    t.observe(flow, S, TCP_FIN | TCP_ACK, 52, 2.2)
    assert flow.state is TcpState.CLOSING
    t.observe(flow, C, TCP_ACK, 52, 2.3)
    assert flow.state is TcpState.TIME_WAIT
    assert flow.packets == [5, 4] and flow.bytes == [60 + 52 + 152 + 52 + 52, 60 + 1052 * 2 + 52]
    assert t.expire(100.0) == []  # TIME_WAIT lasts 120 s
    assert t.expire(122.4) == [flow]
    assert flow.close_reason is CloseReason.FIN and flow.state is TcpState.CLOSED
    assert len(t) == 0 and t.tenant_count("acme") == 0


def test_rst_ends_at_once_and_only_once():
    t = FlowTable()
    flow = handshake(t)
    assert t.observe(flow, S, TCP_RST, 40, 1.0) is True
    assert flow.close_reason is CloseReason.RST
    assert t.end(flow, CloseReason.EVICTED) is False
    assert t.get(KEY) is None


def test_idle_timeouts_follow_the_state():
    t = FlowTable(timeouts=Timeouts(syn_sent=5, established=50))
    flow = t.start(KEY, "allow", 0.0)
    t.observe(flow, C, TCP_SYN, 60, 0.0)
    assert t.expire(4.9) == [] and t.expire(5.0) == [flow]
    assert flow.close_reason is CloseReason.IDLE
    flow = handshake(t, 10.0)
    assert t.expire(59.0) == [] and t.expire(60.0) == [flow]


def test_limits_per_tenant_and_per_worker():
    t = FlowTable(max_flows=3, max_flows_per_tenant=2)
    keys = [FlowKey(tenant, 6, b"\x01" * 4, p, b"\x02" * 4, 80)
            for tenant, p in (("a", 1), ("a", 2), ("a", 3), ("b", 1), ("c", 1))]
    assert t.start(keys[0], 1, 0) and t.start(keys[1], 1, 0)
    assert t.start(keys[2], 1, 0) is LimitReached.TENANT
    assert t.start(keys[3], 1, 0) is not LimitReached.TENANT
    assert t.start(keys[4], 1, 0) is LimitReached.WORKER
    t.end(t.get(keys[0]), CloseReason.EVICTED)
    assert t.start(keys[2], 1, 0).key == keys[2]


FLAGS = st.sampled_from([TCP_SYN, TCP_SYN | TCP_ACK, TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST, 0])


@given(st.lists(st.tuples(st.sampled_from([C, S]), FLAGS, st.integers(20, 9000)), max_size=40))
def test_any_packet_sequence_keeps_the_table_consistent(events):
    t = FlowTable()
    flow = t.start(KEY, "allow", 0.0)
    ended = 0
    for i, (direction, flags, length) in enumerate(events):
        if t.get(KEY) is None:
            break
        ended += t.observe(flow, direction, flags, length, float(i))
    assert ended <= 1
    assert sum(flow.packets) <= len(events)
    assert (t.get(KEY) is None) == (flow.state is TcpState.CLOSED)
    assert t.tenant_count("acme") == len(t)
    t.expire(10**9)
    assert len(t) == 0 and flow.close_reason is not None


UDP = FlowKey("acme", 17, b"\x0a\0\0\x02", 40000, b"\xc6\x12\0\x01", 53)
PING = FlowKey("acme", 1, b"\x0a\0\0\x02", 777, b"\xc6\x12\0\x01", 0)


def test_datagram_flows_are_unreplied_then_replied_with_conntracks_timeouts():
    table = FlowTable(timeouts=Timeouts(udp_unreplied=30, udp_replied=120, icmp=10))
    query = table.start(UDP, "allow", 0.0)
    answered = table.start(UDP.reply(), "allow", 0.0)
    ping = table.start(PING, "allow", 0.0)
    assert query.state == answered.state == "unreplied"
    assert not table.observe(answered, S, 0, 80, 1.0)  # datagram flows never end by a packet
    assert answered.state == "replied" and answered.packets == [0, 1]
    assert [f.key for f in table.expire(11.0)] == [PING]  # ICMP: its own timeout
    assert [f.key for f in table.expire(30.0)] == [UDP]  # a lone query: the short one
    assert table.expire(120.0) == []
    [gone] = table.expire(121.0)
    assert gone is answered and gone.close_reason is CloseReason.IDLE and ping.state == "closed"


def test_datagram_flows_have_their_own_tenant_limit():
    table = FlowTable(max_flows_per_tenant=10, max_datagram_flows_per_tenant=2)
    udp = [table.start(FlowKey("acme", 17, b"\x0a\0\0\x02", p, b"\xc6\x12\0\x01", 53), None, 0)
           for p in (1, 2, 3)]
    assert udp[2] is LimitReached.DATAGRAM_TENANT
    assert not isinstance(table.start(KEY, None, 0), LimitReached)  # TCP still may
    table.end(udp[0], CloseReason.IDLE)
    assert not isinstance(table.start(FlowKey("acme", 1, b"\x0a\0\0\x02", 9, b"\x01" * 4, 0),
                                      None, 0), LimitReached)
