"""The address plan inside nsd's namespace: one NAT block per worker, routed to its own TUN.

Worker ``i`` owns the ``i``-th subnet of the configured pools. The first host address of the block
is on the worker's TUN and is where its upgrade listener binds; the rest of the block are NAT slots,
so whatever the kernel sends to a slot comes out of the owner's TUN and no other.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPv4Net = ipaddress.IPv4Network
IPv6Net = ipaddress.IPv6Network


@dataclass(frozen=True)
class WorkerBlock:
    index: int
    tun_name: str
    ipv4: IPv4Net
    ipv6: IPv6Net

    @property
    def ipv4_local(self) -> ipaddress.IPv4Address:
        return self.ipv4.network_address + 1

    @property
    def ipv6_local(self) -> ipaddress.IPv6Address:
        return self.ipv6.network_address + 1

    def as_dict(self) -> dict:
        return {"index": self.index, "tun": self.tun_name, "ipv4": str(self.ipv4),
                "ipv6": str(self.ipv6), "ipv4_local": str(self.ipv4_local),
                "ipv6_local": str(self.ipv6_local)}


def capacity(pool: IPv4Net | IPv6Net, block_prefix: int) -> int:
    """How many worker blocks of ``/block_prefix`` fit in ``pool`` (0 if the prefix is too short)."""
    if block_prefix < pool.prefixlen or block_prefix > pool.max_prefixlen - 2:
        return 0
    return 1 << (block_prefix - pool.prefixlen)


def worker_block(index: int, *, ipv4_pool: IPv4Net, ipv4_prefix: int, ipv6_pool: IPv6Net,
                 ipv6_prefix: int, tun_prefix: str = "ipf") -> WorkerBlock:
    if not 0 <= index < min(capacity(ipv4_pool, ipv4_prefix), capacity(ipv6_pool, ipv6_prefix)):
        raise ValueError(f"worker {index} has no block in {ipv4_pool}/{ipv6_pool}")
    v4 = ipaddress.IPv4Network(
        (int(ipv4_pool.network_address) + (index << (32 - ipv4_prefix)), ipv4_prefix))
    v6 = ipaddress.IPv6Network(
        (int(ipv6_pool.network_address) + (index << (128 - ipv6_prefix)), ipv6_prefix))
    return WorkerBlock(index, f"{tun_prefix}{index}", v4, v6)
