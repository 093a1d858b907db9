"""The sharding rule: which worker owns a flow.

owner(flow) = symmetric_hash(flow) mod N. Symmetric: both directions of a flow (source and
destination swapped) hash alike, so replies find the same owner. The hash is 32-bit arithmetic
with only xor, shift and multiply, so that the classic-BPF program on the GUE socket
(:mod:`ipferry.wire.steering`) computes the very same value in the kernel. The tenant is left
out on purpose: the kernel can steer by headers alone, and one tenant's flows still spread over
all workers.
"""

from __future__ import annotations

M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # an odd multiplier with good avalanche for 32-bit integer hashing


def _fold(address: bytes) -> int:
    """An IPv4 address as an integer, an IPv6 address as the xor of its four 32-bit words."""
    n = int.from_bytes(address, "big")
    out = 0
    while n:
        out ^= n & M32
        n >>= 32
    return out


def flow_hash(protocol: int, src: bytes, sport: int, dst: bytes, dport: int) -> int:
    h = _fold(src) ^ _fold(dst) ^ (((sport ^ dport) * 0x10001) & M32) ^ protocol
    h ^= h >> 16
    h = (h * _MIX) & M32
    h ^= h >> 16
    h = (h * _MIX) & M32
    h ^= h >> 16
    return h


def owner(protocol: int, src: bytes, sport: int, dst: bytes, dport: int, workers: int) -> int:
    return flow_hash(protocol, src, sport, dst, dport) % workers
