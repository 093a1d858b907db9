"""Checksum arithmetic against a word-by-word reference (RFC 1071) on random bytes."""

from hypothesis import given
from hypothesis import strategies as st

from ipferry.wire.checksum import checksum, ones_sum, update


def reference_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


@given(st.binary(max_size=2000))
def test_ones_sum_matches_reference(data):
    assert ones_sum(data) % 0xFFFF == reference_sum(data) % 0xFFFF


@given(st.binary(max_size=200))
def test_checksum_verifies(data):
    if len(data) % 2:
        data += b"\0"
    c = checksum(data)
    # A buffer with its checksum appended sums to 0xFFFF (or the data was all zero).
    assert ones_sum(data + c.to_bytes(2, "big")) == 0xFFFF


@given(st.binary(min_size=4, max_size=400).filter(lambda b: len(b) % 2 == 0), st.data())
def test_incremental_update_equals_recomputation(data, draw):
    words = len(data) // 2
    i = draw.draw(st.integers(0, words - 1)) * 2
    j = draw.draw(st.integers(i // 2 + 1, words)) * 2
    new = draw.draw(st.binary(min_size=j - i, max_size=j - i))
    before = checksum(data)
    changed = data[:i] + new + data[j:]
    # Equal as one's-complement values (0x0000 and 0xFFFF both mean zero).
    assert update(before, data[i:j], new) % 0xFFFF == checksum(changed) % 0xFFFF
