"""What the flow engine asks its driver to do: one small value per action, in order.

The engine never touches a socket, a clock or a counter: every input (:mod:`ipferry.engine.core`)
returns a list of these, and the driver (:mod:`ipferry.worker.datapath`) carries them out in
order. Some actions have an answer the engine waits for, given back as an input:

==================  ===============================================================
action              the driver answers with
==================  ===============================================================
DecideFlow          ``decided(flow, decision)`` or ``hook_failed(flow, error)``
AuditFlowStart      ``audit_written(flow, ok)``
ConnectOfframp      ``offramp_connected(flow)`` or ``offramp_failed(flow, reason, err)``
RelayStreams        ``stream_finished(flow)`` once the handler is done
OpenDatagram        ``datagram_opened(flow)`` or ``datagram_failed(flow, reason, err)``
==================  ===============================================================

NamedTuples: cheap to make (one per packet on the hot path) and readable in a test's assertion.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from .flows import Flow
    from .legs import TunnelLeg


class SendToTunnel(NamedTuple):
    """An IP packet into a tunnel (with its virtio-net ``header``; None: a plain packet). The
    driver frames it as the tunnel speaks (a header in front, or cut into segments)."""

    tunnel: TunnelLeg
    packet: bytes | bytearray
    header: bytes | None = None


class RelayToTunnel(NamedTuple):
    """A datagram already in the tunnel's framing (a reply another worker built)."""

    tunnel: TunnelLeg
    data: bytes | bytearray


class WriteTun(NamedTuple):
    """A packet into the namespace's kernel, by the worker's TUN."""

    packet: bytes | bytearray
    header: bytes | None = None


class Forward(NamedTuple):
    """A tunnel's datagram whose flow another worker owns: hand it over the mesh."""

    owner: int
    tunnel: TunnelLeg
    data: bytes


class DecideFlow(NamedTuple):
    """Call the application's ``on_flow_start`` for ``flow`` (its packets are held meanwhile)."""

    flow: Flow


class AuditFlowStart(NamedTuple):
    """Write the flow's ``flow_start`` record, then say whether it was written."""

    flow: Flow
    fields: dict[str, Any]


class Audit(NamedTuple):
    """Write an audit record (``flow_end``; a ``flow_start`` for a flow that never got far)."""

    event: str
    fields: dict[str, Any]


class ConnectOfframp(NamedTuple):
    """Open the flow's server stream leg (``flow.server.upstream``); no later than ``deadline``
    (the engine gives up then: see ``timer``)."""

    flow: Flow


class RelayStreams(NamedTuple):
    """Run the stream handler between an accepted client's socket (``flow.client.handle``) and
    the connected server leg's: a ``kind = "tcp"`` on-ramp's flow is under way."""

    flow: Flow


class CloseAccepted(NamedTuple):
    """An accepted connection that gets no flow (a limit, a duplicate): reset it."""

    handle: object


class OpenDatagram(NamedTuple):
    """Open the flow's datagram server leg (``flow.server``)."""

    flow: Flow


class SendDatagram(NamedTuple):
    """A UDP payload or ICMP message out of the flow's datagram leg."""

    flow: Flow
    payload: memoryview


class FlowStarted(NamedTuple):
    """A flow is tracked (decided or not yet): index it, count it."""

    flow: Flow


class FlowEnded(NamedTuple):
    """A flow is over: let go of its legs' sockets and tell the application.

    ``graceful``: both FINs crossed, so a stream still relaying may finish on its own; else both
    stream ends get a reset."""

    flow: Flow
    why: str
    graceful: bool


class Count(NamedTuple):
    """Add ``n`` to a counter: ``drop`` (by reason), ``icmp_sent`` (by kind), ``icmp_received``
    (by protocol), ``upstream_failure`` (by reason), ``gue_missteered``, ``routed`` (packets
    into a device's tunnel, by direction: ``to_device``, ``to_client``), ``downgraded`` (flows
    whose server leg is a stream downgraded into a device's tunnel)."""

    counter: str
    label: str = ""
    n: int = 1


class RefusedPastLimit(NamedTuple):
    """A flow refused for want of a resource: summed up per tenant in the audit, not per flow."""

    tenant: str
    reason: str


class Log(NamedTuple):
    level: str
    event: str
    fields: dict[str, Any]


Action = (SendToTunnel | RelayToTunnel | WriteTun | Forward | DecideFlow | AuditFlowStart | Audit
          | ConnectOfframp | RelayStreams | CloseAccepted | OpenDatagram | SendDatagram
          | FlowStarted | FlowEnded | Count | RefusedPastLimit | Log)
