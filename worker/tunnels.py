"""What a worker's flows see of an IP tunnel, whichever on-ramp it came in on.

A tunnel is one of: a connected tunnel (:class:`ipferry.worker.onramps.seqpacket.SeqpacketTunnel`),
a sender of a GUE on-ramp (:class:`ipferry.worker.onramps.gue.GueTunnel`), or a tunnel another
worker holds, reached over the mesh (:class:`ipferry.worker.mesh.RemoteTunnel`). The read-only
part is the engine's ``TunnelLeg``; the worker adds sending, closing and the admin API's row.
"""

from __future__ import annotations

import itertools
from typing import Any, Protocol

from ipferry.engine.legs import TunnelLeg

_ids = itertools.count(1)


def next_id() -> int:
    """A tunnel id, unique in this worker across its on-ramps (the mesh names tunnels by it)."""
    return next(_ids)


class Tunnel(TunnelLeg, Protocol):
    """An IP tunnel as the worker's flows use it: the engine's view of it (``id``, ``origin``,
    ``tenant``, ``context``, ``mtu``, ``vnet``, ``local``, ``steered``), and what the driver and
    the admin API do with it."""

    @property
    def closed(self) -> bool: ...

    def send(self, packet: bytes | bytearray) -> None:
        """Send one packet (in the tunnel's framing); dropped and counted if it cannot go now."""

    def close(self) -> None:
        """Forget the tunnel and free what it holds; idempotent."""

    def as_dict(self) -> dict[str, Any]:
        """The tunnel's row for ``/api/tunnels`` (before :func:`ipferry.worker.views.tunnel_row`)."""
