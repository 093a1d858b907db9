"""The config's DNS keys: [dns] upstreams and resolv_conf, rules' domain; and how the rules
application decides a query by them."""

from __future__ import annotations

import pytest

from ipferry.engine.decisions import DnsQueryStart, TunnelContext
from ipferry.supervisor.config import ConfigError, Dns, host_resolvers, parse
from ipferry.worker.__main__ import build_application


def query(name: str, tenant: str = "acme") -> DnsQueryStart:
    return DnsQueryStart(tenant, "10.98.0.2", 5000, name, "A", TunnelContext(tenant))


def test_domain_rules_decide_queries_and_never_flows():
    config = parse('''
[[rules]]
action = "deny"
domain = "*.corp.test"
tenant = "acme"

[[rules]]
action = "allow"
domain = "ok.corp.test"

[[rules]]
action = "deny"
domain = "blocked.test"
''', "t.toml")
    app = build_application(config.worker_settings(1))
    assert app.on_dns_query(query("x.corp.test")).action == "nxdomain"
    assert app.on_dns_query(query("ok.corp.test")).action == "nxdomain"  # (first match wins)
    assert app.on_dns_query(query("x.corp.test", "globex")).action == "allow"
    assert app.on_dns_query(query("corp.test")).action == "allow"  # *. is strictly under
    assert app.on_dns_query(query("blocked.test")).reason == "denied by rule 2"
    from ipferry.engine.decisions import FlowStart
    flow = FlowStart("acme", "udp", "10.98.0.2", 5000, "100.100.100.100", 53, TunnelContext("acme"))
    assert app.on_flow_start(flow).action == "upgrade"  # domain rules are not flow rules


@pytest.mark.parametrize("rule, error", [
    ('domain = "bad domain"', "domain"),
    ('domain = "ünicode.test"', "xn--"),
    ('domain = "ok.test"\ncidr = "10.0.0.0/8"', "takes no cidr"),
])
def test_bad_domain_rules_are_refused_with_their_line(rule, error):
    with pytest.raises(ConfigError) as exc:
        parse(f'[[rules]]\naction = "deny"\n{rule}\n', "t.toml")
    assert "t.toml:" in str(exc.value) and error in str(exc.value), str(exc.value)


def test_upstreams_parse_and_default_to_the_hosts_resolv_conf(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("search corp.test\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\n"
                    "nameserver bogus\noptions edns0\n")
    assert host_resolvers(conf) == [("127.0.0.53", 53), ("fe80::1", 53)]
    assert Dns(resolv_conf=conf).resolved() == [("127.0.0.53", 53), ("fe80::1", 53)]
    assert Dns(upstreams=["192.0.2.53:5353", "[2001:db8::53]:53", "9.9.9.9"]).resolved() == [
        ("192.0.2.53", 5353), ("2001:db8::53", 53), ("9.9.9.9", 53)]
    assert Dns(resolv_conf=tmp_path / "missing").resolved() == []
    with pytest.raises(ConfigError) as exc:
        parse('[dns]\nupstreams = ["resolver.example"]\n', "t.toml")
    assert "expected an IP address" in str(exc.value)
