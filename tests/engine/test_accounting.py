"""Payload accounting by sequence advance: retransmissions and reordering never count twice."""

import dpkt

from ipferry.engine.core import count_payload
from ipferry.engine.flows import Direction, Flow, FlowKey, FlowTable, TcpState
from ipferry.wire.packet import TCP_ACK, TCP_FIN, parse

KEY = FlowKey("t", 6, b"\x0a\0\0\x02", 40000, b"\xc6\x12\0\x01", 80)


def seg(seq: int, payload: bytes = b"", flags=dpkt.tcp.TH_ACK) -> bytes:
    ip = dpkt.ip.IP(src=KEY.src, dst=KEY.dst, p=6, ttl=64,
                    data=dpkt.tcp.TCP(sport=1, dport=2, seq=seq, flags=flags, data=payload))
    ip.len = 40 + len(payload)
    return bytes(ip)


def entry() -> Flow:
    return FlowTable().start(KEY, None, 0.0)


def test_retransmissions_and_old_segments_add_nothing():
    e = entry()
    count_payload(e, 0, parse(seg(0xFFFFFFF0, flags=dpkt.tcp.TH_SYN)))  # seq wraps soon
    base = 0xFFFFFFF1
    for seq, data in [(base, b"a" * 10), (base + 10, b"b" * 20), (base, b"a" * 10),  # dup
                      (base + 10, b"b" * 25),  # overlaps, 5 new
                      (base + 100, b"c" * 5)]:  # a hole: not counted until it is filled
        count_payload(e, 0, parse(seg(seq & 0xFFFFFFFF, data)))
    assert e.payload[0] == 35


def test_late_ack_of_the_first_fin_does_not_close_the_flow():
    t = FlowTable()
    f = t.start(KEY, None, 0.0)
    f.state = TcpState.ESTABLISHED
    t.observe(f, Direction.TO_CLIENT, TCP_FIN | TCP_ACK, 40, 1)  # server's FIN first
    t.observe(f, Direction.TO_SERVER, TCP_FIN | TCP_ACK, 40, 1)  # client's FIN second
    t.observe(f, Direction.TO_SERVER, TCP_ACK, 40, 1)  # client's late ACK of the first FIN
    assert f.state is TcpState.CLOSING
    t.observe(f, Direction.TO_CLIENT, TCP_ACK, 40, 1)  # the server acknowledges the last FIN
    assert f.state is TcpState.TIME_WAIT
