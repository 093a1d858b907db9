"""deploy/install.sh into a temporary root (DESTDIR): the files, systemd-analyze verify on the
installed units, and the installed daemon carrying traffic with no capabilities."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.dataplane import SERVER_ADDR, config
from tests.helpers import NO_CAPS, Daemon

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "deploy" / "install.sh"
UNITS = ("ipferry.service", "ipferry.socket")


def install(root: Path, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run(["bash", str(INSTALL), *args], env={
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "DESTDIR": str(root)}, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("destdir")
    install(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def expected(root: Path) -> list[Path]:
    return [root / "usr/local/bin/ipferry", root / "opt/ipferry/bin/ipferry",
            *(root / "etc/systemd/system" / u for u in UNITS), root / "etc/ipferry/ipferry.toml",
            root / "var/log/ipferry", root / "var/lib/ipferry"]


def test_installs_the_files_and_a_second_run_changes_nothing(root):
    for path in expected(root):
        assert path.exists() or path.is_symlink(), path  # the link is dangling outside the root
    link = root / "usr/local/bin/ipferry"
    assert link.is_symlink() and str(link.readlink()) == "/opt/ipferry/bin/ipferry"
    for u in UNITS:
        assert (root / "etc/systemd/system" / u).read_bytes() == (REPO / "deploy" / u).read_bytes()
    # Not editable: the venv's package does not point into the checkout.
    res = subprocess.run([root / "opt/ipferry/bin/python", "-c",
                          "import ipferry.supervisor as m; print(m.__file__)"],
                         capture_output=True, text=True, check=True, timeout=30)
    assert res.stdout.startswith(str(root / "opt/ipferry/lib")), res.stdout
    before = {p: p.lstat().st_mtime_ns for p in root.rglob("*")}
    again = install(root)
    assert "nothing to do" in again.stdout, again.stdout
    assert {p: p.lstat().st_mtime_ns for p in root.rglob("*")} == before
    assert "systemctl" not in again.stdout.replace("systemctl not called", "")


def test_an_existing_config_is_never_overwritten(tmp_path, root):
    conf = root / "etc/ipferry/ipferry.toml"
    original = conf.read_text()
    try:
        conf.write_text("# mine\n")
        assert "nothing to do" in install(root).stdout
        assert conf.read_text() == "# mine\n"
    finally:
        conf.write_text(original)


def verify(root: Path, *units: Path) -> subprocess.CompletedProcess:
    """systemd-analyze verify with the installed /opt and /usr/local/bin mounted over the host's
    (in a private mount namespace), so that ExecStart=/usr/local/bin/ipferry resolves through
    the installed link to the installed venv and nothing else."""
    script = ('set -e; mount --make-rprivate /; mount --bind "$1/opt" /opt; '
              'mount --bind "$1/usr/local/bin" /usr/local/bin; shift; '
              'exec systemd-analyze verify "$@"')
    return subprocess.run(["unshare", "--mount", "bash", "-c", script, "verify", str(root),
                           *map(str, units)], capture_output=True, text=True, timeout=60)


def test_systemd_analyze_verify_passes_on_the_installed_units(root, tmp_path):
    assert shutil.which("systemd-analyze"), (
        "systemd-analyze is missing: deploy/setup.sh installs Debian's systemd package for it")
    installed = [root / "etc/systemd/system" / u for u in UNITS]
    res = verify(root, *installed)
    # Parse errors are only warnings (exit 0): any output is a failure.
    assert res.returncode == 0 and res.stderr == "" and res.stdout == "", res.stderr + res.stdout

    # The check is real: a typo and a missing ExecStart target both fail it.
    unit = installed[0].read_text()
    typo = tmp_path / "typo" / "ipferry.service"
    typo.parent.mkdir()
    typo.write_text(unit.replace("\nType=notify\n", "\nType=notifyy\n"))
    res = verify(root, typo)
    assert "Failed to parse service type" in res.stderr, res.stderr
    missing = tmp_path / "missing" / "ipferry.service"
    missing.parent.mkdir()
    missing.write_text(unit.replace("ExecStart=/usr/local/bin/", "ExecStart=/usr/local/sbin/"))
    res = verify(root, missing)
    assert res.returncode != 0 and "is not executable" in res.stderr, res.stderr


class InstalledDaemon(Daemon):
    """The daemon from the installed venv, not the checkout's."""

    def __init__(self, exe: Path, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.exe = str(exe)

    def command(self, *args: str, sh_prefix: str | None = None) -> list[str]:
        cmd = super().command(*args, sh_prefix=sh_prefix)
        i = cmd.index("run")
        return [*cmd[:i - 1], self.exe, *cmd[i:]]


@pytest.mark.timeout(90)
def test_the_installed_daemon_carries_traffic_without_capabilities(root, netns, runtime_dir,
                                                                    tmp_path, upstream):
    (upstream / "hello.txt").write_text("hello from upstream\n")
    exe = root / "opt/ipferry/bin/ipferry"
    d = InstalledDaemon(exe, netns, runtime_dir, tmp_path, config=config(tmp_path),
                        no_caps=True, env=None)
    try:
        d.start("--workers", "1")
        d.wait_ready()
        res = subprocess.run([*NO_CAPS, str(exe), "connect", "--tunnel",
                              str(runtime_dir / "tunnel.sock"), "--tenant", "acme", "--",
                              "curl", "-sS", "--max-time", "10",
                              f"http://{SERVER_ADDR}:8080/hello.txt"],
                             capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, res.stderr.decode()[-2000:]
        assert res.stdout == b"hello from upstream\n"
        # Every process of the tree runs the installed code.
        for pid in [d.pid, *d.children()]:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            assert str(root).encode() in cmdline or cmdline.startswith(b"ipferry:"), cmdline
        assert d.terminate() == 0
    finally:
        d.destroy()


def test_uninstall_removes_what_it_installed_and_purge_the_rest(root):
    res = install(root, "--uninstall")
    assert "kept" in res.stdout
    for path in expected(root)[:4]:
        assert not path.exists() and not path.is_symlink(), path
    for path in expected(root)[4:]:  # the config, logs and state
        assert path.exists(), path
    assert "nothing to remove" in install(root, "--uninstall").stdout
    install(root, "--uninstall", "--purge")
    assert not any(p for p in root.rglob("*") if not p.is_dir()), list(root.rglob("*"))
