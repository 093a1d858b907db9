"""The daemon's side of one connected tunnel, as a test plays it.

``ipferry connect`` sends its context first, then either the TUN's packets over the socket
(``--no-attach``) or, by default, the TUN's queues with SCM_RIGHTS after the daemon has said how
many it wants (:mod:`ipferry.worker.attached`). A :class:`TunnelEnd` speaks both, so a test of
what connect sends holds for either.
"""

from __future__ import annotations

import os
import select
import socket

from ipferry.wire import vnet


class TunnelEnd:
    def __init__(self, conn: socket.socket, queues: int = 1) -> None:
        self.conn = conn
        first = conn.recv(65536)
        self.attached = first.startswith(vnet.ATTACH_MAGIC)
        # The first datagram as the packet protocol has it: (TUNNEL_MAGIC) context.
        self.first = first[len(vnet.ATTACH_MAGIC):] if self.attached else first
        self.tun: list[int] = []
        if self.attached:
            conn.send(b'{"queues":%d}' % queues)
            data, fds, _, _ = socket.recv_fds(conn, 64, 64)
            assert data == b"tun" and len(fds) == queues, (data, fds)
            self.tun = fds

    def recv(self, timeout: float = 30.0) -> bytes:
        """The next packet (with its virtio-net header on an offload tunnel); b"" at the end.
        TimeoutError when none comes in ``timeout``."""
        if not self.tun:
            self.conn.settimeout(timeout)
            return self.conn.recv(65600)
        ready, _, _ = select.select([*self.tun, self.conn], [], [], timeout)
        if not ready:
            raise TimeoutError("no packet")
        for fd in ready:
            if fd is not self.conn:
                return os.read(fd, 65600)
        said = self.conn.recv(64)  # "done": the command exited (b"": connect went)
        assert said in (b"done", b""), said
        return b""

    def send(self, packet: bytes) -> None:
        if self.tun:
            os.write(self.tun[0], packet)
        else:
            self.conn.send(packet)

    def close(self) -> None:
        for fd in self.tun:
            os.close(fd)
        self.tun = []
        self.conn.close()
