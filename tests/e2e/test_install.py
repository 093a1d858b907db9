"""deploy/install.sh into a temporary root (DESTDIR): the files, systemd-analyze verify on the
installed units, the installed daemon carrying traffic with no capabilities, and the installed
daemon started as ipferry.service starts it: as an unprivileged user, with the unit's file system
restrictions approximated in a private mount namespace (PID 1 need not be systemd)."""

from __future__ import annotations

import grp
import json
import os
import pwd
import random
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.dataplane import SERVER_ADDR, config
from tests.helpers import NO_CAPS, Daemon, wait_for

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
    root.chmod(0o755)  # like /: the service user must reach the installed tree
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


def unit_settings(unit: Path) -> dict[str, list[str]]:
    """The [Service] section of a unit file: every setting's values, in order."""
    out: dict[str, list[str]] = {}
    section = None
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def unused_id() -> int:
    """A uid, also free as a gid, that nothing on this host has: no user, no group, no
    subordinate id range, no process. Far above every allocation convention (system, regular,
    systemd's dynamic and container ranges end well below 2**31)."""
    ranges = []
    for path in ("/etc/subuid", "/etc/subgid"):
        if os.path.exists(path):
            for line in Path(path).read_text().splitlines():
                parts = line.split(":")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    ranges.append((int(parts[1]), int(parts[1]) + int(parts[2])))
    in_use = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(("Uid:", "Gid:")):
                    in_use.update(map(int, line.split()[1:]))
        except OSError:
            pass
    for _ in range(100):
        n = random.randrange(2_000_000_000, 2_100_000_000)
        if n in in_use or any(lo <= n < hi for lo, hi in ranges):
            continue
        try:
            pwd.getpwuid(n)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(n)
            continue
        except KeyError:
            return n
    raise AssertionError("found no unused uid")


def processes_of(uid: int) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        if uid in map(int, uids):
            pids.append(int(pid))
    return pids


@pytest.fixture
def service_user():
    """A throw-away uid and gid for the unit's User= and Group=, used through setpriv: no
    passwd or group entry is made, so nothing is left in /etc even if the test is killed. At
    teardown every process of that uid is killed (none may be left)."""
    uid = unused_id()
    try:
        yield uid
    finally:
        deadline = time.monotonic() + 10
        while (pids := processes_of(uid)) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        assert not processes_of(uid), [proc_status(pid) for pid in processes_of(uid)]


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


