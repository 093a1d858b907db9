"""Internet checksums: full (RFC 1071) and incremental (RFC 1624), for the NAT fast path.

Rewriting an address or a port must not cost a pass over the payload: RFC 1624's
``HC' = ~(~HC + ~m + m')`` folds the change of each 16-bit word into the old checksum.
"""

from __future__ import annotations


def ones_sum(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """The 16-bit one's-complement sum of ``data`` (odd length: padded with a zero byte).

    Since 2**16 == 1 (mod 0xFFFF), a buffer read as one big-endian integer is congruent to the sum
    of its 16-bit words: one C-level conversion and one modulo instead of a loop per word.
    """
    n = int.from_bytes(data, "big")
    if len(data) % 2:
        n <<= 8
    if n == 0 and start == 0:
        return 0
    r = (n + start) % 0xFFFF
    return r or 0xFFFF  # a non-zero sum congruent to 0 is 0xFFFF (negative zero) in one's complement


def checksum(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """The Internet checksum of ``data`` (``start``: a pseudo-header's ``ones_sum``)."""
    return ~ones_sum(data, start) & 0xFFFF


def update(old_checksum: int, old: bytes, new: bytes) -> int:
    """RFC 1624 eqn. 3: the checksum after 16-bit-aligned ``old`` bytes were replaced by ``new``."""
    total = (~old_checksum & 0xFFFF) + (~ones_sum(old) & 0xFFFF) + ones_sum(new)
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
