"""The application hooks: every decision about a tunnel or a flow goes through one object.

An application is a class named in the config (``[app] class = "module:Class"``) with these
methods, each plain or ``async``::

    class Application:
        def parse_context(self, raw: bytes) -> TunnelContext: ...
        def on_flow_start(self, flow: FlowStart) -> Decision: ...
        def on_flow_end(self, flow: FlowEnd) -> None: ...

``parse_context`` raising closes that tunnel (with the reason logged); ``on_flow_start`` raising
drops that flow (counted as ``hook_error``). The default application reads a JSON context with at
least ``tenant`` and decides by the config's rules.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import ipaddress
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from ipferry.engine.decisions import (
    Decision,
    DnsDecision,
    DnsQueryStart,
    FlowEnd,
    FlowStart,
    HttpDecision,
    HttpRequest,
    HttpResponse,
    StreamStart,
    TunnelContext,
)
from ipferry.wire.dnsmsg import domain_matches

MAX_TENANT = 64
# A tenant names flows in rules, audit records, logs and the admin API: a bounded, printable
# token. The default application refuses any other (the config's rules are checked against it).
TENANT_PATTERN = rf"[A-Za-z0-9][A-Za-z0-9._:@-]{{0,{MAX_TENANT - 1}}}"
_TENANT = re.compile(TENANT_PATTERN)
MAX_CONTEXT = 4096  # bytes of a context the default application reads
MAX_CONTEXT_DEPTH = 16  # nesting of its objects and arrays
MAX_ROUTES = 64  # prefixes one tunnel's context may claim (``routes``)

__all__ = ["Application", "Decision", "DnsDecision", "DnsQueryStart", "FlowEnd", "FlowStart",
           "HttpDecision", "HttpRequest", "HttpResponse", "Rule", "RulesApplication",
           "StreamStart", "TunnelContext", "load_application"]
_ALLOW_REQUEST = HttpDecision.allow("allowed by default")


def valid_tenant(tenant) -> bool:
    return isinstance(tenant, str) and _TENANT.fullmatch(tenant) is not None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:40]!r}")
        out[key] = value
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range")
    return value


def parse_routes(value) -> list[str]:
    """A context's ``routes``: a JSON array of at most :data:`MAX_ROUTES` strings, each an IPv4
    or IPv6 network (host bits ignored, as rules take them: ``10.77.0.5/24`` means
    ``10.77.0.0/24``) or a bare address (``/32``, ``/128``); normalised (``"10.77.0.2/32"``).
    Raises ValueError saying what is wrong."""
    if not isinstance(value, list):
        raise ValueError("the tunnel context's routes is not a JSON array of networks")
    if len(value) > MAX_ROUTES:
        raise ValueError(f"the tunnel context claims {len(value)} routes, over {MAX_ROUTES}")
    out = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"the tunnel context's routes holds {str(item)[:60]!r}, not a "
                             "network as a string")
        try:
            if "%" in item:  # a scope would make fe80::1%eth0 another address than fe80::1
                raise ValueError
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"the tunnel context's route {item[:60]!r} is not an IPv4 or IPv6 "
                             "network or address") from None
    return out


def _too_deep(value, limit: int) -> bool:
    """Objects and arrays nested more than ``limit`` deep (iterative: any depth is safe)."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        if level > limit:
            return True
        stack.extend((child, level + 1) for child in item)
    return False


class Application(Protocol):
    def parse_context(self, raw: bytes) -> TunnelContext: ...
    def on_flow_start(self, flow: FlowStart) -> Decision: ...
    def on_flow_end(self, flow: FlowEnd) -> None: ...


