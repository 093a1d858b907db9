"""TUN devices whose fd we keep, so it can be handed to a worker with SCM_RIGHTS.

pyroute2's tuntap support opens ``/dev/net/tun``, configures and closes the fd; we need the fd
itself, so we open and ``TUNSETIFF`` here and use pyroute2 only for addresses, routes and state.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from .namespace import HostError

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
# Offload (see :mod:`ipferry.wire.vnet`): virtio-net headers, TSO and partial checksums.
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
TUN_PATH = "/dev/net/tun"


def open_tun(name: str, offload: bool = False, multi_queue: bool = False) -> tuple[int, str]:
    """Create (or attach to) TUN device ``name``; returns (non-blocking fd, the kernel's name).

    ``offload``: virtio-net headers with TSO and partial checksums (see :mod:`ipferry.wire.vnet`).
    ``multi_queue``: a device of many queues, one fd each (every call with the same name after
    the first adds a queue).
    """
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise HostError(f"{TUN_PATH} does not exist", "modprobe tun (and create the device node: "
                        "mknod /dev/net/tun c 10 200; chmod 0666 /dev/net/tun)") from None
    except PermissionError:
        mode = oct(os.stat(TUN_PATH).st_mode & 0o777)
        raise HostError(f"cannot open {TUN_PATH}: permission denied (mode {mode})",
                        f"chmod 0666 {TUN_PATH}, the distribution default") from None
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0) | \
            (IFF_MULTI_QUEUE if multi_queue else 0)
        ifr = struct.pack("16sH22x", name.encode(), flags)
        ifr = fcntl.ioctl(fd, TUNSETIFF, ifr)
        if offload:
            fcntl.ioctl(fd, TUNSETOFFLOAD, OFFLOADS)
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EPERM:
            raise HostError(f"TUNSETIFF on {name} refused (EPERM)",
                            "run the namespace helper inside its own user namespace") from None
        raise
    return fd, ifr[:16].rstrip(b"\0").decode()
