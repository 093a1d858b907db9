"""The GUE codec: what we send decodes back; anything else is refused with a reason."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipferry.wire import gue

IPV4 = bytes.fromhex("4500001c000000004011000001020304050607080000000000080000")
IPV6 = bytes.fromhex("6000000000081140") + bytes(32) + bytes(8)


@given(st.binary(max_size=gue.MAX_CONTEXT).map(lambda b: b.rstrip(b"\0"))
       .filter(lambda b: b[:1] != b"\0"),  # private data starting "\\0vnet\\0" is the offload option
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


@given(st.binary(max_size=gue.MAX_VNET_CONTEXT).map(lambda b: b.rstrip(b"\0")),
       st.binary(min_size=10, max_size=10), st.sampled_from([IPV4, IPV6]))
def test_offload_option_round_trip(context, vnet_header, packet):
    """The virtio-net header rides at the end of the private data; the packet stays where the
    header length says (where the kernel's steering program looks)."""
    head = gue.header(context, packet[0] >> 4, vnet=True)
    datagram = head + vnet_header + b"\0\0" + packet
    assert datagram[4 + 4 * (datagram[0] & 0x1F):] == packet
    assert gue.decapsulate(datagram) == (gue.VNET_MAGIC + context, vnet_header + packet)


def test_offload_replies_decode_and_contexts_that_fit_no_option_are_refused():
    datagram = gue.vnet_reply_header(4) + bytes(10) + b"\0\0" + IPV4
    assert gue.decapsulate(datagram) == (gue.VNET_MAGIC, bytes(10) + IPV4)
    with pytest.raises(ValueError, match="at most 104"):
        gue.header(b"x" * 105, 4, vnet=True)
    cut = bytes([2, 4, 0, 0]) + gue.VNET_MAGIC + b"\0\0" + IPV4  # magic, but no room for it
    with pytest.raises(gue.BadGue, match="offload option"):
        gue.decapsulate(cut)
