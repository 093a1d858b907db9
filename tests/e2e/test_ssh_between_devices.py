"""The source's own example, end to end: an SSH session from one device of a tenant to another,
upgraded on port 22 so that the application (examples/ssh_auditor.py) logs it, then downgraded
into the other device's tunnel. ssh and scp work; the auditor records both sides' hellos."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.dataplane import audit_records, config
from tests.e2e.devices import NETWORKS, device, run_in_device
from tests.helpers import wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SSH_PORT_RULE = """
[app]
class = "ssh_auditor:SshAuditor"

[[rules]]
action = "allow"
tenant = "acme"
protocol = "tcp"
ports = "22"
layer = "stream"
"""
UID = 4242  # sshd runs as this user (unprivileged: no privilege separation, no chroot needed)

# In the device's namespace (the command of `ipferry connect`, root of its user namespace): a
# user for sshd in a private mount namespace, port 22 for it, then sshd as that user.
SSHD = f"""
set -e
exec unshare --mount sh -ec '
mount --bind "$1" /etc/passwd
mount --bind "$2" /etc/group
sysctl -qw net.ipv4.ip_unprivileged_port_start=0
exec unshare --user --map-user={UID} --map-group={UID} /usr/sbin/sshd -D -e -f "$3"
' sh "$@"
"""


def setup_sshd(home: Path) -> list[str]:
    """Keys, a config, and the passwd/group with the sshd user; the client's ssh options."""
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                        str(home / name)], check=True, timeout=30)
    (home / "authorized_keys").write_bytes((home / "client_key.pub").read_bytes())
    (home / "sshd_config").write_text(f"""\
ListenAddress 0.0.0.0:22
HostKey {home}/host_key
AuthorizedKeysFile {home}/authorized_keys
PidFile none
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
Subsystem sftp internal-sftp
""")
    (home / "passwd").write_text(Path("/etc/passwd").read_text()
                                 + f"ferry:x:{UID}:{UID}:ipferry test:{home}:/bin/sh\n")
    (home / "group").write_text(Path("/etc/group").read_text() + f"ferry:x:{UID}:\n")
    (home / "sshd.sh").write_text(SSHD)
    return ["-F", "/dev/null", "-i", str(home / "client_key"), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20"]


@pytest.mark.timeout(240)
def test_ssh_and_scp_between_devices_audited(daemon_factory, tmp_path):
    sessions = tmp_path / "ssh-sessions.jsonl"
    d = daemon_factory("--workers", "2", config=config(tmp_path, NETWORKS + SSH_PORT_RULE),
                       env={"PYTHONPATH": str(EXAMPLES),
                            "IPFERRY_SSH_AUDIT_FILE": str(sessions)})
    home = tmp_path / "ferry"
    home.mkdir()
    os.chmod(tmp_path, 0o755)
    options = setup_sshd(home)
    sshd = ("sh", str(home / "sshd.sh"), str(home / "passwd"), str(home / "group"),
            str(home / "sshd_config"))
    # (sshd's namespace needs its capabilities to mount and to set a sysctl: not NO_CAPS)
    with device(d, *sshd, addresses=("10.77.0.22",), no_caps=False) as server:
        def listening() -> bool:
            res = run_in_device(d, "bash", "-c", "exec 3<>/dev/tcp/10.77.0.22/22 && head -c 4 <&3",
                                timeout=30)
            if server.poll() is not None:
                raise AssertionError(f"sshd exited: {server.communicate()}")
            return res.stdout == b"SSH-"
        wait_for(listening, 30, "sshd in the device")
        res = run_in_device(d, "ssh", *options, "ferry@10.77.0.22", "echo", "hello", "from",
                            "the", "other", "device", timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout == b"hello from the other device\n"
        payload = tmp_path / "payload.bin"
        payload.write_bytes(os.urandom(8 << 20))
        res = run_in_device(d, "scp", *options, str(payload), "ferry@10.77.0.22:up.bin",
                            timeout=120)
        assert res.returncode == 0, res.stderr
        res = run_in_device(d, "scp", *options, "ferry@10.77.0.22:up.bin",
                            str(tmp_path / "back.bin"), timeout=120)
        assert res.returncode == 0, res.stderr
    want = hashlib.sha256(payload.read_bytes()).hexdigest()
    assert hashlib.sha256((home / "up.bin").read_bytes()).hexdigest() == want
    assert hashlib.sha256((tmp_path / "back.bin").read_bytes()).hexdigest() == want

    def recorded():
        lines = sessions.read_text().splitlines() if sessions.exists() else []
        records = [json.loads(line) for line in lines]
        return len([r for r in records if r.get("client_ident")]) >= 3 and records
    records = wait_for(recorded, 20, "3 ssh_session records with hellos (probes have none)")
    hellos = [r for r in records if r.get("client_ident")]
    assert len(hellos) == 3, records  # ssh, and the two scp
    for r in hellos:
        assert r["client_ident"].startswith("SSH-2.0-OpenSSH"), r
        assert r["server_ident"].startswith("SSH-2.0-OpenSSH"), r
        assert "curve25519-sha256" in r["client_kexinit"]["kex_algorithms"], r
        assert "curve25519-sha256" in r["server_kexinit"]["kex_algorithms"], r
    assert max(r["bytes_to_server"] for r in hellos) > 8 << 20, hellos
    ends = [r for r in audit_records(tmp_path / "audit.jsonl")
            if r["audit"] == "flow_end" and r["dport"] == 22]
    assert len(ends) >= 4 and {r["server_leg"] for r in ends} == {"tcp:downgraded"}, ends
