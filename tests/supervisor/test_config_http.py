"""The HTTP layer in the config: the [http] section, rules' layer = "http" and path/method/sni,
kind = "http" on-ramps (a forward proxy) and their tokens; each refusal names its file:line and
key, what the workers are given (tokens as SHA-256 only), the on-ramp's listener, and that no
token is ever printed, logged, dumped or served."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import textwrap
from pathlib import Path

import pytest

from ipferry.runtime.settings import Http, WorkerSettings
from ipferry.supervisor import cli, listeners
from ipferry.supervisor.config import (
    MAX_ALL_TOKENS,
    MAX_TOKENS,
    Config,
    ConfigError,
    HttpOnramp,
    load,
    parse,
)

SECRET = "s3cret-TOKEN-0123456789"  # never to be seen anywhere
SECRET2 = "another-Secret-9876543210"
FILE_SECRET = "file-held-Secret-abcdefghij"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse(textwrap.dedent(text), "t.toml")
    return str(exc.value).splitlines()


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# -- kind = "http" on-ramps ---------------------------------------------------------------------

def test_an_http_onramp_with_a_tenant_and_its_defaults():
    cfg = parse('[[onramps]]\nkind = "http"\ntenant = "acme"\n')
    (onramp,) = cfg.onramps
    assert isinstance(onramp, HttpOnramp)
    assert (onramp.name, onramp.listen, onramp.tokens, onramp.allow, onramp.backlog) == (
        "http", "127.0.0.1:3128", [], [], 1024)
    settings = cfg.worker_settings(2)
    proxy = settings.http_onramps["http"]
    assert (proxy.tenant, proxy.tokens, proxy.allow, proxy.address) == (
        "acme", {}, [], ("127.0.0.1", 3128))
    assert settings.tcp == {} and settings.gue == {}
    # What a worker reads back is the same.
    assert WorkerSettings.model_validate(settings.dump()).http_onramps["http"] == proxy


def test_an_http_onramp_with_tokens_inline_and_from_a_file(tmp_path):
    token_file = tmp_path / "globex.token"
    token_file.write_text(f"\n  {FILE_SECRET}  \n")
    cfg = parse(textwrap.dedent(f"""\
        [[onramps]]
        kind = "http"
        name = "proxy"
        listen = "[::]:3128"
        allow = ["192.0.2.7/24", "2001:db8::/32"]
        backlog = 64

        [[onramps.tokens]]
        tenant = "acme"
        token = "{SECRET}"

        [[onramps.tokens]]
        tenant = "globex"
        token_file = "{token_file}"
        """), "t.toml")
    cfg.check_runtime()
    proxy = cfg.worker_settings(1).http_onramps["proxy"]
    assert proxy.tenant is None  # a client must present a token
    assert proxy.tokens == {sha(SECRET): "acme", sha(FILE_SECRET): "globex"}
    assert proxy.allow == ["192.0.2.0/24", "2001:db8::/32"] and proxy.address == ("::", 3128)
    # The inline-table form is the same on-ramp.
    inline = parse(textwrap.dedent(f"""\
        [[onramps]]
        kind = "http"
        tenant = "acme"
        tokens = [{{ tenant = "acme-ci", token = "{SECRET}" }},
                  {{ tenant = "globex", token_file = "{token_file}" }}]
        """))
    assert inline.worker_settings(1).http_onramps["http"].tokens == {
        sha(SECRET): "acme-ci", sha(FILE_SECRET): "globex"}


def test_a_token_file_is_read_once_and_a_new_one_waits_for_a_restart(tmp_path):
    token_file = tmp_path / "t"
    token_file.write_text(FILE_SECRET)
    text = f'[[onramps]]\nkind = "http"\ntokens = [{{tenant = "a", token_file = "{token_file}"}}]\n'
    running = parse(text)
    running.check_runtime()
    token_file.write_text(SECRET)  # rotated after the start
    assert running.worker_settings(1).http_onramps["http"].tokens == {sha(FILE_SECRET): "a"}
    new = parse(text)
    new.check_runtime()  # as a reload does
    kept, changed = running.reloaded(new)
    assert changed == ["onramps"]
    assert kept.worker_settings(1).http_onramps["http"].tokens == {sha(FILE_SECRET): "a"}
    same = parse(text)
    token_file.write_text(FILE_SECRET)
    same.check_runtime()
    assert running.reloaded(same)[1] == []  # the same token: nothing waits


@pytest.mark.parametrize("content, reason", [
    (None, "cannot read (No such file or directory)"),
    ("  short  \n", "the token must have at least 16 characters"),
    ("has a space in it, though long", "the token must be printable ASCII without spaces"),
    (b"\xff\xfe" * 10, "not text"),
])
def test_a_bad_token_file_refuses_the_start_and_the_reload(tmp_path, content, reason):
    token_file = tmp_path / "t"
    if isinstance(content, str):
        token_file.write_text(content)
    elif isinstance(content, bytes):
        token_file.write_bytes(content)
    cfg = parse(textwrap.dedent(f"""\
        [[onramps]]
        kind = "tunnel"
        [[onramps]]
        kind = "http"
        tenant = "acme"
        [[onramps.tokens]]
        tenant = "acme"
        token_file = "{token_file}"
        """), "t.toml")  # the schema does not read it: check-config may not be the service
    with pytest.raises(ConfigError) as exc:
        cfg.check_runtime()
    assert str(exc.value).startswith(
        f"onramps[1].tokens[0].token_file = {str(token_file)!r}: {reason}"), str(exc.value)
    with pytest.raises(ConfigError):
        cfg.worker_settings(1)  # never a worker without its tokens


def test_a_token_file_holding_another_tokens_token_is_refused(tmp_path):
    token_file = tmp_path / "t"
    token_file.write_text(SECRET + "\n")
    cfg = parse(f'[[onramps]]\nkind = "http"\ntokens = [{{tenant = "a", token = "{SECRET}"}}, '
                f'{{tenant = "b", token_file = "{token_file}"}}]\n')
    with pytest.raises(ConfigError) as exc:
        cfg.check_runtime()
    assert str(exc.value) == (f"onramps[0].tokens[1].token_file = {str(token_file)!r}: the same "
                              f"token as tokens[0]: each token names one tenant")


def test_check_config_does_not_read_token_files_but_run_does(tmp_path, capsys):
    conf = tmp_path / "ipferry.toml"
    missing = tmp_path / "missing.token"
    conf.write_text(f'[[onramps]]\nkind = "http"\nname = "proxy"\n'
                    f'tokens = [{{tenant = "a", token_file = "{missing}"}}]\n')
    assert cli.main(["check-config", str(conf)]) == 0
    out = capsys.readouterr().out
    assert out.endswith("on-ramps: proxy at http proxy 127.0.0.1:3128 (1 token))\n"), out
    assert cli.main(["run", "--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert err == (f"ipferry: refusing to start:\nonramps[0].tokens[0].token_file = "
                   f"{str(missing)!r}: cannot read (No such file or directory)\n")


def test_an_http_onramp_needs_a_tenant_or_tokens():
    assert problems("""\
        [[onramps]]
        kind = "tunnel"

        [[onramps]]
        kind = "http"
        listen = "127.0.0.1:3128"
        """) == ["t.toml:4: onramps[1].tenant: an HTTP on-ramp needs a tenant or tokens: "
                 "tenant = \"...\" for every client, or [[onramps.tokens]] (tenant, token or "
                 "token_file) for clients presenting a Proxy-Authorization token"]


def test_an_http_onramp_off_loopback_needs_an_allow_list():
    assert problems("""\
        [[onramps]]
        kind = "http"
        tenant = "acme"
        listen = "0.0.0.0:3128"
        """) == ["t.toml:4: onramps[0].listen = '0.0.0.0:3128': an HTTP on-ramp on 0.0.0.0:3128 "
                 "(not loopback) needs an allow list of source networks: whoever can connect "
                 "to it opens flows as tenant acme"]
    assert problems(f"""\
        [[onramps]]
        kind = "http"
        listen = "[::]:3128"
        tokens = [{{tenant = "acme", token = "{SECRET}"}}]
        """) == ["t.toml:3: onramps[0].listen = '[::]:3128': an HTTP on-ramp on [::]:3128 "
                 "(not loopback) needs an allow list of source networks: whoever can connect "
                 "to it may try tokens, which cross the network in clear"]
    ok = parse('[[onramps]]\nkind = "http"\ntenant = "a"\nlisten = "0.0.0.0:3128"\n'
               'allow = ["10.0.0.0/8"]\n')
    assert ok.worker_settings(1).http_onramps["http"].allow == ["10.0.0.0/8"]
    assert parse('[[onramps]]\nkind = "http"\ntenant = "a"\nlisten = "[::1]:3128"\n').onramps


def test_tokens_are_unique_and_have_one_source(tmp_path):
    assert problems(f"""\
        [[onramps]]
        kind = "http"
        tenant = "acme"

        [[onramps.tokens]]
        tenant = "acme"
        token = "{SECRET}"

        [[onramps.tokens]]
        tenant = "globex"
        token = "{SECRET}"

        [[onramps.tokens]]
        tenant = "globex"
        token = "{SECRET2}"

        [[onramps.tokens]]
        tenant = "initech"
        token = "{SECRET2}"
        """) == [
        "t.toml:11: onramps[0].tokens[1].token: the same token as tokens[0]: each token names "
        "one tenant",
        "t.toml:19: onramps[0].tokens[3].token: the same token as tokens[2]: each token names "
        "one tenant"]
    assert problems(f"""\
        [[onramps]]
        kind = "http"
        tenant = "acme"

        [[onramps.tokens]]
        tenant = "globex"

        [[onramps.tokens]]
        tenant = "globex"
        token = "{SECRET2}"
        token_file = "/etc/ipferry/globex.token"
        """) == [
        "t.toml:5: onramps[0].tokens[0].token: set token or token_file: the secret a client "
        "presents",
        "t.toml:11: onramps[0].tokens[1].token_file = '/etc/ipferry/globex.token': set token or "
        "token_file, not both"]
    # The same token on two on-ramps is two credentials.
    cfg = parse(f'[[onramps]]\nkind = "http"\ntokens = [{{tenant = "a", token = "{SECRET}"}}]\n'
                f'[[onramps]]\nkind = "http"\nname = "b"\nlisten = "127.0.0.1:3129"\n'
                f'tokens = [{{tenant = "b", token = "{SECRET}"}}]\n')
    assert cfg.worker_settings(1).http_onramps["b"].tokens == {sha(SECRET): "b"}


def test_the_line_of_a_token_key_in_the_second_onramp():
    assert problems("""\
        [[onramps]]
        kind = "http"
        tenant = "acme"
        [[onramps.tokens]]
        tenant = "acme"
        token = "0123456789abcdef"

        [[onramps]]
        kind = "http"
        name = "second"
        listen = "127.0.0.1:3129"
        [[onramps.tokens]]
        tenant = "acme"
        token = "0123456789abcdef"
        [[onramps.tokens]]
        tenant = "not a tenant"
        token = "0123456789abcdeg"
        """)[0].startswith("t.toml:16: onramps[1].tokens[1].tenant = 'not a tenant': String "
                           "should match pattern")


@pytest.mark.parametrize("lines, expected", [
    (['tokens = [{tenant = "a", token = "short"}]'],
     "t.toml:3: onramps[0].tokens[0].token = <redacted>: the token must have at least 16 "
     "characters"),
    (['tokens = [{tenant = "a", token = "has spaces in it, though long"}]'],
     "t.toml:3: onramps[0].tokens[0].token = <redacted>: the token must be printable ASCII "
     "without spaces"),
    ([f'tokens = [{{tenant = "a", token = "{"x" * 1025}"}}]'],
     "t.toml:3: onramps[0].tokens[0].token = <redacted>: the token must have at most 1024 "),
    (['tokens = [{tenant = "a b", token = "0123456789abcdef"}]'],
     "t.toml:3: onramps[0].tokens[0].tenant = 'a b': String should match pattern"),
    (['tokens = [{token = "0123456789abcdef"}]'],
     "t.toml:3: onramps[0].tokens[0].tenant: Field required"),
    (['tenant = "a"', 'listen = "localhost:3128"'],
     "t.toml:4: onramps[0].listen = 'localhost:3128': expected an IP address and a port, e.g. "
     "127.0.0.1:3128 or [::1]:3128 (no host names)"),
    (['tenant = "a"', 'allow = ["x"]'], "t.toml:4: onramps[0].allow: 'x': not a network"),
    (['tenant = "a"', "backlog = 0"], "t.toml:4: onramps[0].backlog = 0: Input should be greater"),
    (['tenant = "a"', 'upstream = "10.0.0.1:80"'],
     "t.toml:4: onramps[0].upstream = '10.0.0.1:80': unknown key"),
    (['tenant = "a"', 'name = "Proxy"'], "t.toml:4: onramps[0].name = 'Proxy': String should"),
])
def test_bad_http_onramps(lines, expected):
    out = problems('[[onramps]]\nkind = "http"\n' + "".join(f"{line}\n" for line in lines))
    assert len(out) == 1 and out[0].startswith(expected), out


def test_at_most_256_tokens_an_onramp_and_512_in_all():
    def onramp(name: str, n: int, port: int) -> str:
        tokens = ", ".join(f'{{tenant = "t", token = "{name}-token-{i:016d}"}}' for i in range(n))
        return (f'[[onramps]]\nkind = "http"\nname = "{name}"\nlisten = "127.0.0.1:{port}"\n'
                f"tokens = [{tokens}]\n")
    out = problems(onramp("a", MAX_TOKENS + 1, 1))
    assert out == ["t.toml:5: onramps[0].tokens: List should have at most 256 items after "
                   "validation, not 257"]
    text = onramp("a", MAX_TOKENS, 1) + onramp("b", MAX_TOKENS, 2) + onramp("c", 1, 3)
    assert problems(text) == [f"t.toml:15: onramps[2].tokens: {MAX_ALL_TOKENS + 1} tokens over "
                              f"all HTTP on-ramps, over {MAX_ALL_TOKENS}"]
    # 512 of them fit a worker's control message with room to spare.
    settings = parse(onramp("a", MAX_TOKENS, 1) + onramp("b", MAX_TOKENS, 2)).worker_settings(128)
    assert len(json.dumps(settings.dump())) < 128 * 1024


def test_the_onramp_kinds_include_http():
    out = problems('[[onramps]]\nkind = "udp"\n')[0]
    assert "expected tags: 'tunnel', 'gue', 'tcp', 'http'" in out
    assert "on-ramp names must be unique" in problems(
        '[[onramps]]\nname = "x"\n[[onramps]]\nkind = "http"\nname = "x"\ntenant = "a"\n')[0]


# -- rules: layer = "http", path, method, sni ---------------------------------------------------

def test_http_rule_keys_are_given_to_the_workers():
    cfg = parse(textwrap.dedent("""\
        [[rules]]
        name = "web"
        action = "allow"
        ports = "80"
        layer = "http"

        [[rules]]
        action = "deny"
        tenant = "acme"
        host = "*.corp.example"
        path = "/admin/"
        method = "delete"

        [[rules]]
        action = "deny"
        path = "/x?a=%20&b=~"
        protocol = "tcp"
        cidr = "10.0.0.0/8"
        ports = "8080"

        [[rules]]
        action = "allow"
        sni = "api.corp.example"
        tenant = "acme"
        cidr = "198.18.0.0/15"
        ports = "443"
        protocol = "tcp"

        [[rules]]
        action = "deny"
        method = "M-SEARCH"
        """))
    rules = cfg.worker_settings(1).rules
    assert [(r.name, r.layer, r.host, r.path, r.method, r.sni) for r in rules] == [
        ("web", "http", None, None, None, None),
        ("1", None, "*.corp.example", "/admin/", "DELETE", None),
        ("2", None, None, "/x?a=%20&b=~", None, None),
        ("3", None, None, None, None, "api.corp.example"),
        ("4", None, None, None, "M-SEARCH", None)]
    assert cfg.rules[1].method == "DELETE"  # normalised in the config too


@pytest.mark.parametrize("key, value, reason", [
    ("layer", '"tcp"', "Input should be 'ip', 'stream' or 'http'"),
    ("path", '"admin"', 'expected a path starting with "/", e.g. "/admin"'),
    ("path", '""', 'expected a path starting with "/"'),
    ("path", '"/a b"', "printable ASCII only, no spaces"),
    ("path", '"/caf\u00e9"', "printable ASCII only, no spaces"),
    ("path", '"/a\\tb"', "printable ASCII only, no spaces"),
    ("path", f'"/{"a" * 1024}"', "longer than 1024 characters"),
    ("method", '"GET /"', "expected an HTTP method"),
    ("method", '""', "expected an HTTP method"),
    ("method", '"G(ET"', "expected an HTTP method"),
    ("method", f'"{"A" * 33}"', "expected an HTTP method, e.g. \"GET\" or \"POST\" (1-32 "),
    ("sni", '"bad name"', "characters other than letters"),
    ("sni", '"*"', "'*' needs a suffix"),
    ("sni", '"\u00fcnicode.test"', "xn--"),
])
def test_bad_http_rule_keys_are_refused_at_their_line(key, value, reason):
    out = problems(f'[[rules]]\naction = "deny"\n\n{key} = {value}\n')
    assert len(out) == 1 and out[0].startswith(f"t.toml:4: rules[0].{key} = "), out
    assert reason in out[0], out


def test_a_long_path_and_method_at_the_limits_are_taken():
    cfg = parse(f'[[rules]]\naction = "deny"\npath = "/{"a" * 1023}"\nmethod = "{"A" * 32}"\n')
    assert len(cfg.rules[0].path or "") == 1024


SNI_ALONE = ("a rule with sni decides TLS streams by their ClientHello: it takes no path, "
             "method, host, upstream or layer")
REQUESTS = ("a rule with path or method decides HTTP requests, not flows: it takes no layer or "
            "upstream")
DOMAIN = ("a rule with a domain decides DNS queries: it takes no cidr, ports, protocol, "
          "upstream, layer, host, path, method or sni")


@pytest.mark.parametrize("lines, expected", [
    (['sni = "a.example"', 'path = "/x"'], [f"t.toml:4: rules[0].path = '/x': {SNI_ALONE}"]),
    (['sni = "a.example"', 'method = "GET"'],
     [f"t.toml:4: rules[0].method = 'GET': {SNI_ALONE}"]),
    (['sni = "a.example"', 'host = "a.example"'],
     [f"t.toml:4: rules[0].host = 'a.example': {SNI_ALONE}"]),
    (['sni = "a.example"', 'upstream = "10.0.0.1:443"'],
     [f"t.toml:4: rules[0].upstream = '10.0.0.1:443': {SNI_ALONE}"]),
    (['sni = "a.example"', 'layer = "stream"', 'path = "/"'],
     [f"t.toml:5: rules[0].path = '/': {SNI_ALONE}",
      f"t.toml:4: rules[0].layer = 'stream': {SNI_ALONE}"]),
    (['path = "/x"', 'layer = "http"'], [f"t.toml:4: rules[0].layer = 'http': {REQUESTS}"]),
    (['path = "/x"', 'upstream = "10.0.0.5:80"'],
     [f"t.toml:4: rules[0].upstream = '10.0.0.5:80': {REQUESTS}"]),
    (['method = "POST"', 'upstream = "10.0.0.5:80"', 'layer = "ip"'],
     [f"t.toml:5: rules[0].layer = 'ip': {REQUESTS}",
      f"t.toml:4: rules[0].upstream = '10.0.0.5:80': {REQUESTS}"]),
    (['path = "/x"', 'protocol = "udp"'],
     ["t.toml:4: rules[0].protocol = 'udp': a rule with sni, path or method matches TCP streams "
      "only: protocol can only be \"tcp\""]),
    (['sni = "a.example"', 'protocol = "icmp"'],
     ["t.toml:4: rules[0].protocol = 'icmp': a rule with sni, path or method matches TCP "
      "streams only: protocol can only be \"tcp\""]),
    (['domain = "a.example"', 'path = "/x"'], [f"t.toml: rules[0]: {DOMAIN}"]),
    (['domain = "a.example"', 'method = "GET"'], [f"t.toml: rules[0]: {DOMAIN}"]),
    (['domain = "a.example"', 'sni = "a.example"'], [f"t.toml: rules[0]: {DOMAIN}"]),
])
def test_http_rule_keys_that_do_not_go_together(lines, expected):
    out = problems('[[rules]]\naction = "deny"\n' + "".join(f"{line}\n" for line in lines))
    assert out == expected  # (the domain check is of the whole rule: no key, so no line)


def test_http_rule_keys_that_go_together():
    parse('[[rules]]\naction = "allow"\nhost = "a.example"\nlayer = "http"\nports = "80"\n')
    parse('[[rules]]\naction = "deny"\nhost = "a.example"\npath = "/x"\nmethod = "PUT"\n'
          'tenant = "acme"\ncidr = "10.0.0.0/8"\nports = "80-8080"\nprotocol = "tcp"\n')
    parse('[[rules]]\naction = "deny"\nsni = "*.a.example"\ntenant = "acme"\n'
          'cidr = "10.0.0.0/8"\nports = "443"\nname = "tls"\n')


# -- [http] -------------------------------------------------------------------------------------

def test_the_http_section_reaches_the_workers():
    assert Config().worker_settings(1).http == Http()
    cfg = parse(textwrap.dedent("""\
        [http]
        header_timeout = 5
        idle_timeout = 3600
        max_header_bytes = 1024
        pool_per_upstream = 0
        pool_total = 65536
        pool_idle_timeout = 0.5
        tls_ports = [443]
        client_hello_timeout = 60
        """))
    http = cfg.worker_settings(1).http
    assert (http.header_timeout, http.idle_timeout, http.max_header_bytes, http.pool_per_upstream,
            http.pool_total, http.pool_idle_timeout, http.tls_ports,
            http.client_hello_timeout) == (5.0, 3600.0, 1024, 0, 65536, 0.5, [443], 60.0)
    assert WorkerSettings.model_validate(cfg.worker_settings(1).dump()).http == http


@pytest.mark.parametrize("line, reason", [
    ("header_timeout = 0", "Input should be greater than 0"),
    ("header_timeout = 301", "Input should be less than or equal to 300"),
    ("idle_timeout = 3601", "less than or equal to 3600"),
    ("max_header_bytes = 1023", "greater than or equal to 1024"),
    ("max_header_bytes = 1048577", "less than or equal to 1048576"),
    ("pool_per_upstream = -1", "greater than or equal to 0"),
    ("pool_total = 65537", "less than or equal to 65536"),
    ("pool_idle_timeout = 0", "greater than 0"),
    ("client_hello_timeout = 61", "less than or equal to 60"),
    ("tls_ports = [0]", "greater than or equal to 1"),
    ("tls_ports = [65536]", "less than or equal to 65535"),
    (f"tls_ports = [{', '.join(str(p) for p in range(1, 66))}]", "at most 64 items"),
    ('tls_ports = "443"', "Input should be a valid list"),
    ("bogus = 1", "unknown key"),
])
def test_http_section_bounds(line, reason):
    out = problems(f"[http]\n{line}\n")
    assert len(out) == 1 and out[0].startswith("t.toml:2: http."), out
    assert reason in out[0], out


def test_the_http_section_waits_for_a_restart():
    running = parse("[http]\nheader_timeout = 5\n")
    new, changed = running.reloaded(parse("[http]\nheader_timeout = 6\n"))
    assert changed == ["http"] and new.http.header_timeout == 5.0
    assert "`[flows]`, `[audit]`, `[dns]`, `[http]` | at restart" in DOCS.read_text()


# -- the listener -------------------------------------------------------------------------------

def http_config(listen: str = "127.0.0.1:0", **keys) -> HttpOnramp:
    keys.setdefault("tenant", "acme")
    return HttpOnramp(kind="http", name="proxy", listen=listen, **keys)


def test_an_http_onramp_is_bound_as_a_tcp_one():
    assert listeners.listener_class("http") is listeners.HttpListener
    assert listeners.HttpListener.kind == "http" and listeners.TcpListener.kind == "tcp"
    (listener,) = listeners.open_onramps([http_config(backlog=8)], workers=3)
    try:
        sock = listener.sock
        assert (sock.family, sock.type, sock.getblocking()) == (socket.AF_INET,
                                                                socket.SOCK_STREAM, False)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        assert listener.address == f"127.0.0.1:{sock.getsockname()[1]}"
        for worker in range(3):
            assert listener.fds_for(worker) == {"onramp:http:proxy": sock.fileno()}
        with socket.create_connection(sock.getsockname()[:2], timeout=2):
            pass  # it listens
    finally:
        listener.close()


def test_a_bind_that_fails_names_the_http_onramp():
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(listeners.ListenerError,
                           match=f"^HTTP on-ramp proxy at 127.0.0.1:{port}: cannot listen "
                                 f".*another process"):
            listeners.HttpListener.open(http_config(f"127.0.0.1:{port}"), 1, {})


def test_a_socket_from_systemd_is_taken_if_it_is_a_tcp_listener():
    given = socket.socket()
    given.bind(("127.0.0.1", 0))
    given.listen(4)
    passed = {"proxy": given}
    listener = listeners.HttpListener.open(http_config("127.0.0.1:3128"), 2, passed)
    assert listener.sock is given and listener.from_systemd and passed == {}
    assert listener.kind == "http" and listener.address == f"127.0.0.1:{given.getsockname()[1]}"
    listener.close()
    wrong = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(listeners.ListenerError,
                       match="^HTTP on-ramp proxy: the socket systemd passed by that name is not "
                             "a listening TCP socket; give it ListenStream=127.0.0.1:3128"):
        listeners.HttpListener.open(http_config("127.0.0.1:3128"), 1, {"proxy": wrong})
    assert wrong.fileno() == -1


def test_where_an_http_onramp_listens():
    tokens = [{"tenant": "a", "token": SECRET}, {"tenant": "b", "token": SECRET2}]
    assert cli._where(http_config("127.0.0.1:3128", tokens=tokens)) == (
        "http proxy 127.0.0.1:3128 (tenant acme, 2 tokens)")
    assert cli._where(http_config("127.0.0.1:3128", tenant=None, tokens=tokens[:1])) == (
        "http proxy 127.0.0.1:3128 (1 token)")
    assert cli._where(http_config("[::1]:3128")) == "http proxy [::1]:3128 (tenant acme)"


# -- secrets ------------------------------------------------------------------------------------

def secret_config(tmp_path) -> tuple[Path, str]:
    token_file = tmp_path / "globex.token"
    token_file.write_text(FILE_SECRET + "\n")
    conf = tmp_path / "ipferry.toml"
    text = textwrap.dedent(f"""\
        [admin]
        token = "{SECRET2}"

        [[onramps]]
        kind = "http"
        name = "proxy"
        tenant = "acme"

        [[onramps.tokens]]
        tenant = "acme-ci"
        token = "{SECRET}"

        [[onramps.tokens]]
        tenant = "globex"
        token_file = "{token_file}"
        """)
    conf.write_text(text)
    return conf, text


def assert_no_secret(*outputs) -> None:
    for out in outputs:
        text = out if isinstance(out, str) else repr(out)
        for secret in (SECRET, FILE_SECRET):
            assert secret not in text, text
            assert secret.encode().hex() not in text, text


def test_tokens_are_never_printed_dumped_or_given_to_workers(tmp_path, capsys):
    conf, text = secret_config(tmp_path)
    cfg = load(conf)
    cfg.check_runtime()
    (onramp,) = cfg.onramps
    assert isinstance(onramp, HttpOnramp) and onramp.tokens[0].secret() == SECRET
    assert onramp.tokens[1].secret() == FILE_SECRET
    settings = cfg.worker_settings(4)
    dumps = [repr(cfg), str(cfg), cfg.model_dump(), cfg.model_dump(mode="json"),
             cfg.model_dump_json(), repr(onramp), onramp.model_dump(mode="json"),
             settings.dump(), json.dumps(settings.dump()), repr(settings)]
    assert_no_secret(*dumps)
    assert cfg.model_dump(mode="json")["onramps"][0]["tokens"][0]["token"] == "**********"
    assert "**********" in repr(cfg)
    assert settings.http_onramps["proxy"].tokens == {sha(SECRET): "acme-ci",
                                                      sha(FILE_SECRET): "globex"}
    # check-config's summary, and the describe line the status and logs use.
    assert cli.main(["check-config", str(conf)]) == 0
    out = capsys.readouterr()
    assert "proxy at http proxy 127.0.0.1:3128 (tenant acme, 2 tokens)" in out.out
    assert_no_secret(out.out, out.err, cli._where(onramp), listeners.HttpListener.where(onramp))
    # A reload's reply names keys, never values.
    conf.write_text(text.replace(SECRET, SECRET[::-1]))
    new = load(conf)
    new.check_runtime()
    running, changed = cfg.reloaded(new)
    assert changed == ["onramps"]
    assert_no_secret(changed, repr(running), running.worker_settings(1).dump())


@pytest.mark.parametrize("onramp_lines", [
    [f'tokens = [{{tenant = "a", token = "{SECRET} with a space"}}]'],
    [f'tokens = [{{tenant = "a b", token = "{SECRET}"}}]'],
    [f'tokens = [{{tenant = "a", tokn = "{SECRET}"}}]'],
    [f'tokens = [{{tenant = "a", token = "{SECRET}", token_file = "/x"}}]'],
    [f'tokens = ["{SECRET}"]'],
    [f'tokens = "{SECRET}"'],
    [f'token = "{SECRET}"', 'tenant = "a"'],
    [f'tokens = [{{tenant = "a", token = "{SECRET}"}}, {{tenant = "b", token = "{SECRET}"}}]'],
    [f'tokens = [{{tenant = "a", token = "{SECRET}"}}]', 'listen = "0.0.0.0:3128"'],
    [f'tokens = [{{tenant = "a", token = {{ value = "{SECRET}" }} }}]'],
    [f'tokens = [{{tenant = "a", token = ["{SECRET}"]}}]'],
])
def test_a_refused_onramp_never_echoes_its_token(onramp_lines, tmp_path, capsys):
    text = '[[onramps]]\nkind = "http"\n' + "".join(f"{line}\n" for line in onramp_lines)
    with pytest.raises(ConfigError) as exc:
        parse(text, "t.toml")
    assert_no_secret(str(exc.value))
    conf = tmp_path / "bad.toml"
    conf.write_text(text)
    assert cli.main(["check-config", str(conf)]) == 2
    assert cli.main(["run", "--config", str(conf)]) == 2
    out = capsys.readouterr()
    assert f"{conf}:" in out.err
    assert_no_secret(out.out, out.err)


def test_a_refused_token_file_never_echoes_its_token(tmp_path, capsys):
    token_file = tmp_path / "t"
    token_file.write_text(f"{SECRET} and more\n")  # a space: refused
    conf = tmp_path / "ipferry.toml"
    conf.write_text(f'[[onramps]]\nkind = "http"\n'
                    f'tokens = [{{tenant = "a", token_file = "{token_file}"}}]\n')
    assert cli.main(["run", "--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert "the token must be printable ASCII without spaces" in err
    assert_no_secret(err)


# -- the docs -----------------------------------------------------------------------------------

def test_the_docs_examples_of_the_http_keys_parse():
    doc = DOCS.read_text()
    blocks = re.findall(r"```toml\n(.*?)```", doc, re.S)
    onramp = next(b for b in blocks if 'kind = "http"' in b)
    cfg = parse(onramp)
    assert cli._where(cfg.onramps[0]) == "http proxy 0.0.0.0:3128 (tenant acme, 2 tokens)"
    rules = next(b for b in blocks if 'sni = "' in b)
    assert [r.name for r in parse(rules).rules] == ["web-as-http", "no-admin", "read-only",
                                                    "tls-to-api"]
    parse(next(b for b in blocks if b.startswith("[http]")))
