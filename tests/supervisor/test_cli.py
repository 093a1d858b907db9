"""The CLI's own logic: help, --version, --admin targets, check-config, status rendering."""

import importlib.metadata

import pytest

from ipferry.supervisor import cli
from ipferry.supervisor.adminclient import AdminClientError, admin_target
from ipferry.wire.gue import MAX_CONTEXT, MAX_VNET_CONTEXT


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"ipferry {importlib.metadata.version('ipferry')}"


def help_of(*argv: str) -> str:
    parser = cli.build_parser()
    if not argv:
        return parser.format_help()
    sub = next(a for a in parser._actions if a.dest == "command")
    return " ".join(sub.choices[argv[0]].format_help().split())  # type: ignore[attr-defined]


def test_every_argument_has_help():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():  # type: ignore[attr-defined]
        for action in p._actions:
            if action.dest not in ("help", "argv"):
                assert action.help, f"{name} {action.dest} has no help"


def test_help_texts():
    assert "(default: default)" in help_of("connect")
    assert f"at most {MAX_VNET_CONTEXT} bytes of JSON with offload, {MAX_CONTEXT} with " \
           f"--no-offload" in help_of("connect")
    assert "HOST:PORT" in help_of("status")


@pytest.mark.parametrize("target, expected", [
    ("127.0.0.1:9181", ("127.0.0.1", 9181)),
    ("localhost:9180", ("localhost", 9180)),
    ("[::1]:9180", ("::1", 9180)),
    ("http://127.0.0.1:9181", ("127.0.0.1", 9181)),
    ("http://[::1]:9181/", ("::1", 9181)),
    ("/run/ipferry/admin.sock", "/run/ipferry/admin.sock"),
    ("./admin.sock", "./admin.sock"),
])
def test_admin_target(target, expected):
    assert admin_target(target) == expected


def test_admin_target_existing_file_is_a_socket_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "admin:1").touch()
    assert admin_target("admin:1") == "admin:1"


@pytest.mark.parametrize("target", ["admin.sock", "::1:9180", "host:port", "host:0", "http://"])
def test_admin_target_refused(target):
    with pytest.raises(AdminClientError) as exc:
        admin_target(target)
    assert str(exc.value).startswith(f"--admin {target!r}: ")
    assert "127.0.0.1:9180" in str(exc.value)


def test_status_without_pid_and_plural():
    body = {"ready": False, "status": "degraded", "pid": 10, "config": None,
            "nsd": {"pid": 11, "state": "ready", "restarts": 0},
            "workers": [{"index": 0, "pid": None, "state": "backoff", "restarts": 2, "tun": "t0"},
                        {"index": 1, "pid": 12, "state": "ready", "restarts": 0, "tun": "t1"}],
            "onramps": []}
    out = cli.format_status(body)
    assert "worker 0: no process, backoff, restarts 2, tun t0" in out
    assert "worker 1: pid 12, ready" in out
    assert "None" not in out


def check_config(tmp_path, capsys, text: str) -> tuple[int, str, str]:
    path = tmp_path / "c.toml"
    path.write_text(text)
    code = cli.main(["check-config", str(path)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_config_one_worker(tmp_path, capsys):
    code, out, _ = check_config(tmp_path, capsys, "workers = 1\n")
    assert code == 0 and "ok (1 worker, on-ramps" in out


def test_check_config_refuses_what_run_refuses(tmp_path, capsys):
    code, _, err = check_config(tmp_path, capsys,
                                'workers = 1\n[app]\nclass = "no_such_module_here:App"\n')
    assert code == 2 and "app.class = 'no_such_module_here:App': cannot import" in err
    sink = tmp_path / "missing" / "audit.jsonl"
    code, _, err = check_config(tmp_path, capsys, f'workers = 1\n[audit]\nsink = "{sink}"\n')
    assert code == 2 and f"audit.sink = '{sink}': its directory" in err and "does not exist" in err
    sink = tmp_path / "audit.jsonl"
    code, _, err = check_config(tmp_path, capsys, f'workers = 1\n[audit]\nsink = "{sink}"\n')
    assert code == 0, err
    assert not sink.exists(), "check-config creates nothing"
    code, _, err = check_config(tmp_path, capsys, f'workers = 1\n[audit]\nsink = "{tmp_path}"\n')
    assert code == 2 and "cannot open for append" in err
