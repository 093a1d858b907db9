"""examples/ssh_auditor.py: its parser on any chunking, its records, and a real OpenSSH session
(sshd and ssh, scp both ways) through the inspector relay, in a namespace of the test's own."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from ssh_auditor import NAME_LISTS, SshAuditor, SshHelloParser, SshSessionInspector, parse_kexinit

from ipferry.engine.decisions import FlowStart, StreamStart, TunnelContext
from ipferry.worker.app import Rule, load_application
from ipferry.worker.inspect import StreamEnd, StreamStats
from tests.examples.conftest import EXAMPLES
from tests.examples.userns import USER, UserNetNs, read_line
from tests.helpers import IPFERRY, wait_for

HARNESS = Path(__file__).with_name("relay_harness.py")

# -- the parser ----------------------------------------------------------------------------------

ALGORITHM = st.text("abcdefghijklmnopqrstuvwxyz0123456789-@.", min_size=1, max_size=30)
NAME_LIST = st.lists(ALGORITHM, max_size=12)


def kexinit_packet(lists: dict[str, list[str]], cookie: bytes = bytes(16)) -> bytes:
    """An SSH_MSG_KEXINIT in the binary packet protocol, unencrypted (RFC 4253 6 and 7.1)."""
    payload = bytes([20]) + cookie
    for name in NAME_LISTS:
        raw = ",".join(lists.get(name, [])).encode()
        payload += len(raw).to_bytes(4, "big") + raw
    payload += b"\x00" + bytes(4)  # first_kex_packet_follows, reserved
    padding = 4 + (-(5 + len(payload)) % 8)
    return (1 + len(payload) + padding).to_bytes(4, "big") + bytes([padding]) + payload \
        + bytes(padding)


def feed_in_pieces(parser: SshHelloParser, data: bytes, cuts: list[int]) -> None:
    bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        if b > a:
            parser.feed(data[a:b])


OPENSSH = {"kex_algorithms": ["sntrup761x25519-sha512@openssh.com", "curve25519-sha256",
                              "ext-info-c"],
           "server_host_key_algorithms": ["ssh-ed25519", "rsa-sha2-512"],
           "encryption_client_to_server": ["chacha20-poly1305@openssh.com", "aes128-ctr"],
           "encryption_server_to_client": ["chacha20-poly1305@openssh.com", "aes128-ctr"],
           "mac_client_to_server": ["hmac-sha2-256"], "mac_server_to_client": ["hmac-sha2-256"],
           "compression_client_to_server": ["none"], "compression_server_to_client": ["none"],
           "languages_client_to_server": [], "languages_server_to_client": []}


@settings(max_examples=300, deadline=None)
@given(ident=st.from_regex(r"SSH-2\.0-[!-~]{1,40}( [ -~]{0,60})?", fullmatch=True),
       lists=st.fixed_dictionaries({name: NAME_LIST for name in NAME_LISTS}),
       prelude=st.lists(st.from_regex(r"[A-Za-z0-9 .,]{0,60}", fullmatch=True)
                        .filter(lambda s: not s.startswith("SSH-")), max_size=3),
       crlf=st.booleans(), rest=st.binary(max_size=300),
       cuts=st.lists(st.integers(0, 10_000), max_size=40))
def test_any_chunking_gives_the_same_hello(ident, lists, prelude, crlf, rest, cuts):
    end = "\r\n" if crlf else "\n"
    data = "".join(line + end for line in [*prelude, ident]).encode() + kexinit_packet(lists) + rest
    whole, pieces = SshHelloParser(), SshHelloParser()
    whole.feed(data)
    feed_in_pieces(pieces, data, cuts)
    for p in (whole, pieces):
        assert (p.ident, p.kexinit, p.error, p.done) == (ident, lists, None, True)
        assert not p._buf  # nothing kept once done
    one_byte = SshHelloParser()
    for i in range(min(len(data), 2000)):
        one_byte.feed(data[i:i + 1])
    assert one_byte.ident == ident and (one_byte.kexinit == lists or len(data) > 2000)


@pytest.mark.parametrize("data, error", [
    (b"GET / HTTP/1.1\r\n" + b"Header: x\r\n" * 1000, "no identification string"),
    (b"\x16\x03\x01" + bytes(400), "no line end within 255 bytes"),
    (b"SSH-2.0-x\r\n" + (1 << 20).to_bytes(4, "big") + bytes(8),
     "a first packet of 1048576 bytes"),
    (b"SSH-2.0-x\r\n" + (12).to_bytes(4, "big") + bytes([4, 21]) + bytes(10),
     "the first packet is message 21, not KEXINIT (20)"),
    (b"SSH-2.0-x\r\n" + (12).to_bytes(4, "big") + bytes([4, 20]) + bytes(10),
     "a KEXINIT of 7 bytes, shorter than its cookie"),
    (b"SSH-2.0-x\r\n" + (24).to_bytes(4, "big") + bytes([4, 20]) + bytes(22),
     "KEXINIT truncated before kex_algorithms"),
    (b"SSH-2.0-x\r\n" + (12).to_bytes(4, "big") + bytes([12]) + bytes(11), "padding of 12"),
])
def test_what_is_not_ssh_stops_the_parser_with_a_reason(data, error):
    p = SshHelloParser()
    p.feed(data[:7])
    p.feed(data[7:])
    assert p.done and p.error is not None and error in p.error and p.kexinit is None
    p.feed(b"more")  # ignored, nothing kept
    assert not p._buf


def test_the_parser_keeps_no_more_than_a_packet():
    p = SshHelloParser()
    p.feed(b"SSH-2.0-x\r\n" + (35000).to_bytes(4, "big"))
    for _ in range(40):
        p.feed(bytes(1000))
    assert p.done and p.error and "message 0" in p.error and not p._buf


def test_a_kexinit_is_parsed_by_name():
    lists = parse_kexinit(kexinit_packet(OPENSSH)[5:-8])
    assert lists["kex_algorithms"][1] == "curve25519-sha256"
    assert lists["languages_client_to_server"] == []


# -- the application and its record ----------------------------------------------------------------

def stream(dport: int = 22, upstream=("198.18.0.1", 22)) -> StreamStart:
    return StreamStart(FlowStart("acme", "tcp", "10.0.0.2", 40000, "198.18.0.1", dport,
                                 TunnelContext("acme")), upstream)


def test_ssh_ports_are_inspected_others_spliced(monkeypatch):
    monkeypatch.delenv("IPFERRY_SSH_AUDIT_PORTS", raising=False)
    app = SshAuditor()
    assert isinstance(app.on_stream_start(stream(22)), SshSessionInspector)
    assert app.on_stream_start(stream(443, ("198.18.0.1", 443))) is None
    assert isinstance(app.on_stream_start(stream(2022, ("10.0.0.9", 22))), SshSessionInspector)
    monkeypatch.setenv("IPFERRY_SSH_AUDIT_PORTS", "2222, 22022")
    app = SshAuditor()
    assert app.ports == {2222, 22022} and app.on_stream_start(stream(22)) is None
    monkeypatch.setenv("IPFERRY_SSH_AUDIT_PORTS", "ssh")
    with pytest.raises(ValueError):
        SshAuditor()


def test_rules_still_decide_flows():
    app = load_application("ssh_auditor:SshAuditor",
                           rules=[Rule("deny", name="no-telnet", ports=(23, 23))],
                           default_action="allow")
    assert isinstance(app, SshAuditor)
    flow = stream(23).flow
    assert app.on_flow_start(flow).action == "drop"
    assert app.on_flow_start(stream(22).flow).action == "upgrade"


def session(inspector: SshSessionInspector, client: bytes, server: bytes, cut: int = 7) -> None:
    for i in range(0, max(len(client), len(server)), cut):
        assert inspector.to_server(client[i:i + cut]) is None
        assert inspector.to_client(server[i:i + cut]) is None


def test_a_session_makes_one_record_and_never_changes_a_byte():
    records: list[dict] = []
    insp = SshSessionInspector(stream(), records.append)
    server_lists = {**OPENSSH, "kex_algorithms": ["curve25519-sha256", "kex-strict-s-v00@openssh.com"]}
    session(insp, b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n" + kexinit_packet(OPENSSH) + os.urandom(500),
            b"SSH-2.0-OpenSSH_9.6\r\n" + kexinit_packet(server_lists) + os.urandom(500))
    insp.on_end(StreamStats(1000, 2000, 1.23456, StreamEnd.CLOSED))
    (r,) = records
    assert r["event"] == "ssh_session" and r["tenant"] == "acme"
    assert (r["client"], r["server"], r["upstream"]) == ("10.0.0.2:40000", "198.18.0.1:22",
                                                          "198.18.0.1:22")
    assert (r["client_ident"], r["server_ident"]) == ("SSH-2.0-OpenSSH_9.2p1 Debian",
                                                      "SSH-2.0-OpenSSH_9.6")
    assert r["client_kexinit"] == OPENSSH and r["server_kexinit"] == server_lists
    assert r["negotiated"] == {"kex": "curve25519-sha256", "host_key": "ssh-ed25519",
                               "cipher_client_to_server": "chacha20-poly1305@openssh.com",
                               "cipher_server_to_client": "chacha20-poly1305@openssh.com"}
    assert (r["bytes_to_server"], r["bytes_to_client"], r["duration"], r["end"]) == \
        (1000, 2000, 1.235, "closed")
    assert "errors" not in r
    json.dumps(r)


def test_a_session_that_is_not_ssh_is_recorded_with_why():
    records: list[dict] = []
    insp = SshSessionInspector(stream(), records.append)
    session(insp, b"GET / HTTP/1.0\r\n\r\n", b"")
    insp.on_end(StreamStats(18, 0, 0.1, StreamEnd.SERVER_RESET))
    (r,) = records
    assert r["client_ident"] is None and r["negotiated"] is None and r["end"] == "server_reset"
    assert r["errors"] == {"client": "the stream ended before it", "server": "the stream ended before it"}


def test_records_go_to_the_log_or_to_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("IPFERRY_SSH_AUDIT_FILE", raising=False)
    stats = StreamStats(1, 2, 0.5, StreamEnd.CLOSED)
    with structlog.testing.capture_logs() as logs:
        SshAuditor().on_stream_start(stream()).on_end(stats)  # type: ignore[union-attr]
    assert [(e["event"], e["tenant"], e["bytes_to_client"]) for e in logs] == \
        [("ssh_session", "acme", 2)]
    out = tmp_path / "ssh.jsonl"
    monkeypatch.setenv("IPFERRY_SSH_AUDIT_FILE", str(out))
    app = SshAuditor()
    for _ in range(2):
        app.on_stream_start(stream()).on_end(stats)  # type: ignore[union-attr]
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["event"] == "ssh_session"


def test_the_documented_config_passes_check_config(tmp_path):
    """examples/README.md's way: examples/ on PYTHONPATH, class = "ssh_auditor:SshAuditor"."""
    conf = tmp_path / "ferry.toml"
    conf.write_text('[app]\nclass = "ssh_auditor:SshAuditor"\n\n[[rules]]\nname = "ssh"\n'
                    'action = "allow"\nports = "22"\nlayer = "stream"\n')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ok = subprocess.run([IPFERRY, "check-config", str(conf)], env={**env, "PYTHONPATH": str(EXAMPLES)},
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([IPFERRY, "check-config", str(conf)], env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "No module named 'ssh_auditor'" in bad.stderr + bad.stdout


# -- a real OpenSSH session through the relay --------------------------------------------------------

SSHD_PORT, RELAY_PORT = 2222, 2200


class Ssh:
    """sshd, the relay with the auditor in front of it, and ssh/scp to run through the relay."""

    def __init__(self, ns: UserNetNs, dst: str = "198.18.0.1:22") -> None:
        self.ns, home = ns, ns.home
        self.records = home / "ssh-sessions.jsonl"
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name,
                            "-f", str(home / name)], check=True, timeout=30)
        (home / "authorized_keys").write_bytes((home / "client_key.pub").read_bytes())
        (home / "sshd_config").write_text(f"""\
ListenAddress 127.0.0.1:{SSHD_PORT}
HostKey {home}/host_key
AuthorizedKeysFile {home}/authorized_keys
PidFile none
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
Subsystem sftp internal-sftp
""")
        self.sshd_log = home / "sshd.log"
        with open(self.sshd_log, "wb") as log:
            ns.start("/usr/sbin/sshd", "-D", "-e", "-f", str(home / "sshd_config"), stderr=log,
                     stdin=subprocess.DEVNULL)
        wait_for(lambda: b"Server listening" in self.sshd_log.read_bytes(), 10, "sshd")
        with open(home / "relay.log", "wb") as log:
            self.relay = ns.start(
                sys.executable, str(HARNESS), "--app", "ssh_auditor:SshAuditor",
                "--listen", f"127.0.0.1:{RELAY_PORT}", "--upstream", f"127.0.0.1:{SSHD_PORT}",
                "--dst", dst, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                env={"PYTHONPATH": str(EXAMPLES), "IPFERRY_SSH_AUDIT_FILE": str(self.records)})
        assert read_line(self.relay, 20) == "ready", (home / "relay.log").read_text()
        self.options = ["-F", "/dev/null", "-i", str(home / "client_key"), "-o", "BatchMode=yes",
                        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                        "-o", "LogLevel=ERROR"]

    def ssh(self, *command: str) -> subprocess.CompletedProcess:
        return self.ns.run("ssh", *self.options, "-p", str(RELAY_PORT), f"{USER}@127.0.0.1",
                           *command, stdin=subprocess.DEVNULL)

    def scp(self, src: str, dst: str) -> subprocess.CompletedProcess:
        return self.ns.run("scp", *self.options, "-P", str(RELAY_PORT), src, dst,
                           stdin=subprocess.DEVNULL)

    def sessions(self, count: int) -> list[dict]:
        """The first ``count`` records, once written (the relay writes at the stream's end)."""
        def read():
            text = self.records.read_text() if self.records.exists() else ""
            lines = text.splitlines()
            return len(lines) >= count and [json.loads(line) for line in lines]
        return wait_for(read, 15, f"{count} ssh_session records")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in (self.sshd_log, self.ns.home / "relay.log") if p.exists())