@dataclass(frozen=True)
class Rule:
    """One line of policy: first match wins. Empty fields match everything."""

    action: str  # "allow" | "deny"
    tenant: str | None = None
    cidr: str | None = None
    ports: tuple[int, int] | None = None  # inclusive range
    protocol: str | None = None
    upstream: tuple[str, int] | None = None
    name: str = ""
    layer: str | None = field(default=None, kw_only=True)  # None | "ip" | "stream"
    # A rule for queries to the daemon's resolver ("corp.example" or "*.corp.example"): it
    # decides those (deny: NXDOMAIN), never a flow.
    domain: str | None = field(default=None, kw_only=True)
    # A flow's destination by the name the daemon's resolver gave the tenant for it (as
    # ``domain``): a flow to an address no name was answered with never matches.
    host: str | None = field(default=None, kw_only=True)
    # HTTP requests (of streams carried as HTTP, and HTTP on-ramps): a path prefix, a method.
    path: str | None = field(default=None, kw_only=True)
    method: str | None = field(default=None, kw_only=True)
    # TLS streams by their ClientHello's server name (the same patterns as ``domain``).
    sni: str | None = field(default=None, kw_only=True)
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = field(init=False,
                                                                          compare=False)

    def __post_init__(self) -> None:
        # Host bits are allowed (as the config check allows them): 10.0.0.1/8 means 10.0.0.0/8.
        net = ipaddress.ip_network(self.cidr, strict=False) if self.cidr else None
        object.__setattr__(self, "network", net)

    @property
    def for_requests(self) -> bool:
        """Does this rule decide HTTP requests (it has a host, path or method)?"""
        return self.domain is None and self.sni is None and (
            self.path is not None or self.method is not None or self.host is not None)

    def matches(self, flow: FlowStart) -> bool:
        if (self.domain is not None or self.sni is not None or self.path is not None
                or self.method is not None):
            return False  # decided later: at a query, a TLS stream's start, a request
        if self.tenant is not None and flow.tenant != self.tenant:
            return False
        if self.protocol is not None and flow.protocol != self.protocol:
            return False
        if self.network is not None and ipaddress.ip_address(flow.dst) not in self.network:
            return False
        if self.host is not None and (flow.host is None or not domain_matches(self.host,
                                                                              flow.host)):
            return False
        return self.ports is None or self.ports[0] <= flow.dport <= self.ports[1]

    def _matches_where(self, tenant: str, dst: str | None, port: int) -> bool:
        """Tenant, protocol (TCP), destination network and port."""
        if self.tenant is not None and tenant != self.tenant:
            return False
        if self.protocol not in (None, "tcp"):
            return False
        if self.network is not None and (not dst or ipaddress.ip_address(dst)
                                         not in self.network):
            return False
        return self.ports is None or self.ports[0] <= port <= self.ports[1]

    def matches_request(self, request: HttpRequest) -> bool:
        """An HTTP request: its tenant, where it goes, its Host, path (prefix) and method."""
        upstream = request.upstream
        if not self._matches_where(request.flow.tenant, upstream[0] if upstream else None,
                                   upstream[1] if upstream else request.port):
            return False
        if self.host is not None and not domain_matches(self.host, request.host):
            return False
        if self.method is not None and request.method != self.method:
            return False
        return self.path is None or request.path.startswith(self.path)

    def matches_stream(self, stream: StreamStart) -> bool:
        """A TLS stream by its ClientHello's server name (a stream without one never matches)."""
        flow = stream.flow
        return (self.sni is not None and stream.sni is not None
                and self._matches_where(flow.tenant, flow.dst, flow.dport)
                and domain_matches(self.sni, stream.sni))


