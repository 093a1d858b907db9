"""Private networks in the config (#11): [[networks]], [[sites]], tcp on-ramps, rules' layer; each
refusal names its file:line and key, and what the workers are given."""

from __future__ import annotations

import textwrap

import pytest

from ipferry.supervisor.config import Config, ConfigError, parse

NETWORKS = """\
    [[onramps]]
    kind = "gue"

    [[networks]]
    tenant = "acme"
    cidr = "10.77.0.0/16"

    [[networks]]
    tenant = "acme"
    cidr = "fd77::/64"
    """


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse(textwrap.dedent(text), "t.toml")
    return str(exc.value).splitlines()


def test_networks_are_normalised_and_tenants_may_overlap_each_other():
    cfg = parse(textwrap.dedent("""\
        [[networks]]
        tenant = "acme"
        cidr = "10.77.1.5/16"
        [[networks]]
        tenant = "globex"
        cidr = "10.77.0.0/16"
        [[networks]]
        tenant = "acme"
        cidr = "FD77::1/64"
        """))
    settings = cfg.worker_settings(2)
    assert [(n.tenant, n.cidr) for n in settings.networks] == [
        ("acme", "10.77.0.0/16"), ("globex", "10.77.0.0/16"), ("acme", "fd77::/64")]


def test_a_tenants_networks_may_not_overlap_and_the_error_names_both():
    assert problems("""\
        [[networks]]
        tenant = "acme"
        cidr = "10.77.0.0/16"
        [[networks]]
        tenant = "globex"
        cidr = "10.77.0.0/16"
        [[networks]]
        tenant = "acme"
        cidr = "10.77.1.5/24"
        """) == ["t.toml:9: networks[2].cidr = '10.77.1.0/24': 10.77.1.0/24 overlaps 10.77.0.0/16 "
                 "(networks[0]) of tenant acme: a tenant's networks may not overlap"]


@pytest.mark.parametrize("cidr, reason", [
    ('"10.77.0.0/33"', "not an IPv4 or IPv6 network"),
    ('"acme.example"', "not an IPv4 or IPv6 network"),
    ('"fd77::/129"', "not an IPv4 or IPv6 network"),
    ("7", "expected an IPv4 or IPv6 network as a string"),
])
def test_a_bad_network_is_refused_at_its_line(cidr, reason):
    out = problems(f"""\
        [[networks]]
        tenant = "acme"
        cidr = {cidr}
        """)
    assert len(out) == 1 and out[0].startswith("t.toml:3: networks[0].cidr") and reason in out[0]


def test_network_tenants_follow_the_tenant_syntax_and_are_required():
    assert problems('[[networks]]\ntenant = "ac me"\ncidr = "10.0.0.0/8"\n')[0].startswith(
        "t.toml:2: networks[0].tenant = 'ac me': String should match pattern")
    assert problems('[[networks]]\ncidr = "10.0.0.0/8"\n') == [
        "t.toml:1: networks[0].tenant: Field required"]


def test_at_most_1024_networks():
    text = "".join(f'[[networks]]\ntenant = "t{i}"\ncidr = "10.0.0.0/8"\n' for i in range(1025))
    assert "networks: List should have at most 1024 items" in problems(text)[0]
    text = "".join(f'[[networks]]\ntenant = "t{i}"\ncidr = "10.0.0.0/8"\n' for i in range(1024))
    assert len(parse(text).networks) == 1024


def test_sites_are_given_to_the_workers_with_their_onramp():
    cfg = parse(textwrap.dedent(NETWORKS + """\
        [[sites]]
        name = "lab"
        tenant = "acme"
        prefixes = ["10.77.5.9/24", "fd77::5:0/112", "10.77.6.1"]
        sender = "127.0.0.1:7001"
        """))
    (site,) = cfg.worker_settings(1).sites
    assert site.name == "lab" and site.tenant == "acme" and site.onramp == "gue"
    assert site.prefixes == ["10.77.5.0/24", "fd77::5:0/112", "10.77.6.1/32"]
    assert site.sender == ("127.0.0.1", 7001)


def test_a_site_prefix_outside_the_tenants_networks():
    out = problems(NETWORKS + """\
        [[sites]]
        name = "lab"
        tenant = "acme"
        prefixes = ["10.77.5.0/24", "10.9.0.0/24"]
        sender = "127.0.0.1:7001"
        [[sites]]
        name = "far"
        tenant = "globex"
        prefixes = ["10.77.5.0/24"]
        sender = "127.0.0.1:7002"
        """)
    assert out == [
        "t.toml:14: sites[0].prefixes[1] = '10.9.0.0/24': 10.9.0.0/24 is outside tenant acme's "
        "networks (10.77.0.0/16, fd77::/64)",
        "t.toml:19: sites[1].prefixes[0] = '10.77.5.0/24': 10.77.5.0/24 is outside tenant "
        "globex's networks (none: add [[networks]])"]