# ipferry.service's sandbox, approximated without systemd, as root in a private mount namespace
# (unshare --mount --propagation private: nothing here is seen outside, and every mount goes
# when its last process exits). Arguments: the DESTDIR, uid, gid, a scratch directory of the
# test's, the unit's ExecStartPre= command; then "ro"|"rw" PATH SOURCE triples: PATH shows
# SOURCE (made with a tmpfs copy of the parent directory where PATH does not exist, so the host
# is never written to), "rw" ones stay writable (RuntimeDirectory=, LogsDirectory=,
# StateDirectory=); then "--" and the command (ExecStart=), exec'd as uid:gid with no
# capabilities, no supplementary groups and no_new_privs (User=, Group=,
# CapabilityBoundingSet=, AmbientCapabilities=, NoNewPrivileges=). Also:
#   /dev/net/tun  a node of its own (c 10 200, root 0600: what a host without udev has), so that
#                 the unit's ExecStartPre= (run here as root, as '+' runs it) changes that one
#   ProtectHome=  /home, /root, /run/user: empty, mode 000
#   PrivateTmp=   /tmp and /var/tmp: empty tmpfs, but for the DESTDIR's path (the venv's
#                 scripts have it in their shebangs)
#   ProtectSystem=strict  every mount read-only but /proc, /sys, /dev, the private /tmp and
#                 /var/tmp and the "rw" paths
#   ProtectControlGroups=  /sys/fs/cgroup read-only
#   WorkingDirectory=, UMask=  unset in the unit: / and 0022
SANDBOX = r"""
set -eu
root=$1 uid=$2 gid=$3 scratch=$4 pre=$5
shift 5
umask 022
n=0
writable="|"
fresh() {
    n=$((n + 1))
    new=$scratch/mount$n
    mkdir "$new"
}
graft() {
    dir=${1%/*} name=${1##*/} src=$2
    if [ -d "$1" ] && [ ! -L "$1" ]; then
        mount --bind "$src" "$1"
        return
    fi
    fresh
    mount -t tmpfs -o "$(stat -c mode=%a,uid=%u,gid=%g "$dir"),size=1m" ipferry-test "$new"
    for entry in "$dir"/* "$dir"/.[!.]* "$dir"/..?*; do
        [ -e "$entry" ] || [ -L "$entry" ] || continue
        base=${entry##*/}
        if [ -L "$entry" ]; then cp -P "$entry" "$new/$base"
        elif [ -d "$entry" ]; then mkdir "$new/$base"; mount --rbind "$entry" "$new/$base"
        else : > "$new/$base"; mount --bind "$entry" "$new/$base"
        fi
    done
    if [ -L "$src" ]; then ln -sfn "$(readlink "$src")" "$new/$name"
    else mkdir -p "$new/$name"; mount --bind "$src" "$new/$name"
    fi
    mount --move "$new" "$dir"
}
privtmp() {
    fresh
    mount -t tmpfs -o mode=1777,size=16m ipferry-test-tmp "$new"
    case "$root" in "$1"/*)
        mkdir -p "$new/${root#"$1"/}"
        mount --bind "$root" "$new/${root#"$1"/}" ;;
    esac
    mount --move "$new" "$1"
}
while [ "$1" != -- ]; do
    graft "$2" "$3"
    if [ "$1" = rw ]; then writable="$writable$2|"; fi
    shift 3
done
shift
fresh
mount -t tmpfs -o mode=0755,size=64k ipferry-test-dev "$new"
mknod -m 0600 "$new/tun" c 10 200
mount --bind "$new/tun" /dev/net/tun
for d in /home /root /run/user; do
    if [ -d "$d" ]; then mount -t tmpfs -o mode=000,size=4k ipferry-test-inaccessible "$d"; fi
done
privtmp /var/tmp
privtmp /tmp
sh -c "$pre"
awk '{print $5, $6}' /proc/self/mountinfo | while read -r mp opts; do
    case "$mp" in *\\*) echo "sandbox: cannot handle the mount point $mp" >&2; exit 1 ;; esac
    case "$opts" in ro|ro,*) continue ;; esac
    [ -e "$mp" ] || continue  # hidden by a mount made above
    case "$mp" in
        /sys/fs/cgroup|/sys/fs/cgroup/*) ;;
        /proc|/proc/*|/sys|/sys/*|/dev|/dev/*|/tmp|/var/tmp) continue ;;
    esac
    case "$writable" in *"|$mp|"*) continue ;; esac
    mount -o remount,bind,ro "$mp"
done
cd /
exec setpriv --reuid="$uid" --regid="$gid" --clear-groups --bounding-set=-all --inh-caps=-all \
     --ambient-caps=-all --no-new-privs -- "$@"
"""

# Run as root in the daemon's mount namespace: what each path allows, what /dev/net/tun's ACL is.
PROBE = r"""
for p in "$@"; do
    if err=$(touch "$p/.ipferry-probe" 2>&1); then rm -f "$p/.ipferry-probe"; echo "$p: writable"
    else echo "$p: ${err##*: }"; fi
done
for p in /home /root /run/user; do echo "$p: mode $(stat -c %a "$p"), $(ls -A "$p" | wc -l) entries"; done
echo "/tmp: $(ls -A /tmp)"
getfacl -cn /dev/net/tun
"""

