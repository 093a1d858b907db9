"""The default application's HTTP keys: requests decided by rules with a host, path or method
(first match wins, tenant and destination as any rule's), TLS streams by their server name, and
flow rules that never match what is decided later. Also the HTTP on-ramp's token parsing."""

from __future__ import annotations

import base64

import pytest

from ipferry.engine.decisions import (
    Decision,
    FlowStart,
    HttpDecision,
    HttpRequest,
    StreamStart,
    TunnelContext,
)
from ipferry.worker.app import Rule, RulesApplication
from ipferry.worker.onramps.http import token_of

pytestmark = pytest.mark.timeout(30)


def flow(tenant: str = "acme", dst: str = "10.0.0.9", dport: int = 80,
         protocol: str = "tcp", host: str | None = None) -> FlowStart:
    return FlowStart(tenant, protocol, "192.0.2.7", 40000, dst, dport, TunnelContext(tenant),
                     host)


def request(host: str = "www.example.com", path: str = "/", method: str = "GET",
            tenant: str = "acme", upstream: tuple[str, int] | None = ("10.0.0.9", 80),
            port: int = 80) -> HttpRequest:
    return HttpRequest(flow(tenant, upstream[0] if upstream else "", port), method, path, host,
                       port, path.partition("?")[0], (("host", host),), upstream)


def stream(sni: str | None, tenant: str = "acme", dst: str = "10.0.0.9",
           dport: int = 443) -> StreamStart:
    return StreamStart(flow(tenant, dst, dport), (dst, dport), sni=sni)


def decide(rules: list[Rule], req: HttpRequest) -> HttpDecision:
    return RulesApplication(rules).on_request(req)


# -- on_request ----------------------------------------------------------------------------------


def test_default_allow_without_request_rules():
    app = RulesApplication([Rule("deny", cidr="10.0.0.0/8", name="flows-only")])
    decision = app.on_request(request())
    assert decision.action == "allow" and decision.reason == "allowed by default"
    assert decision.upstream is None and decision.target is None


def test_default_allow_even_when_flows_default_to_deny():
    # The flow was decided already: a request no rule names goes on.
    app = RulesApplication([], default_action="deny")
    assert app.on_request(request()).action == "allow"


