"""The GUE codec: what we send decodes back; anything else is refused with a reason."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipferry.worker import gue

IPV4 = bytes.fromhex("4500001c000000004011000001020304050607080000000000080000")
IPV6 = bytes.fromhex("6000000000081140") + bytes(32) + bytes(8)


@given(st.binary(max_size=gue.MAX_CONTEXT).map(lambda b: b.rstrip(b"\0")),
       st.sampled_from([IPV4, IPV6]))
def test_round_trip(context, packet):
    version = packet[0] >> 4
    datagram = gue.header(context, version) + packet
    assert len(datagram) % 4 == len(packet) % 4  # the header is whole words
    assert gue.decapsulate(datagram) == (context, packet)


def test_reply_header_decodes_with_no_context():
    assert gue.decapsulate(gue.reply_header(4) + IPV4) == (b"", IPV4)
    assert gue.decapsulate(gue.reply_header(6) + IPV6) == (b"", IPV6)


def test_too_long_a_context_is_refused():
    with pytest.raises(ValueError, match="at most 124"):
        gue.header(b"x" * 125, 4)


@pytest.mark.parametrize("datagram,why", [
    (b"\x00\x04\x00\x00", "shorter"),
    (b"\x40\x04\x00\x00" + IPV4, "variant 0"),
    (b"\x20\x04\x00\x00" + IPV4, "variant 0"),  # C bit: a control message
    (b"\x00\x04\x80\x00" + IPV4, "flags"),
    (b"\x00\x29\x00\x00" + IPV4, "does not match"),
    (b"\x1f\x04\x00\x00" + IPV4, "runs past"),
])
def test_bad_datagrams_say_why(datagram, why):
    with pytest.raises(gue.BadGue, match=why):
        gue.decapsulate(datagram)


@given(st.binary(max_size=200))
def test_garbage_never_raises_anything_else(data):
    try:
        gue.decapsulate(data)
    except gue.BadGue:
        pass
