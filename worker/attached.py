"""Tunnels whose TUN device the client handed over: the worker reads and writes it itself.

A local client (``ipferry connect``) does not need to copy packets between its TUN and a tunnel
socket: it passes the TUN's fds over its connected tunnel with SCM_RIGHTS (the way pasta and
slirp4netns attach to a namespace's device), and the packets go straight from the client's
namespace into the worker, one Python step per packet instead of three. The device is
multi-queue, one queue per worker: the worker that accepted the tunnel (the *holder*) keeps one
and gives one to each other worker over the mesh.

The kernel picks the queue of a packet leaving the namespace by its flow's hash, and learns from
writes: once a worker has written a flow's packet on its queue, the flow's next packets are read
there. So the first packet of a flow another worker owns crosses the mesh as any other tunnel's
would, its owner answers on its own queue, and the rest of the flow comes straight to the owner.

A fd from a client is checked before use: a TUN queue (``TUNGETIFF``), plain TUN without packet
information, with the virtio-net header of the framing the client asked for.
"""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from ipferry.wire.vnet import HEADER_SIZE

from . import metrics
from .app import TunnelContext
from .tunnels import next_id

READ_SIZE = 65536 + HEADER_SIZE  # a packet at the largest MTU, and a virtio-net header
BATCH = 64  # packets drained per wake-up before yielding to the loop
MAX_QUEUES = 64  # fds taken from one message; more are closed unread

TUNGETIFF = 0x800454D2
TUNGETVNETHDRSZ = 0x800454D7
IFF_TUN, IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0001, 0x0002, 0x1000, 0x4000

# After the client has shut its end (its command exited), the last packets (FINs, their ACKs)
# still cross: the tunnel closes after this much quiet on its queue, or this long at most.
LINGER_IDLE = 0.1
LINGER_MAX = 1.0


class NotATun(ValueError):
    """A passed fd that is not a TUN queue of the tunnel's framing (the reason)."""


def check_tun(fd: int, vnet: bool) -> None:
    """Raise :class:`NotATun` unless ``fd`` is an attached TUN queue (no packet information)
    with a 10-byte virtio-net header exactly when ``vnet``."""
    try:
        ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        raise NotATun(f"not an attached TUN queue ({code})") from None
    flags = struct.unpack_from("H", ifr, 16)[0]
    if flags & IFF_TAP or not flags & IFF_TUN:
        raise NotATun("a TAP device, not TUN")
    if not flags & IFF_NO_PI:
        raise NotATun("a TUN with packet information (IFF_NO_PI unset)")
    if bool(flags & IFF_VNET_HDR) != vnet:
        raise NotATun("virtio-net headers " + ("missing (the tunnel asked for offload)" if vnet
                                               else "on, the tunnel asked for plain packets"))
    if vnet:
        size = array.array("i", [0])
        fcntl.ioctl(fd, TUNGETVNETHDRSZ, size)
        if size[0] != HEADER_SIZE:
            raise NotATun(f"a {size[0]}-byte virtio-net header, not {HEADER_SIZE}")


def recv_fds(sock: socket.socket) -> tuple[bytes, list[int], bool]:
    """One datagram, the fds that came with it (close-on-exec), and whether more fds came than
    :data:`MAX_QUEUES` (then they are all closed, and none returned). BlockingIOError when
    nothing is there."""
    data, ancdata, flags, _ = sock.recvmsg(
        256, socket.CMSG_SPACE(MAX_QUEUES * 4), socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, raw in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(raw[:len(raw) - len(raw) % got.itemsize])
            fds.extend(got)
    if flags & socket.MSG_CTRUNC:
        close_all(fds)
        return data, [], True
    return data, fds, False


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class AttachedTunnel:
    """One worker's queue of a client's TUN device, as its flows use it (a
    :class:`ipferry.worker.tunnels.Tunnel`).

    ``device`` names the device across workers: (the holder's index, its tunnel id). The
    holder's object also has the client's connection (``control``), whose end is the tunnel's;
    it exists (routes claimed, admin API row) before the client's fds arrive and :meth:`attach`
    starts reading.
    """

    local = True  # read by this worker
    anycast = False
    steered = False  # the kernel's queue choice is not our hash: ...
    # ... so a new flow (a SYN, an echo request) is served by the worker whose queue it reached,
    # and the kernel keeps its later packets there (a TUN sends a flow's packets to the queue
    # its answers were written to); other packets of unknown flows go to their hash's owner.
    lands = True
    mtu = 65535

    def __init__(self, origin: int, context: TunnelContext, vnet: bool,
                 on_packet: Callable[[AttachedTunnel, bytes], None],
                 on_gone: Callable[[AttachedTunnel], None], *,
                 device: tuple[int, int] | None = None, onramp: str = "",
                 control: socket.socket | None = None) -> None:
        self.id = next_id()
        self.origin = origin
        self.device = device or (origin, self.id)
        self.context = context
        self.vnet = vnet
        self.onramp = onramp
        self.control = control  # the holder's: the client's connection
        self.fd = -1  # the queue it writes to (and reads)
        self.spare: list[int] = []  # more queues it reads: those no other worker could take
        self.queues = 0  # the holder's: how many queues the client passed
        self.shared_with: list[int] = []  # the holder's: the workers it gave a queue
        self.packets_in = 0
        self.packets_out = 0
        self.closed = False
        self.last = time.monotonic()  # when a packet was last read
        self._on_packet = on_packet
        self._on_gone = on_gone
        self._loop = asyncio.get_running_loop()

    @property
    def tenant(self) -> str:
        return self.context.tenant

    @property
    def attached(self) -> bool:
        return self.fd >= 0

    def attach(self, fd: int) -> None:
        """Read (and write to) the queue ``fd`` (checked by :func:`check_tun`; ours to close).
        A second call adds a queue read only: one no other worker took."""
        assert not self.closed
        os.set_blocking(fd, False)
        if self.fd < 0:
            self.fd = fd
        else:
            self.spare.append(fd)
        self._loop.add_reader(fd, self._drain, fd)
        metrics.TUN_QUEUES.inc()

    def _drain(self, fd: int) -> None:
        for _ in range(BATCH):
            try:
                packet = os.read(fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError:  # the device was deleted under us (CMD is root in its namespace)
                self._on_gone(self)
                return
            self.packets_in += 1
            self._on_packet(self, packet)
            if self.closed:
                return
        self.last = time.monotonic()

    def send(self, packet: bytes | bytearray) -> None:
        if self.fd < 0:
            return
        try:
            os.write(self.fd, packet)
        except OSError:
            # A packet the device refuses (over its MTU) or a full queue: lost, as on a link.
            metrics.DROPS.labels("tunnel_queue_full").inc()
            return
        self.packets_out += 1

    def as_dict(self) -> dict[str, Any]:
        if self.control is None:  # our queue of another worker's device: counted into its row
            return {"queue_of": list(self.device), "packets_in": self.packets_in,
                    "packets_out": self.packets_out}
        return {"id": self.id, "onramp": self.onramp, "kind": "tunnel", "offload": self.vnet,
                "attached": self.queues or 1, "device": list(self.device),
                "tenant": self.tenant, "context": self.context.extra,
                "packets_in": self.packets_in, "packets_out": self.packets_out}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in (self.fd, *self.spare):
            if fd >= 0:
                self._loop.remove_reader(fd)
                os.close(fd)
                metrics.TUN_QUEUES.dec()
        self.fd, self.spare = -1, []
        if self.control is not None:
            self._loop.remove_reader(self.control.fileno())
            self.control.close()
