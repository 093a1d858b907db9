"""What a worker's flows see of an IP tunnel, whichever on-ramp it came in on.

A tunnel is one of: a connected tunnel (:class:`ipferry.worker.onramps.seqpacket.SeqpacketTunnel`),
a sender of a GUE on-ramp (:class:`ipferry.worker.onramps.gue.GueTunnel`), or a tunnel another
worker holds, reached over the mesh (:class:`ipferry.worker.mesh.RemoteTunnel`). The read-only
part is the engine's ``TunnelLeg``; the worker adds sending, closing and the admin API's row.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .app import TunnelContext

_ids = itertools.count(1)


def next_id() -> int:
    """A tunnel id, unique in this worker across its on-ramps (the mesh names tunnels by it)."""
    return next(_ids)


class Tunnel(Protocol):
    """An IP tunnel as the worker's flows use it."""

    @property
    def id(self) -> int: ...
    @property
    def origin(self) -> int: ...  # the worker that holds it (ids are per worker)
    @property
    def tenant(self) -> str: ...
    @property
    def context(self) -> TunnelContext: ...
    @property
    def mtu(self) -> int: ...  # the largest packet it carries
    @property
    def vnet(self) -> bool: ...  # its datagrams carry a virtio-net header (ipferry.wire.vnet)
    @property
    def local(self) -> bool: ...  # held by this worker (else: another's, reached over the mesh)
    @property
    def steered(self) -> bool: ...  # the kernel delivers its flows to their owner: never forwarded
    @property
    def closed(self) -> bool: ...

    def send(self, packet: bytes | bytearray) -> None:
        """Send one packet (in the tunnel's framing); dropped and counted if it cannot go now."""

    def close(self) -> None:
        """Forget the tunnel and free what it holds; idempotent."""

    def as_dict(self) -> dict[str, Any]:
        """The tunnel's row for ``/api/tunnels`` (before :func:`ipferry.worker.views.tunnel_row`)."""