UNIT_SETTINGS = {  # what the sandbox above approximates: a change here needs a change there
    "User": ["ipferry"], "Group": ["ipferry"], "RuntimeDirectory": ["ipferry"],
    "RuntimeDirectoryMode": ["0755"], "LogsDirectory": ["ipferry"], "StateDirectory": ["ipferry"],
    "CapabilityBoundingSet": [""], "AmbientCapabilities": [""], "NoNewPrivileges": ["yes"],
    "ProtectSystem": ["strict"], "ProtectHome": ["yes"], "PrivateTmp": ["yes"],
    "ProtectControlGroups": ["yes"]}


def service_env() -> dict[str, str]:
    """The environment systemd gives ipferry.service (less NOTIFY_SOCKET and the watchdog's)."""
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "USER": "ipferry", "LOGNAME": "ipferry", "HOME": "/nonexistent",
            "SHELL": "/usr/sbin/nologin", "RUNTIME_DIRECTORY": "/run/ipferry",
            "STATE_DIRECTORY": "/var/lib/ipferry", "LOGS_DIRECTORY": "/var/log/ipferry"}


def the_units_tun_step(unit: dict[str, list[str]], uid: int, gid: int) -> str:
    """ExecStartPre= (the /dev/net/tun ACL step) for the throw-away uid and gid instead of the
    unit's user and group names."""
    [pre] = unit["ExecStartPre"]
    assert pre.startswith("+/bin/sh -c "), pre  # '+': as root, outside the sandbox
    pre = pre[1:]
    for name, number in ((f"--reuid={unit['User'][0]} ", f"--reuid={uid} "),
                         (f"--regid={unit['Group'][0]} ", f"--regid={gid} "),
                         (f" u:{unit['User'][0]}:rw ", f" u:{uid}:rw ")):
        assert pre.count(name) == 1, (name, pre)
        pre = pre.replace(name, number)
    assert "ipferry" not in pre, pre
    return pre


def host_tun() -> tuple:
    st = os.stat("/dev/net/tun")
    return st.st_mode, st.st_ino, st.st_rdev, st.st_uid, st.st_gid, os.listxattr("/dev/net/tun")


@pytest.mark.timeout(60)
def test_the_units_tun_step_grants_the_service_user_alone(root, service_user, tmp_path):
    # On nodes of its own (the host's /dev/net/tun is never touched): a 0600 node gets an ACL
    # entry for the service user and nothing else; a 0666 one is left alone; a missing one too
    # (the daemon then names the fix).
    assert shutil.which("setfacl"), "setfacl is missing: deploy/install.sh installs Debian's acl"
    unit = unit_settings(root / "etc/systemd/system/ipferry.service")
    pre = the_units_tun_step(unit, service_user, service_user)
    scratch = tmp_path / "dev"
    scratch.mkdir()
    script = r"""
        set -eu
        pre=$1 scratch=$2
        mount -t tmpfs -o mode=0755,size=64k ipferry-test-dev "$scratch"
        for mode in 0600 0666; do
            mknod -m $mode "$scratch/tun$mode" c 10 200
            mount --bind "$scratch/tun$mode" /dev/net/tun
            sh -c "$pre"
            echo "$mode:"
            getfacl -cn /dev/net/tun
            umount /dev/net/tun
        done
        mount -t tmpfs -o mode=0755,size=4k ipferry-test-dev /dev/net
        sh -c "$pre"
        echo "missing: $(ls -A /dev/net)."
    """
    before = host_tun()
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                          "sh", pre, str(scratch)], capture_output=True, text=True, timeout=30,
                         env=service_env(), stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.split() == [
        "0600:", "user::rw-", f"user:{service_user}:rw-", "group::---", "mask::rw-", "other::---",
        "0666:", "user::rw-", "group::rw-", "other::rw-",
        "missing:", "."], res.stdout
    assert host_tun() == before


