"""The reset the data path answers a TCP segment with, as a TCP stack would."""

import dpkt
from hypothesis import given
from hypothesis import strategies as st

from ipferry.engine.core import reset_for
from ipferry.wire.packet import parse
from tests.wire.packets import PORT, UNICAST_ADDRS, l4_checksum_ok, tcp


@given(UNICAST_ADDRS, PORT, PORT, st.integers(0, 2**32 - 1), st.booleans(),
       st.binary(max_size=40))
def test_reset_for_answers_like_a_tcp_stack(addrs, sport, dport, seq, with_ack, payload):
    """Checked against dpkt: checksums right, RFC 793's sequence and acknowledgment numbers."""
    src, dst = addrs
    flags = dpkt.tcp.TH_ACK if with_ack else dpkt.tcp.TH_SYN
    packet = tcp(src, dst, sport, dport, flags=flags, payload=payload, seq=seq)
    rst = reset_for(parse(packet), packet)
    assert l4_checksum_ok(rst, 40 if len(src) == 16 else 20, dpkt.ip.IP_PROTO_TCP)
    ip = dpkt.ip6.IP6(rst) if len(src) == 16 else dpkt.ip.IP(rst)
    if len(src) == 4:
        assert ip.len == 40 and dpkt.ip.IP(rst).sum == ip.sum
    seg = ip.data
    assert (ip.src, ip.dst, seg.sport, seg.dport) == (dst, src, dport, sport)
    if with_ack:
        assert seg.flags == dpkt.tcp.TH_RST and seg.seq == 678  # the segment's ACK number
    else:
        assert seg.flags == dpkt.tcp.TH_RST | dpkt.tcp.TH_ACK and seg.seq == 0
        assert seg.ack == (seq + len(payload) + 1) & 0xFFFFFFFF
