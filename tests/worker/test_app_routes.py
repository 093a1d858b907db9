"""The default application and private networks (#11): a context's ``routes`` (the prefixes its
device claims), checked and normalised; rules' ``layer`` in their decisions."""

from __future__ import annotations

import json

import pytest

from ipferry.worker.app import (
    MAX_ROUTES,
    Decision,
    FlowStart,
    Rule,
    RulesApplication,
    TunnelContext,
    parse_routes,
)

app = RulesApplication()


def context(**extra) -> bytes:
    return json.dumps({"tenant": "acme", **extra}).encode()


@pytest.mark.parametrize("routes, normalised", [
    ([], []),
    (["10.77.0.2"], ["10.77.0.2/32"]),
    (["10.77.0.2/32", "fd77::2", "FD77::/64"], ["10.77.0.2/32", "fd77::2/128", "fd77::/64"]),
    (["10.77.1.9/24"], ["10.77.1.0/24"]),  # host bits ignored, as in rules
    (["0.0.0.0/0"], ["0.0.0.0/0"]),  # the supervisor judges it against the tenant's networks
])
def test_routes_are_normalised_into_extra(routes, normalised):
    ctx = app.parse_context(context(routes=routes, device="laptop"))
    assert ctx == TunnelContext("acme", {"routes": normalised, "device": "laptop"})


def test_no_routes_key_claims_nothing():
    assert "routes" not in app.parse_context(context()).extra


@pytest.mark.parametrize("routes, reason", [
    ("10.77.0.2/32", "routes is not a JSON array"),
    ({"a": "10.77.0.2"}, "routes is not a JSON array"),
    (None, "routes is not a JSON array"),
    ([7], "routes holds '7', not a network as a string"),
    ([["10.77.0.2"]], "not a network as a string"),
    (["10.77.0.300"], "route '10.77.0.300' is not an IPv4 or IPv6 network or address"),
    (["10.77.0.0/33"], "is not an IPv4 or IPv6 network"),
    (["acme.example"], "is not an IPv4 or IPv6 network"),
    (["fe80::1%eth0"], "is not an IPv4 or IPv6 network"),
    ([""], "is not an IPv4 or IPv6 network"),
    (["10.77.0.1"] * (MAX_ROUTES + 1), f"claims {MAX_ROUTES + 1} routes, over {MAX_ROUTES}"),
])
def test_bad_routes_refuse_the_tunnel_with_the_reason(routes, reason):
    with pytest.raises(ValueError) as info:
        app.parse_context(context(routes=routes))
    assert reason in str(info.value), str(info.value)
    assert len(str(info.value)) < 300


def test_at_most_64_routes():
    routes = [f"10.77.{i}.0/24" for i in range(MAX_ROUTES)]
    assert parse_routes(routes) == routes


FLOW = FlowStart("acme", "tcp", "10.77.0.3", 40000, "10.77.0.2", 8000, TunnelContext("acme"))


def test_rules_carry_their_layer_into_decisions():
    rules = [Rule("deny", "acme", ports=(25, 25), name="smtp", layer="stream"),
             Rule("allow", "acme", "10.77.0.0/16", None, "tcp", None, "lan", layer="stream"),
             Rule("allow", name="rest")]
    app = RulesApplication(rules)
    assert app.on_flow_start(FLOW) == Decision.upgrade(None, "allowed by rule lan",
                                                       layer="stream")
    other = FlowStart("acme", "udp", "10.77.0.3", 1, "198.18.0.1", 53, TunnelContext("acme"))
    assert app.on_flow_start(other) == Decision.upgrade(None, "allowed by rule rest")
    assert app.on_flow_start(other).layer is None
    smtp = FlowStart("acme", "tcp", "10.77.0.3", 1, "198.18.0.1", 25, TunnelContext("acme"))
    assert app.on_flow_start(smtp) == Decision.drop("denied by rule smtp")


def test_a_rule_built_positionally_has_no_layer():
    # As worker/__main__.py builds them from RuleSettings (layer given by keyword only).
    rule = Rule("allow", "acme", "10.0.0.0/8", (80, 80), "tcp", ("10.0.0.1", 8080), "web")
    assert rule.layer is None and rule.name == "web"
    with pytest.raises(TypeError):
        Rule("allow", None, None, None, None, None, "x", "ip")  # type: ignore[misc]
