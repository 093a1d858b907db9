import textwrap

import pytest

from ipferry.supervisor.config import Config, ConfigError, parse


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse(textwrap.dedent(text), "t.toml")
    return str(exc.value).splitlines()


def test_default_is_useful(monkeypatch):
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/x")
    cfg = parse("")
    assert [o.socket_path().as_posix() for o in cfg.onramps] == ["/run/x/tunnel.sock"]
    assert cfg.admin.listen == "127.0.0.1:9180"
    assert cfg.admin.unix_socket_path().as_posix() == "/run/x/admin.sock"
    assert cfg.namespace.mtu == 65520
    assert cfg.worker_count() >= 1


def test_errors_name_line_key_value_reason():
    assert problems("""\
        workers = 0
        [supervision]
        backoff_initial = -1
        """) == [
        "t.toml:1: workers = 0: Input should be greater than or equal to 1",
        "t.toml:3: supervision.backoff_initial = -1: Input should be greater than 0",
    ]


def test_second_onramp_table_is_located():
    out = problems("""\
        [[onramps]]
        name = "a"
        [[onramps]]
        name = "b"
        mode = "rw"
        """)
    assert out == ["t.toml:5: onramps[1].mode = 'rw': Input should be a valid integer, "
                   "unable to parse string as an integer"]


def test_token_is_never_echoed():
    out = problems('[admin]\ntoken = "short"\n')
    assert out == ["t.toml:2: admin.token = <redacted>: String should have at least 16 characters"]


def test_semantic_checks():
    assert "admin must listen on loopback" in problems('[admin]\nlisten = "10.0.0.1:80"\n')[0]
    assert "on-ramp names must be unique" in problems(
        '[[onramps]]\nname="t"\n[[onramps]]\nname="t"\n')[0]
    assert "only net.* sysctls" in problems('[namespace.sysctls]\n"kernel.x" = "1"\n')[0]
    assert "need more blocks" in problems(
        'workers = 5\n[namespace]\nipv4_pool = "100.64.0.0/14"\n')[0]
    assert "expected HOST:PORT" in problems('[admin]\nlisten = "localhost"\n')[0]


def test_ipv6_loopback_admin():
    assert parse('[admin]\nlisten = "[::1]:9180"\n').admin.listen_address() == ("::1", 9180)


def test_worker_override_checked_against_pools():
    cfg = Config()
    assert cfg.worker_count(64) == 64
    with pytest.raises(ConfigError, match="hold blocks for 64 workers"):
        cfg.worker_count(65)


def test_token_file_is_checked_at_start_not_by_the_schema(tmp_path):
    f = tmp_path / "token"
    cfg = parse(f'[admin]\ntoken_file = "{f}"\n')  # may exist only for the service
    with pytest.raises(ConfigError, match="cannot read"):
        cfg.admin.check_token_file()
    f.write_text("short\n")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        cfg.admin.check_token_file()
    f.write_text("0123456789abcdef0123\n")
    cfg.admin.check_token_file()
    assert cfg.admin.bearer_token() == "0123456789abcdef0123"


def test_rule_and_gue_tenants_follow_the_tenant_syntax():
    lines = problems("""\
        [[rules]]
        action = "deny"
        tenant = "ac me"
        [[onramps]]
        kind = "gue"
        tenants = ["ok", "bad\\u0000"]
        """)
    assert any("rules[0].tenant = 'ac me'" in line for line in lines), lines
    assert any("onramps[0].tenants[1]" in line for line in lines), lines
    cfg = parse('[[rules]]\naction = "deny"\ntenant = "acme-2.eu:x@y"\n')
    assert cfg.rules[0].tenant == "acme-2.eu:x@y"
