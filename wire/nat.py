"""The worker's NAT: slots in its own block, and in-place rewrites with incremental checksums.

Upgrading a flow means addressing its packets to the worker's upgrade listener inside nsd's
namespace. Each flow gets a *NAT slot*, an (address, port) of the worker's block, as the new
source; the kernel's accepted connection then has the slot as its peer, which names the flow.
Replies from the kernel are addressed to the slot and are rewritten back to the client.
Both IPv4 and IPv6: an IPv6 block (a /64) has far more addresses than a worker needs, so a pool
takes only the first few.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
import struct
from collections import deque
from collections.abc import Container
from typing import NamedTuple

from .checksum import update
from .packet import Parsed

_PORT = struct.Struct("!H")
FIRST_PORT = 1024
LAST_PORT = 65535
IPV6_MAX_ADDRESSES = 4096  # flows spread over addresses: a PMTU learnt for one rarely hits another


class NatSlot(NamedTuple):
    """A tuple, so that it *is* the key a packet's (destination, port) finds its flow by: one
    object per flow, not a slot and a key."""

    address: bytes  # 4 or 16 bytes
    port: int

    def __str__(self) -> str:
        if len(self.address) == 16:
            return f"[{ipaddress.IPv6Address(self.address)}]:{self.port}"
        return f"{ipaddress.IPv4Address(self.address)}:{self.port}"


class SlotPoolExhausted(Exception):
    pass


class NatPool:
    """Slots of one IPv4 or IPv6 block: fresh ones first, released ones only after a quarantine.

    The quarantine keeps a 4-tuple out of use while the namespace's kernel may still hold it in
    TIME_WAIT: a new SYN on it could be taken for an old segment.

    The pool uses the first ``max_addresses`` hosts of the block not in ``reserved``, found
    without walking the whole block. ``None`` (the default) means every host of an IPv4 block (a
    /16 gives 65533 addresses with one reserved) and the first :data:`IPV6_MAX_ADDRESSES` of an
    IPv6 block, whose /64 has 2**64.

        >>> pool = NatPool(ipaddress.IPv6Network("fd00:100::/64"),
        ...                {ipaddress.IPv6Address("fd00:100::1")})
        >>> pool.capacity == IPV6_MAX_ADDRESSES * (LAST_PORT - FIRST_PORT + 1)
        True
    """

    def __init__(self, block: ipaddress.IPv4Network | ipaddress.IPv6Network,
                 reserved: Container[ipaddress.IPv4Address | ipaddress.IPv6Address],
                 quarantine: float = 60.0, *, max_addresses: int | None = None) -> None:
        if max_addresses is None and block.version == 6:
            max_addresses = IPV6_MAX_ADDRESSES
        # hosts() is a generator: islice stops it after the addresses we take.
        free = (a.packed for a in block.hosts() if a not in reserved)
        self._addresses = list(itertools.islice(free, max_addresses))
        if not self._addresses:
            raise ValueError(f"{block} has no address left for NAT slots")
        self._ports = LAST_PORT - FIRST_PORT + 1
        self.capacity = len(self._addresses) * self._ports
        # A random start: a restarted worker must not reuse the slots its predecessor left
        # established in the namespace's kernel (they die only by the kernel's timers).
        self._start = random.randrange(self.capacity)
        self._next_fresh = 0
        self._released: deque[tuple[float, NatSlot]] = deque()
        self.quarantine = quarantine
        self.in_use = 0

    def claim(self, now: float) -> NatSlot:
        """A slot (``now``: monotonic seconds, the caller's clock: a released slot's quarantine
        is over when ``now`` passes it)."""
        if self._released and self._released[0][0] <= now:
            slot = self._released.popleft()[1]
        elif self._next_fresh < self.capacity:
            # Walk addresses first, then ports, so consecutive flows differ in address.
            i = (self._start + self._next_fresh) % self.capacity
            self._next_fresh += 1
            slot = NatSlot(self._addresses[i % len(self._addresses)],
                           FIRST_PORT + i // len(self._addresses))
        else:
            raise SlotPoolExhausted(f"all {self.capacity} NAT slots are in use or in quarantine")
        self.in_use += 1
        return slot

    def release(self, slot: NatSlot, now: float) -> None:
        self.in_use -= 1
        ready_at = now + self.quarantine
        self._released.append((ready_at, slot))


_V4_ADDRS = slice(12, 20)
_V6_ADDRS = slice(8, 40)


def _partial_update(field: int, old: bytes, new: bytes) -> int:
    """A *partial* TCP checksum (offload: the field holds the pseudo-header's sum, not the
    complement of a total) after the pseudo-header's addresses changed from ``old`` to ``new``.
    The ports are not in it: whoever finishes the checksum sums the header as it is then."""
    return ~update(~field & 0xFFFF, old, new) & 0xFFFF


def _rewrite_tcp(packet: bytearray, addrs: slice, l4: int, new_addrs: bytes, sport: int,
                 dport: int, partial: bool) -> bytes:
    """Addresses (at ``addrs``) and ports (at ``l4``) rewritten, the TCP checksum updated over
    just the changed bytes (RFC 1624); returns the old addresses for an IP header checksum."""
    old_addrs = bytes(packet[addrs])
    old_ports = bytes(packet[l4:l4 + 4])
    new_ports = _PORT.pack(sport) + _PORT.pack(dport)
    off = l4 + 16
    tcp_csum = (packet[off] << 8) | packet[off + 1]
    if partial:
        tcp_csum = _partial_update(tcp_csum, old_addrs, new_addrs)
    else:
        tcp_csum = update(tcp_csum, old_addrs + old_ports, new_addrs + new_ports)
    packet[off:off + 2] = _PORT.pack(tcp_csum)
    packet[addrs] = new_addrs
    packet[l4:l4 + 4] = new_ports
    return old_addrs


def rewrite_ipv4_tcp(packet: bytearray, ihl: int, src: bytes, sport: int, dst: bytes,
                     dport: int, partial: bool = False) -> None:
    """Rewrite addresses and ports of an IPv4 TCP packet in place, checksums updated (RFC 1624).

    The IP header checksum covers the addresses; the TCP checksum covers them too (through the
    pseudo-header) and the ports. Only the 12 changed bytes are summed, never the payload.
    ``partial``: the TCP checksum is an offloaded partial one (see :func:`_partial_update`).
    """
    new_addrs = src + dst
    old_addrs = _rewrite_tcp(packet, _V4_ADDRS, ihl, new_addrs, sport, dport, partial)
    ip_csum = update((packet[10] << 8) | packet[11], old_addrs, new_addrs)
    packet[10:12] = _PORT.pack(ip_csum)


def rewrite_ipv6_tcp(packet: bytearray, l4: int, src: bytes, sport: int, dst: bytes,
                     dport: int, partial: bool = False) -> None:
    """Rewrite addresses and ports of an IPv6 TCP packet in place (TCP header at ``l4``).

    IPv6 has no header checksum; the TCP checksum covers the addresses through the pseudo-header
    and the ports: RFC 1624 over those 36 bytes, never the payload.
    """
    _rewrite_tcp(packet, _V6_ADDRS, l4, src + dst, sport, dport, partial)


def rewrite_tcp(packet: bytearray, p: Parsed, src: bytes, sport: int, dst: bytes,
                dport: int, partial: bool = False) -> None:
    """Rewrite a TCP packet that ``parse`` returned ``p`` for, whichever its IP version."""
    if p.version == 6:
        rewrite_ipv6_tcp(packet, p.ihl, src, sport, dst, dport, partial)
    else:
        rewrite_ipv4_tcp(packet, p.ihl, src, sport, dst, dport, partial)
