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
    layer: Literal["ip", "stream", "http"] | None = None  # how an allowed flow is carried
    domain: str | None = None  # a rule for DNS queries to the daemon's resolver
    # Flows to addresses the resolver gave for matching names; HTTP requests for such a Host.
    host: str | None = None
    path: str | None = None  # HTTP requests whose path starts so ("/admin")
    method: str | None = None  # HTTP requests of this method ("POST")
    sni: str | None = None  # TLS streams whose ClientHello names a matching server


class GueSettings(_Strict):
    """A GUE on-ramp's lists as it was bound (they change only at a daemon restart)."""

    allow: list[str]  # source networks; [] = any
    tenants: list[str]  # [] = any
    address: tuple[str, int]  # where it listens (flows to it are refused)
    anycast: bool = False  # one node of several behind ECMP (see GueOnramp.anycast)


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


class Http(_Strict):
    """The HTTP layer's limits: streams carried as HTTP (``layer = "http"``), HTTP on-ramps, and
    the TLS ClientHello read on streams to the ``tls_ports``."""

    header_timeout: Annotated[float, Field(gt=0, le=300)] = 10.0  # a request's head, or 408
    idle_timeout: Annotated[float, Field(gt=0, le=3600)] = 60.0  # between keep-alive requests
    max_header_bytes: Annotated[int, Field(ge=1024, le=1 << 20)] = 65536  # request head, or 431
    pool_per_upstream: Annotated[int, Field(ge=0, le=1024)] = 8  # idle connections kept each
    pool_total: Annotated[int, Field(ge=0, le=65536)] = 256  # idle connections kept, per worker
    pool_idle_timeout: Annotated[float, Field(gt=0, le=3600)] = 30.0
    tls_ports: Annotated[list[Annotated[int, Field(ge=1, le=65535)]],
                         Field(max_length=64)] = [443, 8443, 853]
    client_hello_timeout: Annotated[float, Field(gt=0, le=60)] = 5.0


class HttpOnrampSettings(_Strict):
    """A ``kind = "http"`` on-ramp (a forward proxy): who may connect, and the tenant each
    client is (``tenant``, or the one its ``Proxy-Authorization`` token maps to)."""

    tenant: str | None  # None: a client must name its tenant with a token
    # sha256 (hex) of each token: the tenant it maps to (the secrets stay in the supervisor)
    tokens: dict[str, str]
    allow: list[str]  # source networks; [] = any
    address: tuple[str, int]  # where it listens


class WorkerSettings(_Strict):
    workers: int  # how many workers the daemon runs (the flow-ownership hash spans them)
    node: str = ""  # the daemon's node name (audit records carry it); "" none
    mtu: int
    offload: bool  # TUNs with vnet headers
    flows: Flows
    audit: Audit
    app: App
    rules: list[RuleSettings]
    gue: dict[str, GueSettings]  # by on-ramp name
    tcp: dict[str, TcpOnrampSettings] = {}  # by on-ramp name
    http_onramps: dict[str, HttpOnrampSettings] = {}  # by on-ramp name
    http: Http = Http()
    networks: list[NetworkSettings] = []
    sites: list[SiteSettings] = []
    # Where the daemon forwards the DNS its tunnels send to its resolver address (the host's
    # resolvers, loopback stubs included); [] answers nothing.
    dns_upstreams: list[tuple[str, int]] = []

    def dump(self) -> dict:
        """As sent on the control channel (``WorkerSettings.model_validate`` reads it back)."""
        return self.model_dump(mode="json", by_alias=True)