class RulesApplication:
    """The default application: JSON context with a ``tenant``; config rules decide flows."""

    def __init__(self, rules: list[Rule] | None = None, default_action: str = "allow") -> None:
        self.rules = rules or []
        self.default_action = default_action

    def parse_context(self, raw: bytes) -> TunnelContext:
        """A strict JSON object (UTF-8, at most :data:`MAX_CONTEXT` bytes, no duplicate keys, no
        ``NaN``/``Infinity``, nested at most :data:`MAX_CONTEXT_DEPTH` deep) with a ``tenant``
        of the :data:`TENANT_PATTERN` syntax; the other keys are the context's ``extra``.

        An optional ``routes`` is the prefixes the tunnel's device claims in its tenant's
        private networks (see :func:`parse_routes`); kept normalised in ``extra["routes"]``."""
        if len(raw) > MAX_CONTEXT:
            raise ValueError(f"the tunnel context is {len(raw)} bytes, over {MAX_CONTEXT}")
        try:
            data = json.loads(bytes(raw).decode("utf-8"), object_pairs_hook=_unique_keys,
                              parse_constant=_no_constant, parse_float=_finite_float)
        except RecursionError:
            raise ValueError("the tunnel context is nested too deeply") from None
        except ValueError as exc:
            raise ValueError(f"the tunnel context is not strict JSON: {str(exc)[:120]}") from None
        if not isinstance(data, dict):
            raise ValueError("the tunnel context is not a JSON object")
        if _too_deep(data, MAX_CONTEXT_DEPTH):
            raise ValueError(f"the tunnel context is nested over {MAX_CONTEXT_DEPTH} deep")
        tenant = data.get("tenant")
        if not isinstance(tenant, str) or not tenant:
            raise ValueError("the tunnel context has no tenant")
        if not valid_tenant(tenant):
            raise ValueError(f"the tenant {tenant[:80]!r} is not 1-{MAX_TENANT} characters of "
                             "A-Z a-z 0-9 . _ : @ - starting with a letter or digit")
        extra = {k: v for k, v in data.items() if k != "tenant"}
        if "routes" in extra:
            extra["routes"] = parse_routes(extra["routes"])
        return TunnelContext(tenant, extra)

    def on_flow_start(self, flow: FlowStart) -> Decision:
        for rule, decision in zip(self.rules, self._decisions, strict=True):
            if rule.matches(flow):
                return decision
        return self._default

    @functools.cached_property
    def _decisions(self) -> list[Decision]:
        # Decisions are frozen values: one per rule, shared by its flows (memory per flow).
        return [Decision.drop(f"denied by rule {rule.name}") if rule.action == "deny"
                else Decision.upgrade(rule.upstream, f"allowed by rule {rule.name}",
                                      layer=rule.layer)
                for rule in self.rules]

    @functools.cached_property
    def _default(self) -> Decision:
        if self.default_action == "deny":
            return Decision.drop("denied by default")
        return Decision.upgrade(None, "allowed by default")

    def on_flow_end(self, flow: FlowEnd) -> None:
        pass

    def on_request(self, request: HttpRequest) -> HttpDecision:
        """An HTTP request: the first rule with a ``host``, ``path`` or ``method`` that matches
        it decides (``deny``: 403 naming the rule); else it goes on (its flow was allowed)."""
        for rule in self._request_rules:
            if rule.matches_request(request):
                if rule.action == "deny":
                    return HttpDecision.deny(f"denied by rule {rule.name}")
                return HttpDecision.allow(f"allowed by rule {rule.name}")
        return _ALLOW_REQUEST

    def on_stream_start(self, stream: StreamStart) -> Decision | None:
        """A stream's start: the first rule with an ``sni`` matching its TLS server name
        decides (``deny``: both ends reset); else the stream goes as its flow's decision says."""
        if stream.sni is None:
            return None
        for rule in self._stream_rules:
            if rule.matches_stream(stream):
                if rule.action == "deny":
                    return Decision.drop(f"denied by rule {rule.name}")
                return Decision.upgrade(reason=f"allowed by rule {rule.name}")
        return None

    @functools.cached_property
    def _request_rules(self) -> list[Rule]:
        return [r for r in self.rules if r.for_requests]

    @functools.cached_property
    def _stream_rules(self) -> list[Rule]:
        return [r for r in self.rules if r.sni is not None]

    def on_dns_query(self, query: DnsQueryStart) -> DnsDecision:
        """A query to the daemon's resolver: the first rule with a ``domain`` matching its name
        (and its tenant, if the rule names one) decides (``deny``: NXDOMAIN); else it goes on."""
        for rule in self.rules:
            if (rule.domain is not None and (rule.tenant is None or rule.tenant == query.tenant)
                    and domain_matches(rule.domain, query.name)):
                if rule.action == "deny":
                    return DnsDecision.nxdomain(f"denied by rule {rule.name}")
                return DnsDecision.allow(f"allowed by rule {rule.name}")
        return DnsDecision.allow("allowed by default")


def load_application(spec: str | None, **kwargs: Any) -> Application:
    """``module:Class`` from the config (None: the rules application), instantiated.

    The class gets ``rules`` and ``default_action`` if its constructor takes them (a subclass
    of :class:`RulesApplication` does), else no arguments.
    """
    if not spec:
        return RulesApplication(**kwargs)
    cls = import_application(spec)
    params = inspect.signature(cls).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return cls(**{k: v for k, v in kwargs.items() if takes_all or k in params})


def import_application(spec: str) -> type:
    module, _, name = spec.partition(":")
    cls = getattr(importlib.import_module(module), name, None)
    if not isinstance(cls, type):
        raise ImportError(f"{module} has no class {name}")
    return cls


async def call_hook(fn, *args):
    """Hooks may be sync or async."""
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result