@pytest.fixture
def ssh(userns):
    return Ssh(userns)


def check_hello(r: dict) -> None:
    assert r["client_ident"].startswith("SSH-2.0-OpenSSH"), r
    assert r["server_ident"].startswith("SSH-2.0-OpenSSH"), r
    for side in ("client_kexinit", "server_kexinit"):
        assert r[side]["kex_algorithms"] and "curve25519-sha256" in r[side]["kex_algorithms"], r
        assert r[side]["server_host_key_algorithms"], r
    assert r["negotiated"]["kex"] and r["negotiated"]["host_key"] == "ssh-ed25519", r
    assert "errors" not in r, r


@pytest.mark.timeout(120)
def test_an_ssh_session_through_the_auditor(ssh):
    done = ssh.ssh("echo", "hello")
    assert done.returncode == 0 and done.stdout == b"hello\n", (done.stderr, ssh.logs())
    (r,) = ssh.sessions(1)
    check_hello(r)
    assert r["tenant"] == "acme" and r["end"] == "closed"
    assert r["client"].startswith("127.0.0.1:") and r["server"] == "198.18.0.1:22"
    assert r["upstream"] == f"127.0.0.1:{SSHD_PORT}"
    assert r["bytes_to_server"] > 1000 and r["bytes_to_client"] > 1000
    assert 0 < r["duration"] < 60


