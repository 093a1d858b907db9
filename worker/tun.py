"""The worker's side of its TUN device: drain what the kernel sends, write what we send."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from ipferry.wire.vnet import HEADER_SIZE as HEADER
from ipferry.wire.vnet import PLAIN

from . import metrics

READ_SIZE = 65536 + 16  # one packet at the largest MTU, and a virtio-net header
BATCH = 64  # packets drained per wake-up before yielding to the loop


class TunDevice:
    """A TUN fd registered with the loop; ``on_packet`` gets every packet the kernel sends.

    With ``vnet`` (offload on), what is read and written is a virtio-net header then the packet
    (see :mod:`ipferry.wire.vnet`): ``on_packet`` gets both as one buffer.
    """

    def __init__(self, fd: int, on_packet: Callable[[bytes], None] | None = None,
                 vnet: bool = False) -> None:
        self.fd = fd
        self.on_packet = on_packet
        self.vnet = vnet
        self._loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._drain)

    def _drain(self) -> None:
        for _ in range(BATCH):
            try:
                packet = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                self.close()
                return
            metrics.TUN_RX_PACKETS.inc()
            metrics.TUN_RX_BYTES.inc(len(packet) - (HEADER if self.vnet else 0))
            if self.on_packet is not None:
                self.on_packet(packet)

    def write(self, packet: bytes | bytearray, header: bytes | memoryview = PLAIN) -> None:
        """Write ``packet`` (with ``header`` in front on a vnet device: default, a plain one)."""
        try:
            if self.vnet:
                os.writev(self.fd, (header, packet))
            else:
                os.write(self.fd, packet)
        except OSError:
            # The kernel refused it (or the namespace is going away): a counted drop, not a crash.
            metrics.DROPS.labels("tun_write_failed").inc()
            return
        metrics.TUN_TX_PACKETS.inc()
        metrics.TUN_TX_BYTES.inc(len(packet))

    def close(self) -> None:
        if self.fd < 0:
            return
        self._loop.remove_reader(self.fd)
        os.close(self.fd)
        self.fd = -1