def test_site_prefixes_of_a_tenant_may_not_overlap():
    out = problems(NETWORKS + """\
        [[sites]]
        name = "lab"
        tenant = "acme"
        prefixes = ["10.77.5.0/24"]
        sender = "127.0.0.1:7001"
        [[sites]]
        name = "annex"
        tenant = "acme"
        prefixes = ["10.77.5.128/25", "fd77::1", "fd77::1/128"]
        sender = "127.0.0.1:7002"
        """)
    assert out == [
        "t.toml:19: sites[1].prefixes[0] = '10.77.5.128/25': 10.77.5.128/25 overlaps "
        "10.77.5.0/24 of site lab",
        "t.toml:19: sites[1].prefixes[2] = 'fd77::1/128': fd77::1/128 overlaps fd77::1/128 of "
        "site annex"]


def test_site_names_are_unique_and_their_onramp_is_a_gue_one():
    out = problems(NETWORKS + """\
        [[onramps]]
        kind = "gue"
        name = "gue2"
        listen = "127.0.0.1:6081"
        [[sites]]
        name = "lab"
        tenant = "acme"
        prefixes = ["10.77.5.0/24"]
        sender = "127.0.0.1:7001"
        onramp = "gue2"
        [[sites]]
        name = "lab"
        tenant = "acme"
        prefixes = ["10.77.6.0/24"]
        sender = "127.0.0.1:7002"
        onramp = "tunnel"
        [[sites]]
        name = "other"
        tenant = "acme"
        prefixes = ["10.77.7.0/24"]
        sender = "127.0.0.1:7003"
        """)
    assert out == [
        "t.toml:22: sites[1].name = 'lab': site names must be unique: sites[0] is lab too",
        "t.toml:26: sites[1].onramp = 'tunnel': no GUE on-ramp tunnel (GUE on-ramps: gue, gue2)",
        "t.toml:27: sites[2].onramp: name the site's GUE on-ramp (onramp = one of gue, gue2)"]


def test_a_site_without_any_gue_onramp():
    assert problems("""\
        [[networks]]
        tenant = "acme"
        cidr = "10.77.0.0/16"
        [[sites]]
        name = "lab"
        tenant = "acme"
        prefixes = ["10.77.5.0/24"]
        sender = "127.0.0.1:7001"
        """) == ["t.toml:4: sites[0].onramp: a site needs a GUE on-ramp: there is none"]


