"""What a worker is given of the config: one pydantic model, shared by the supervisor and the workers.

The supervisor builds a :class:`WorkerSettings` from the running config
(``Config.worker_settings`` in ``ipferry.supervisor.config``) and sends it as
``model_dump(mode="json", by_alias=True)`` in ``equip`` and ``prepare`` messages; the worker
reads it back with :meth:`WorkerSettings.model_validate` and uses its attributes.

The config sections only workers use (``[flows]``, ``[audit]``, ``[app]``) are defined here, with
their defaults and checks, and are the config's sections too: a default lives in one place. The
rest carries no defaults: every field is the supervisor's to fill in.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- config sections only the workers use ------------------------------------------------------

class Flows(_Strict):
    """Flow tracking limits and idle timeouts (seconds, per state, like conntrack's)."""

    # None: 100,000, or fewer if the worker's fd limit cannot hold them (see the worker).
    max_per_worker: Annotated[int, Field(ge=1)] | None = None
    max_per_tenant: Annotated[int, Field(ge=1)] = 10_000
    # UDP and ICMP flows each hold a connected socket, so a local port of the host.
    max_datagram_per_tenant: Annotated[int, Field(ge=1)] = 1_000
    tcp_syn_sent: Annotated[float, Field(gt=0)] = 120.0
    tcp_established: Annotated[float, Field(gt=0)] = 7200.0
    tcp_fin_wait: Annotated[float, Field(gt=0)] = 120.0
    tcp_closing: Annotated[float, Field(gt=0)] = 60.0
    udp_unreplied: Annotated[float, Field(gt=0)] = 30.0  # no reply yet (a lone DNS query)
    udp_replied: Annotated[float, Field(gt=0)] = 120.0
    icmp: Annotated[float, Field(gt=0)] = 30.0
    upstream_connect_timeout: Annotated[float, Field(gt=0, le=300)] = 10.0


class App(_Strict):
    """The application hooks: a ``module:Class`` (default: rules from this file)."""

    cls: Annotated[str | None, Field(alias="class", pattern=r"^[\w.]+:\w+$")] = None
    default_action: Literal["allow", "deny"] = "allow"


class Audit(_Strict):
    """Where flow start/end records go: ``stdout`` or a JSON-lines file; what flows do while
    the sink fails (``continue``: fail open, the lost records counted; ``refuse``: fail closed,
    new flows refused); how often refusals past a limit are summed up in one record."""

    sink: str = "stdout"
    on_error: Literal["continue", "refuse"] = "continue"
    refusals_interval: Annotated[float, Field(ge=1, le=3600)] = 10.0


# -- what the supervisor works out for the workers ---------------------------------------------

class RuleSettings(_Strict):
    """One ``[[rules]]`` entry as workers match it: ports and upstream parsed, a name given."""

    action: Literal["allow", "deny"]
    name: str  # the config's, else the rule's position
    tenant: str | None
    protocol: Literal["tcp", "udp", "icmp"] | None
    cidr: str | None
    ports: tuple[int, int] | None  # inclusive
    upstream: tuple[str, int] | None
    layer: Literal["ip", "stream"] | None = None  # how an allowed flow is carried (Decision.layer)
    domain: str | None = None  # a rule for DNS queries to the daemon's resolver
    host: str | None = None  # flows to addresses the resolver gave for matching names


class GueSettings(_Strict):
    """A GUE on-ramp's lists as it was bound (they change only at a daemon restart)."""

    allow: list[str]  # source networks; [] = any
    tenants: list[str]  # [] = any
    address: tuple[str, int]  # where it listens (flows to it are refused)


class NetworkSettings(_Strict):
    """A ``[[networks]]`` entry: a prefix the tenant's devices may claim addresses in."""

    tenant: str
    cidr: str  # normalised (no host bits), IPv4 or IPv6


class SiteSettings(_Strict):
    """A ``[[sites]]`` entry: a GUE sender that is a device of ``tenant`` holding ``prefixes``;
    flows routed there are sent to ``sender`` from the on-ramp ``onramp``'s socket."""

    name: str
    tenant: str
    prefixes: list[str]  # normalised, inside the tenant's networks
    sender: tuple[str, int]  # the site's GUE address and port
    onramp: str  # the GUE on-ramp it speaks to


class TcpOnrampSettings(_Strict):
    """A ``kind = "tcp"`` on-ramp (publishing a service): who may connect, for which tenant,
    to which upstream, and whether a PROXY v2 header comes first."""

    tenant: str
    upstream: tuple[str, int]
    proxy_protocol: bool
    allow: list[str]  # source networks; [] = any
    address: tuple[str, int]  # where it listens


class WorkerSettings(_Strict):
    workers: int  # how many workers the daemon runs (the flow-ownership hash spans them)
    mtu: int
    offload: bool  # TUNs with vnet headers
    flows: Flows
    audit: Audit
    app: App
    rules: list[RuleSettings]
    gue: dict[str, GueSettings]  # by on-ramp name
    tcp: dict[str, TcpOnrampSettings] = {}  # by on-ramp name
    networks: list[NetworkSettings] = []
    sites: list[SiteSettings] = []
    # Where the daemon forwards the DNS its tunnels send to its resolver address (the host's
    # resolvers, loopback stubs included); [] answers nothing.
    dns_upstreams: list[tuple[str, int]] = []

    def dump(self) -> dict:
        """As sent on the control channel (``WorkerSettings.model_validate`` reads it back)."""
        return self.model_dump(mode="json", by_alias=True)