@pytest.mark.parametrize("pattern, host, hit", [
    ("www.example.com", "www.example.com", True),
    ("www.example.com", "WWW.Example.com.", True),
    ("www.example.com", "example.com", False),
    ("www.example.com", "a.www.example.com", False),
    ("*.example.com", "www.example.com", True),
    ("*.example.com", "a.b.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "badexample.com", False),
])
def test_host_exact_and_suffix(pattern, host, hit):
    decision = decide([Rule("deny", name="h", host=pattern)], request(host=host))
    assert (decision.action == "deny") is hit
    if hit:
        assert decision.status == 403 and decision.reason == "denied by rule h"


@pytest.mark.parametrize("prefix, path, hit", [
    ("/admin", "/admin", True),
    ("/admin", "/admin/users", True),
    ("/admin", "/administrator", True),  # a prefix, not a segment
    ("/admin/", "/admin", False),
    ("/admin", "/Admin", False),
    ("/admin", "/", False),
    ("/", "/anything", True),
])
def test_path_prefix(prefix, path, hit):
    decision = decide([Rule("deny", name="p", path=prefix)], request(path=path))
    assert (decision.action == "deny") is hit


def test_path_ignores_the_query():
    req = request(path="/public?next=/admin")
    assert req.path == "/public"
    assert decide([Rule("deny", name="p", path="/public?")], req).action == "allow"
    assert decide([Rule("deny", name="p", path="/public")], req).action == "deny"


@pytest.mark.parametrize("method, hit", [("POST", True), ("GET", False), ("post", False)])
def test_method(method, hit):
    decision = decide([Rule("deny", name="m", method="POST")], request(method=method))
    assert (decision.action == "deny") is hit


def test_all_keys_must_match():
    rule = Rule("deny", name="all", host="api.example.com", path="/v1", method="DELETE")
    assert decide([rule], request("api.example.com", "/v1/x", "DELETE")).action == "deny"
    assert decide([rule], request("api.example.com", "/v1/x", "GET")).action == "allow"
    assert decide([rule], request("api.example.com", "/v2/x", "DELETE")).action == "allow"
    assert decide([rule], request("www.example.com", "/v1/x", "DELETE")).action == "allow"


def test_tenant():
    rules = [Rule("deny", tenant="acme", name="acme-admin", path="/admin")]
    assert decide(rules, request(path="/admin", tenant="acme")).action == "deny"
    assert decide(rules, request(path="/admin", tenant="other")).action == "allow"


def test_cidr_and_ports_against_the_requests_upstream():
    rules = [Rule("deny", cidr="10.0.0.0/24", name="net", path="/")]
    assert decide(rules, request(upstream=("10.0.0.9", 80))).action == "deny"
    assert decide(rules, request(upstream=("10.0.1.9", 80))).action == "allow"
    # an on-ramp's request to a name not resolved yet goes nowhere known: no cidr matches it
    assert decide(rules, request(upstream=None)).action == "allow"
    ipv6 = [Rule("deny", cidr="2001:db8::/32", name="v6", method="GET")]
    assert decide(ipv6, request(upstream=("2001:db8::1", 80))).action == "deny"
    assert decide(ipv6, request(upstream=("10.0.0.9", 80))).action == "allow"
    ports = [Rule("deny", ports=(8000, 8999), name="alt", path="/")]
    assert decide(ports, request(upstream=("10.0.0.9", 8080))).action == "deny"
    assert decide(ports, request(upstream=("10.0.0.9", 80))).action == "allow"
    # without an upstream, the port the request names
    assert decide(ports, request(upstream=None, port=8443)).action == "deny"


def test_protocol_other_than_tcp_never_matches_a_request():
    rules = [Rule("deny", protocol="udp", name="udp", path="/")]
    assert decide(rules, request()).action == "allow"
    assert decide([Rule("deny", protocol="tcp", name="t", path="/")], request()).action == "deny"


def test_first_match_wins():
    rules = [Rule("allow", name="public", path="/admin/public"),
             Rule("deny", name="admin", path="/admin"),
             Rule("allow", name="late", path="/")]
    app = RulesApplication(rules)
    first = app.on_request(request(path="/admin/public/x"))
    assert (first.action, first.reason) == ("allow", "allowed by rule public")
    second = app.on_request(request(path="/admin/secret"))
    assert (second.action, second.reason) == ("deny", "denied by rule admin")
    third = app.on_request(request(path="/else"))
    assert (third.action, third.reason) == ("allow", "allowed by rule late")


def test_rules_without_http_keys_or_for_names_and_sni_never_decide_requests():
    rules = [Rule("deny", name="flow", cidr="10.0.0.0/8"),
             Rule("deny", name="dns", domain="www.example.com"),
             Rule("deny", name="tls", sni="www.example.com"),
             Rule("deny", name="both", domain="www.example.com", path="/")]
    decision = decide(rules, request())
    assert decision.action == "allow" and decision.reason == "allowed by default"


def test_a_host_rule_decides_requests_by_their_host_header():
    rule = Rule("deny", name="h", host="*.example.com")
    assert rule.for_requests
    assert decide([rule], request(host="www.example.com")).action == "deny"
    assert decide([rule], request(host="www.example.org")).action == "allow"


# -- on_stream_start (TLS server names) ---------------------------------------------------------


def test_sni_rules():
    app = RulesApplication([Rule("deny", name="bad", sni="*.bad.example"),
                            Rule("allow", name="good", sni="good.example"),
                            Rule("deny", name="rest", sni="*.example")])
    denied = app.on_stream_start(stream("x.bad.example"))
    assert isinstance(denied, Decision)
    assert (denied.action, denied.reason) == ("drop", "denied by rule bad")
    allowed = app.on_stream_start(stream("GOOD.example."))
    assert isinstance(allowed, Decision)
    assert (allowed.action, allowed.reason) == ("upgrade", "allowed by rule good")
    other = app.on_stream_start(stream("other.example"))
    assert other is not None and other.action == "drop"
    assert app.on_stream_start(stream("other.org")) is None  # no rule: as the flow said


def test_no_sni_never_matches():
    app = RulesApplication([Rule("deny", name="any", sni="*.example"),
                            Rule("deny", name="flows", cidr="0.0.0.0/0")])
    assert app.on_stream_start(stream(None)) is None


def test_sni_rules_with_tenant_cidr_ports():
    app = RulesApplication([Rule("deny", name="t", tenant="acme", cidr="10.0.0.0/24",
                                 ports=(443, 443), sni="x.example")])
    denied = app.on_stream_start(stream("x.example"))
    assert denied is not None and denied.action == "drop"
    assert app.on_stream_start(stream("x.example", tenant="other")) is None
    assert app.on_stream_start(stream("x.example", dst="10.0.1.1")) is None
    assert app.on_stream_start(stream("x.example", dport=8443)) is None


def test_only_sni_rules_decide_streams():
    app = RulesApplication([Rule("deny", name="path", path="/"),
                            Rule("deny", name="host", host="x.example"),
                            Rule("deny", name="dns", domain="x.example")])
    assert app.on_stream_start(stream("x.example")) is None


# -- flow rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize("keys", [{"path": "/"}, {"method": "GET"}, {"sni": "x.example"},
                                  {"domain": "x.example"},
                                  {"path": "/", "host": "x.example"}])
def test_flow_never_matches_rules_decided_later(keys):
    rule = Rule("deny", name="later", **keys)
    assert not rule.matches(flow(host="x.example"))
    app = RulesApplication([rule])
    assert app.on_flow_start(flow(host="x.example")).action == "upgrade"


def test_flow_matches_plain_and_host_rules():
    assert Rule("deny", cidr="10.0.0.0/24").matches(flow())
    host_rule = Rule("deny", host="x.example")
    assert host_rule.matches(flow(host="x.example"))
    assert not host_rule.matches(flow(host=None))


# -- Proxy-Authorization tokens ------------------------------------------------------------------


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize("header, token", [
    ("Bearer abc123", "abc123"),
    ("bearer   abc123  ", "abc123"),
    ("BEARER t0k:en", "t0k:en"),
    (basic("user:s3cret"), "s3cret"),
    (basic("user:pa:ss"), "pa:ss"),
    (basic("only-user"), "only-user"),
    (basic("only-user:"), "only-user"),
    (basic(":just-password"), "just-password"),
    ("basic " + base64.b64encode(b"u:p").decode(), "p"),
    (basic("ünï:cødé"), "cødé"),
])
def test_token_of(header, token):
    assert token_of(header) == token


@pytest.mark.parametrize("header", [
    None, "", "   ", "Bearer", "Bearer    ", "Digest username=x", "Basic", "Basic !!!!",
    "Basic " + base64.b64encode(b":").decode(), "Basic " + base64.b64encode(b"").decode(),
    "Basic " + base64.b64encode(b"\xff\xfe:x").decode(), "Basic dXNlcjpw ZXh0cmE=",
    "Token abc", "abc",
])
def test_token_of_garbage(header):
    assert token_of(header) is None