@pytest.mark.parametrize("key, value, reason", [
    ("prefixes", "[]", "List should have at least 1 item"),
    ("prefixes", '"10.77.5.0/24"', "Input should be a valid list"),
    ("prefixes", '["10.77.5.0/24", "nope"]', "'nope': not a network"),
    ("prefixes", '["10.77.5.0/24", 7]', "7: not a network (write it as a string"),
    ("sender", '"lab.example:7001"', "expected an IP address and a port"),
    ("sender", '"127.0.0.1:0"', "the port must be 1..65535"),
    ("sender", '"127.0.0.1"', "expected HOST:PORT"),
    ("name", '"Lab"', "String should match pattern"),
])
def test_bad_site_keys(key, value, reason):
    keys = {"name": '"lab"', "tenant": '"acme"', "prefixes": '["10.77.5.0/24"]',
            "sender": '"127.0.0.1:7001"', key: value}
    out = problems(NETWORKS + "[[sites]]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
    assert len(out) == 1 and out[0].startswith("t.toml:") and f"sites[0].{key}" in out[0], out
    assert reason in out[0], out


def test_at_most_64_prefixes_a_site_and_1024_in_all():
    many = ", ".join(f'"10.77.{i}.0/24"' for i in range(65))
    out = problems(NETWORKS + f'[[sites]]\nname = "a"\ntenant = "acme"\nprefixes = [{many}]\n'
                              f'sender = "127.0.0.1:1"\n')
    assert "sites[0].prefixes: List should have at most 64 items" in out[0]
    sites = "".join(
        f'[[sites]]\nname = "s{s}"\ntenant = "acme"\nsender = "127.0.0.1:1"\nprefixes = ['
        + ", ".join(f'"10.77.{s}.{i * 2}/31"' for i in range(64)) + "]\n" for s in range(17))
    out = problems(NETWORKS + sites)
    assert out == [f"t.toml:{len((NETWORKS + sites).splitlines())}: sites[16].prefixes: "
                   "1088 site prefixes in all, over 1024"]


def test_a_tcp_onramp_and_what_the_workers_are_given():
    cfg = parse(textwrap.dedent("""\
        [[onramps]]
        kind = "tcp"
        name = "web"
        listen = "[::]:8443"
        allow = ["192.0.2.7/24", "2001:db8::/32"]
        tenant = "acme"
        upstream = "[fd77::2]:443"
        proxy_protocol = true
        backlog = 64
        """))
    (onramp,) = cfg.onramps
    assert onramp.kind == "tcp" and onramp.address() == ("::", 8443) and onramp.backlog == 64
    tcp = cfg.worker_settings(1).tcp["web"]
    assert tcp.tenant == "acme" and tcp.upstream == ("fd77::2", 443) and tcp.proxy_protocol
    assert tcp.allow == ["192.0.2.0/24", "2001:db8::/32"] and tcp.address == ("::", 8443)
    assert cfg.worker_settings(1).gue == {}
    default = parse('[[onramps]]\nkind = "tcp"\nlisten = "127.0.0.1:1"\ntenant = "a"\n'
                    'upstream = "10.0.0.1:2"\n').onramps[0]
    assert (default.name, default.proxy_protocol, default.allow, default.backlog) == (
        "tcp", False, [], 1024)


def test_a_tcp_onramp_off_loopback_needs_an_allow_list():
    assert problems("""\
        [[onramps]]
        kind = "tunnel"
        [[onramps]]
        kind = "tcp"
        tenant = "acme"
        upstream = "10.77.0.2:443"
        listen = "0.0.0.0:8443"
        """) == ["t.toml:7: onramps[1].listen = '0.0.0.0:8443': a TCP on-ramp on 0.0.0.0:8443 "
                 "(not loopback) needs an allow list of source networks: whoever can connect "
                 "to it opens flows as tenant acme"]


@pytest.mark.parametrize("lines, expected", [
    ([], ["onramps[0].listen: Field required", "onramps[0].tenant: Field required",
          "onramps[0].upstream: Field required"]),
    (['listen = "localhost:8443"', 'tenant = "a"', 'upstream = "10.0.0.1:1"'],
     ["onramps[0].listen = 'localhost:8443': expected an IP address and a port"]),
    (['listen = "127.0.0.1:8443"', 'tenant = "a"', 'upstream = "db.internal:5432"'],
     ["onramps[0].upstream = 'db.internal:5432': expected an IP address and a port"]),
    (['listen = "127.0.0.1:8443"', 'tenant = "a"', 'upstream = "10.0.0.1:0"'],
     ["onramps[0].upstream = '10.0.0.1:0': the port must be 1..65535"]),
    (['listen = "127.0.0.1:8443"', 'tenant = "a b"', 'upstream = "10.0.0.1:1"'],
     ["onramps[0].tenant = 'a b': String should match pattern"]),
    (['listen = "127.0.0.1:8443"', 'tenant = "a"', 'upstream = "10.0.0.1:1"', 'allow = ["x"]'],
     ["t.toml:6: onramps[0].allow: 'x': not a network"]),
    (['listen = "127.0.0.1:8443"', 'tenant = "a"', 'upstream = "10.0.0.1:1"', "receive_buffer = 1"],
     ["onramps[0].receive_buffer = 1: unknown key"]),
])
def test_bad_tcp_onramps(lines, expected):
    out = problems('[[onramps]]\nkind = "tcp"\n' + "".join(f"{line}\n" for line in lines))
    assert len(out) == len([e for e in expected if ": " in e]) or len(out) == 1, out
    text = "\n".join(out)
    for part in expected:
        assert part in text, out
    assert all(line.startswith("t.toml:") for line in out), out


def test_onramp_names_are_unique_across_kinds():
    assert "on-ramp names must be unique" in problems(
        '[[onramps]]\nname = "x"\n[[onramps]]\nkind = "tcp"\nname = "x"\nlisten = "127.0.0.1:1"\n'
        'tenant = "a"\nupstream = "10.0.0.1:1"\n')[0]
    assert "expected tags: 'tunnel', 'gue', 'tcp'" in problems('[[onramps]]\nkind = "udp"\n')[0]


def test_rules_have_a_layer():
    cfg = parse('[[rules]]\naction = "allow"\nlayer = "stream"\n[[rules]]\naction = "deny"\n')
    assert [r.layer for r in cfg.worker_settings(1).rules] == ["stream", None]
    assert problems('[[rules]]\naction = "allow"\n\nlayer = "tcp"\n') == [
        "t.toml:4: rules[0].layer = 'tcp': Input should be 'ip', 'stream' or 'http'"]


def test_the_default_config_has_no_private_networks():
    settings = Config().worker_settings(1)
    assert settings.networks == [] and settings.sites == [] and settings.tcp == {}


def test_networks_and_sites_wait_for_a_restart():
    running = parse(textwrap.dedent(NETWORKS))
    new, changed = running.reloaded(parse(textwrap.dedent(NETWORKS.replace("/16", "/17"))))
    assert changed == ["networks"] and str(new.networks[0].cidr) == "10.77.0.0/16"
