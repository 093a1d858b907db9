"""A worker's own metrics, and the snapshot it sends to the supervisor on request.

Workers keep ordinary prometheus-client metrics in a private registry. The supervisor asks each
live worker for a snapshot at scrape time and adds the ``worker`` label, so a dead worker's series
vanish with it (no multiprocess files left behind).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

registry = CollectorRegistry(auto_describe=True)


class HotCounter:
    """A counter on the per-packet path: a plain int (the worker is one thread, no lock needed),
    read by the registry at scrape time. ~10x cheaper than a prometheus-client child's inc()."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class HotCounters:
    """A labelled counter family of :class:`HotCounter` children, collected like any other."""

    def __init__(self, name: str, documentation: str, label: str, values: list[str]) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.children = {v: HotCounter() for v in values}
        registry.register(self)

    def labels(self, value: str) -> HotCounter:
        return self.children[value]

    def collect(self):
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, child in self.children.items():
            family.add_metric([value], child.value)
        yield family

    def describe(self):
        return self.collect()


TUN_PACKETS = HotCounters("ipferry_tun_packets", "Packets through the worker's TUN device.",
                          "direction", ["rx", "tx"])
TUN_BYTES = HotCounters("ipferry_tun_bytes", "Bytes through the worker's TUN device.",
                        "direction", ["rx", "tx"])
PACKETS = HotCounters("ipferry_packets", "IP packets handled, by direction.", "direction",
                      ["from_tunnel", "to_tunnel", "to_mesh", "from_mesh"])
BYTES = HotCounters("ipferry_bytes", "IP bytes handled, by direction.", "direction",
                    ["from_tunnel", "to_tunnel"])
ROUTED = HotCounters("ipferry_routed_packets", "IP packets between two devices of a tenant's "
                     "private network (layer 3), by direction.", "direction",
                     ["to_device", "to_client"])
FLOWS_DOWNGRADED = Counter("ipferry_flows_downgraded", "Flows whose server leg is a stream "
                           "downgraded into a device's tunnel.", registry=registry)
ROUTES = Gauge("ipferry_routes", "Routes of tenants' private networks this worker knows "
               "(claimed by tunnels, configured for sites).", registry=registry)
DNS_QUERIES = Counter("ipferry_dns_queries", "Queries to the daemon's resolver, by result: the "
                      "upstream's code (noerror, nxdomain, servfail, ...), or denied, refused, "
                      "answered (by the application), timeout, malformed.", ["result"],
                      registry=registry)
DROPS = Counter("ipferry_drops", "Packets dropped, by reason.", ["reason"], registry=registry)
FLOWS_STARTED = Counter("ipferry_flows_started", "Flows started, by protocol.", ["protocol"],
                        registry=registry)
FLOWS_ENDED = Counter("ipferry_flows_ended", "Flows ended, by protocol and close reason.",
                      ["protocol", "reason"], registry=registry)
FLOWS_ACTIVE = Gauge("ipferry_flows_active", "Flows tracked now, by protocol.", ["protocol"],
                     registry=registry)
NAT_SLOTS = Gauge("ipferry_nat_slots_in_use", "NAT slots claimed by live flows.",
                  registry=registry)
TUNNELS = Gauge("ipferry_tunnels_active", "Connected IP tunnels held by this worker.",
                registry=registry)
TUN_QUEUES = Gauge("ipferry_tun_queues", "Queues of clients' own TUN devices this worker reads "
                   "(tunnels whose client passed its TUN: ipferry connect).", registry=registry)
TUNNELS_CLOSED = Counter("ipferry_tunnels_closed", "Tunnels closed, by reason.", ["reason"],
                         registry=registry)
UPSTREAM_FAILURES = Counter("ipferry_upstream_failures", "Off-ramp connects that failed.",
                            ["reason"], registry=registry)
ICMP_SENT = Counter("ipferry_icmp_errors_sent", "ICMP errors sent into tunnels, by kind "
                    "(admin, port, host, net, too_big).", ["kind"], registry=registry)
ICMP_RECEIVED = Counter("ipferry_icmp_errors_received", "ICMP errors from tunnels matched to a "
                        "flow, by the flow's protocol.", ["protocol"], registry=registry)
GUE_TUNNELS = Gauge("ipferry_gue_tunnels_active", "GUE senders (address, port and context) with "
                    "recent traffic.", registry=registry)
GUE_MISSTEERED = Counter("ipferry_gue_missteered", "GUE packets the kernel delivered to a worker "
                         "that does not own their flow (should stay 0).", registry=registry)
AUDIT_ERRORS = Counter("ipferry_audit_errors", "Audit records that could not be written (each "
                       "one lost).", registry=registry)
AUDIT_DEGRADED = Gauge("ipferry_audit_degraded", "1 while the audit sink fails (the last write "
                       "failed), else 0.", registry=registry)
MESH_PEERS = Gauge("ipferry_mesh_peers", "Workers this worker has a live mesh link to.",
                   registry=registry)

# Children of prometheus metrics with labels are looked up per call; cache the hot ones.
TUN_RX_PACKETS = TUN_PACKETS.labels("rx")
TUN_RX_BYTES = TUN_BYTES.labels("rx")
TUN_TX_PACKETS = TUN_PACKETS.labels("tx")
TUN_TX_BYTES = TUN_BYTES.labels("tx")


def snapshot() -> list[dict]:
    """Every family in the registry as plain data (JSON-able): name, type, help, samples."""
    families = []
    for family in registry.collect():
        families.append({
            "name": family.name, "type": family.type, "help": family.documentation,
            "samples": [[s.name, s.labels, s.value] for s in family.samples],
        })
    return families

# -- the HTTP layer ----------------------------------------------------------------------------
HTTP_REQUESTS = Counter("ipferry_http_requests", "HTTP requests answered (streams carried as "
                        "HTTP, HTTP on-ramps), by the status's class (1xx ... 5xx).",
                        ["status_class"], registry=registry)
HTTP_DURATION = Histogram("ipferry_http_request_duration_seconds", "From an HTTP request's head "
                          "to the end of its answer.", registry=registry,
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0))
HTTP_REJECTED = Counter("ipferry_http_rejected", "HTTP input refused before it went on, by "
                        "reason: malformed, header_too_large, header_timeout, bad_target, "
                        "proxy_auth, forbidden_destination, hook_error, source_denied, "
                        "pending_limit.", ["reason"], registry=registry)
TLS_STREAMS = Counter("ipferry_tls_streams", "Streams to a TLS port whose ClientHello was read, "
                      "by result: allowed, denied (by its server name), not_tls, timeout.",
                      ["result"], registry=registry)

# Series a dashboard rates from the start: a labelled series that appears already counting
# hides its first increments from rate() and increase(), so the known labels start at 0.
for _label in ("1xx", "2xx", "3xx", "4xx", "5xx"):
    HTTP_REQUESTS.labels(_label)
for _label in ("malformed", "header_too_large", "header_timeout", "bad_target", "proxy_auth",
               "forbidden_destination", "hook_error"):
    HTTP_REJECTED.labels(_label)
for _label in ("allowed", "denied", "not_tls", "timeout"):
    TLS_STREAMS.labels(_label)