class UnitDaemon(Daemon):
    """The installed daemon in the sandbox above (the command is the whole chain)."""

    def __init__(self, argv: list[str], *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.argv = argv
        self.env = service_env()

    def command(self, *args: str, sh_prefix: str | None = None) -> list[str]:
        return self.argv


@pytest.mark.timeout(120)
def test_the_installed_daemon_runs_as_the_units_user_under_its_restrictions(
        root, netns, tmp_path, upstream, service_user):
    assert str(tmp_path).startswith("/tmp/") and str(root).startswith("/tmp/"), (
        "the sandbox is staged below /tmp (PrivateTmp= hides the rest of it): run pytest "
        "without a --basetemp elsewhere")
    unit = unit_settings(root / "etc/systemd/system/ipferry.service")
    assert {k: unit.get(k) for k in UNIT_SETTINGS} == UNIT_SETTINGS
    [execstart] = unit["ExecStart"]
    argv = shlex.split(execstart)
    assert argv[:2] == ["/usr/local/bin/ipferry", "run"], argv
    uid = gid = service_user
    pre = the_units_tun_step(unit, uid, gid)

    # The unit's directories as systemd makes them: owned by the service user, 0755.
    paths = {name: tmp_path / name for name in ("etc", "run", "log", "lib")}
    for name, path in paths.items():
        path.mkdir()
        path.chmod(0o755)
        if name != "etc":
            os.chown(path, uid, gid)
    # The installed example config with the audit file in LogsDirectory= (its own alternative
    # to stdout) and one worker.
    example = (root / "etc/ipferry/ipferry.toml").read_text()
    assert '\nsink = "stdout"\n#sink = "/var/log/ipferry/audit.jsonl"\n' in example
    (paths["etc"] / "ipferry.toml").write_text("workers = 1\n" + example.replace(
        '\nsink = "stdout"\n', '\nsink = "/var/log/ipferry/audit.jsonl"\n'))
    (upstream / "hello.txt").write_text("hello from upstream\n")
    grafts = ["ro", "/opt/ipferry", str(root / "opt/ipferry"),
              "ro", "/usr/local/bin/ipferry", str(root / "usr/local/bin/ipferry"),
              "ro", "/etc/ipferry", str(paths["etc"]),
              "rw", "/run/ipferry", str(paths["run"]),
              "rw", "/var/log/ipferry", str(paths["log"]),
              "rw", "/var/lib/ipferry", str(paths["lib"])]

    def sandbox(step: str, scratch: Path) -> list[str]:
        scratch.mkdir()
        return ["nsenter", f"--net={netns.path}", "unshare", "--mount", "--propagation",
                "private", "sh", "-c", SANDBOX, "sandbox", str(root), str(uid), str(gid),
                str(scratch), step, *grafts, "--", *argv]

    before_tun = host_tun()
    # Without the unit's ExecStartPre= the service user cannot open a 0600 /dev/net/tun.
    res = subprocess.run(sandbox(":", tmp_path / "scratch-without-step"), capture_output=True,
                         text=True, timeout=60, env=service_env(), stdin=subprocess.DEVNULL)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        "ipferry: cannot start: cannot open /dev/net/tun: permission denied (mode 0o600); "
        "fix: chmod 0666 /dev/net/tun, the distribution default"), res.stderr[-2000:]

    d = UnitDaemon(sandbox(pre, tmp_path / "scratch"), netns, paths["run"], tmp_path,
                   config=None, no_caps=True, env=None)
    try:
        d.start()
        d.wait_ready()

        # Every process: the service user, no_new_privs, in the sandbox's mount namespace; the
        # supervisor and the workers without any capability (nsd has those of its own user
        # namespace only).
        mine = os.readlink("/proc/self/ns/mnt")
        sandbox_ns = os.readlink(f"/proc/{d.pid}/ns/mnt")
        assert sandbox_ns != mine
        assert os.stat(f"/proc/{d.pid}/ns/net").st_ino == os.stat(netns.path).st_ino
        nsd = d.nsd_pid()
        pids = [d.pid, *d.children()]
        assert nsd in pids and len(pids) == 3, pids
        for pid in pids:
            status = proc_status(pid)
            assert status["Uid"].split() == [str(uid)] * 4, status
            assert status["Gid"].split() == [str(gid)] * 4, status
            assert status["Groups"] == "" and status["NoNewPrivs"] == "1", status
            assert os.readlink(f"/proc/{pid}/ns/mnt") == sandbox_ns
            if pid != nsd:
                for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                    assert int(status[cap], 16) == 0, (pid, status)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            assert str(root).encode() in cmdline or cmdline.startswith(b"ipferry:"), cmdline
        assert {p.name: p.stat().st_uid for p in paths["run"].iterdir()} == {
            "tunnel.sock": uid, "admin.sock": uid}

        # The restrictions are in place where the daemon runs.
        enter = ["nsenter", f"--target={d.pid}", "--mount", "--net", "--"]
        writable = ["/tmp", "/var/tmp", "/run/ipferry", "/var/log/ipferry", "/var/lib/ipferry"]
        read_only = ["/", "/etc", "/etc/ipferry", "/usr", "/usr/local/bin", "/opt/ipferry",
                     "/var", "/var/lib", "/var/log", "/run", "/sys/fs/cgroup", str(root)]
        res = subprocess.run([*enter, "sh", "-c", PROBE, "probe", *writable, *read_only],
                             capture_output=True, text=True, timeout=30, cwd="/")
        assert res.returncode == 0, res.stderr
        lines = res.stdout.strip().splitlines()
        assert lines[:len(writable) + len(read_only)] == (
            [f"{p}: writable" for p in writable]
            + [f"{p}: Read-only file system" for p in read_only]), res.stdout
        assert lines[len(writable) + len(read_only):] == [
            "/home: mode 0, 0 entries", "/root: mode 0, 0 entries", "/run/user: mode 0, 0 entries",
            f"/tmp: {root.parts[2]}",
            "user::rw-", f"user:{uid}:rw-", "group::---", "mask::rw-", "other::---"], res.stdout

        # Traffic: curl inside `ipferry connect`, run by the service user in the same sandbox,
        # to the server in the test's network namespace.
        res = subprocess.run([*enter, "setpriv", f"--reuid={uid}", f"--regid={gid}",
                              "--clear-groups", *NO_CAPS[1:], "/usr/local/bin/ipferry",
                              "connect", "--tunnel", "/run/ipferry/tunnel.sock", "--tenant",
                              "acme", "--", "curl", "-sS", "--max-time", "10",
                              f"http://{SERVER_ADDR}:8080/hello.txt"],
                             capture_output=True, timeout=60, stdin=subprocess.DEVNULL, cwd="/",
                             env=service_env())
        assert res.returncode == 0, res.stderr.decode()[-2000:]
        assert res.stdout == b"hello from upstream\n"

        # The audit file, in LogsDirectory=, written by the service user.
        audit = paths["log"] / "audit.jsonl"

        def flow_end():
            records = [json.loads(line) for line in audit.read_text().splitlines()]
            return [r for r in records if r["audit"] == "flow_end" and r["dst"] == SERVER_ADDR
                    and r["dport"] == 8080 and r["tenant"] == "acme"]

        wait_for(flow_end, 10, f"the flow_end record in {audit}")
        assert audit.stat().st_uid == uid
        assert d.terminate() == 0
        assert list(paths["run"].iterdir()) == []  # its sockets removed on the way out
    finally:
        d.destroy()
        for name in ("run", "log", "lib"):
            shutil.rmtree(paths[name], ignore_errors=True)
    wait_for(lambda: not processes_of(uid), 10, "the service user's processes to end")
    # Nothing changed outside: the host's /dev/net/tun is as it was, none of the mounts is seen.
    assert host_tun() == before_tun
    assert "ipferry-test" not in Path("/proc/self/mountinfo").read_text()


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
