"""Refusals at start-up: one clear line naming the cause and the fix, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import textwrap

from tests.helpers import IPFERRY, NO_CAPS


def run_briefly(cmd: list[str], env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_bad_config_names_the_key_and_line(tmp_path, netns, runtime_dir):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(textwrap.dedent("""\
        workers = 2

        [admin]
        listen = "0.0.0.0:9180"

        [namespace]
        mtu = 99999
        """))
    env = {"RUNTIME_DIRECTORY": str(runtime_dir), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    res = run_briefly(["nsenter", f"--net={netns.path}", IPFERRY, "run", "--config", str(cfg)], env)
    assert res.returncode == 2, res
    assert f"{cfg}:4: admin.listen = '0.0.0.0:9180': admin must listen on loopback" in res.stderr
    assert f"{cfg}:7: namespace.mtu = 99999: Input should be less than or equal to 65520" \
        in res.stderr
    assert "Traceback" not in res.stderr
    assert list(runtime_dir.iterdir()) == [], "nothing was bound"

    check = run_briefly([IPFERRY, "check-config", str(cfg)], env)
    assert check.returncode == 2
    assert check.stderr.strip() == res.stderr.strip().split("\n", 1)[1]

    cfg.write_text("workers = 2\n")
    ok = run_briefly([IPFERRY, "check-config", str(cfg)], env)
    assert ok.returncode == 0 and "ok (2 workers" in ok.stdout, ok


def test_unknown_key_and_bad_toml(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[[onramps]]\nname = \"tunnel\"\nsocket = \"/tmp/x\"\n")
    res = run_briefly([IPFERRY, "check-config", str(cfg)], {})
    assert res.returncode == 2
    assert res.stderr.strip() == f"{cfg}:3: onramps[0].socket = '/tmp/x': unknown key"
    cfg.write_text("workers = 2\nlog = = 3\n")
    res = run_briefly([IPFERRY, "check-config", str(cfg)], {})
    assert res.returncode == 2
    assert res.stderr.startswith(f"{cfg}:2: not valid TOML: "), res.stderr


def test_unreadable_tun_device_is_one_clear_line(netns, runtime_dir, tmp_path):
    # A private mount namespace where /dev/net/tun is a file nobody here may open: what an
    # unprivileged daemon meets on a host whose /dev/net/tun is not 0666.
    fake = tmp_path / "tun"
    fake.write_text("")
    script = (f"chown 65534:65534 {fake} && chmod 600 {fake} && "
              f"mount --bind {fake} /dev/net/tun && exec nsenter --net={netns.path} "
              + " ".join(NO_CAPS) + f" {IPFERRY} run --workers 1")
    env = {"RUNTIME_DIRECTORY": str(runtime_dir), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    res = run_briefly(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env)
    assert res.returncode == 1, res
    assert last_line(res.stderr) == (
        "ipferry: cannot start: cannot open /dev/net/tun: permission denied (mode 0o600); "
        "fix: chmod 0666 /dev/net/tun, the distribution default")
    assert "Traceback" not in res.stderr
    assert list(runtime_dir.iterdir()) == []


def test_user_namespaces_disabled_is_one_clear_line(netns, runtime_dir):
    # Inside a user namespace of our own, user.max_user_namespaces = 0 forbids nested ones:
    # the daemon meets exactly what a host with user namespaces disabled gives it.
    script = ("echo 0 > /proc/sys/user/max_user_namespaces && "
              f"exec {IPFERRY} run --workers 1 --admin-listen ''")
    env = {"RUNTIME_DIRECTORY": str(runtime_dir), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    res = run_briefly(["nsenter", f"--net={netns.path}", "unshare", "--user", "--map-root-user",
                       "sh", "-c", script], env)
    assert res.returncode == 1, res
    assert last_line(res.stderr) == (
        "ipferry: cannot start: cannot create a user namespace (No space left on device); "
        "fix: sysctl -w user.max_user_namespaces=15000")
    assert "Traceback" not in res.stderr


def test_a_file_that_is_not_a_socket_is_never_replaced(tmp_path, netns, runtime_dir):
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[onramps]]\nname = "tunnel"\npath = "{precious}"\n')
    env = {"RUNTIME_DIRECTORY": str(runtime_dir), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    res = run_briefly(["nsenter", f"--net={netns.path}", IPFERRY, "run", "--config", str(cfg)], env)
    assert res.returncode == 1
    assert last_line(res.stderr) == (f"ipferry: cannot start: {precious}: exists and is not a "
                                     "socket; refusing to replace it (choose another path)")
    assert precious.read_text() == "keep me"


def test_second_daemon_on_same_socket_is_refused(daemon_factory, runtime_dir, netns):
    d = daemon_factory("--workers", "1")
    env = {"RUNTIME_DIRECTORY": str(runtime_dir), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    res = run_briefly(["nsenter", f"--net={netns.path}", IPFERRY, "run", "--workers", "1",
                       "--admin-listen", "127.0.0.1:9181"], env)
    assert res.returncode == 1
    assert last_line(res.stderr) == (
        f"ipferry: cannot start: {runtime_dir}/tunnel.sock: another process is listening there "
        "(is ipferry already running?)")
    assert d.ready(), "the first daemon is untouched"
    # Its socket still accepts tunnels.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(runtime_dir / "tunnel.sock"))
    s.close()