@pytest.mark.timeout(180)
def test_scp_both_ways_through_the_auditor(ssh, userns):
    home = userns.home
    data = os.urandom(4 << 20)
    (home / "up.bin").write_bytes(data)
    up = ssh.scp(str(home / "up.bin"), f"{USER}@127.0.0.1:{home}/there.bin")
    assert up.returncode == 0, (up.stderr, ssh.logs())
    down = ssh.scp(f"{USER}@127.0.0.1:{home}/there.bin", str(home / "back.bin"))
    assert down.returncode == 0, (down.stderr, ssh.logs())
    digest = hashlib.sha256(data).hexdigest()
    assert hashlib.sha256((home / "there.bin").read_bytes()).hexdigest() == digest
    assert hashlib.sha256((home / "back.bin").read_bytes()).hexdigest() == digest
    first, second = ssh.sessions(2)
    for r in (first, second):
        check_hello(r)
        assert r["end"] == "closed"
    assert first["bytes_to_server"] > len(data) > first["bytes_to_client"]
    assert second["bytes_to_client"] > len(data) > second["bytes_to_server"]


@pytest.mark.timeout(120)
def test_a_stream_to_another_port_is_spliced_unaudited(userns):
    ssh = Ssh(userns, dst="198.18.0.1:80")  # nor 80 nor the upstream's 2222 is an SSH port
    done = ssh.ssh("echo", "hello")
    assert done.returncode == 0 and done.stdout == b"hello\n", (done.stderr, ssh.logs())
    assert not ssh.records.exists()

