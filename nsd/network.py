"""Building the namespace's network: loopback, one TUN per worker with its block, the listeners."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute

from ipferry.wire import vnet

from .addressing import WorkerBlock
from .tun import open_tun

IFA_F_NODAD = 0x02  # the address is usable at once: listeners bind before DAD would finish

# Defaults for the namespace's own kernel. The NAT slots are sources the kernel never routed
# out, so reverse-path filtering must be off; the rest sizes the kernel for proxying.
DEFAULT_SYSCTLS: dict[str, str] = {
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
    "net.ipv4.ip_local_port_range": "1024 65535",
    "net.core.somaxconn": "8192",
    "net.ipv4.tcp_rmem": "4096 131072 16777216",
    "net.ipv4.tcp_wmem": "4096 131072 16777216",
    "net.ipv6.conf.all.disable_ipv6": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    # No router lives behind a TUN: don't have every new device solicit one into its worker.
    "net.ipv6.conf.default.router_solicitations": "0",
    "net.ipv6.conf.default.accept_ra": "0",
}

UPGRADE_PORT = 1  # the upgrade listeners own their address; any fixed port will do


@dataclass
class WorkerEquipment:
    """What nsd hands out for one worker: its TUN and its upgrade listeners."""

    block: WorkerBlock
    tun_fd: int
    upgrade4: socket.socket
    upgrade6: socket.socket

    def fds(self) -> dict[str, int]:
        return {"tun": self.tun_fd, "upgrade4": self.upgrade4.fileno(),
                "upgrade6": self.upgrade6.fileno()}

    def close(self) -> None:
        os.close(self.tun_fd)
        self.upgrade4.close()
        self.upgrade6.close()


def bring_up_loopback(ipr: IPRoute) -> None:
    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def add_worker_tun(ipr: IPRoute, block: WorkerBlock, mtu: int, backlog: int = 4096,
                   offload: bool = False) -> WorkerEquipment:
    """Create the worker's TUN, address it with its block (which routes the block to it), listen."""
    tun_fd, name = open_tun(block.tun_name, offload)
    try:
        idx = ipr.link_lookup(ifname=name)[0]
        if offload:
            ipr.link("set", index=idx, gso_max_size=vnet.GSO_MAX_SIZE)
        ipr.link("set", index=idx, mtu=mtu, state="up")
        # Addressing the TUN with the block's prefix makes the kernel route the whole block to it.
        ipr.addr("add", index=idx, address=str(block.ipv4_local), prefixlen=block.ipv4.prefixlen)
        ipr.addr("add", index=idx, address=str(block.ipv6_local), prefixlen=block.ipv6.prefixlen,
                 flags=IFA_F_NODAD)
        upgrade4 = _listener(socket.AF_INET, str(block.ipv4_local), backlog)
        upgrade6 = _listener(socket.AF_INET6, str(block.ipv6_local), backlog)
    except BaseException:
        os.close(tun_fd)
        raise
    return WorkerEquipment(block, tun_fd, upgrade4, upgrade6)


def _listener(family: int, address: str, backlog: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, UPGRADE_PORT))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
