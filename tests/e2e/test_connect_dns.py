"""``ipferry connect``'s names: the command's own /etc/resolv.conf, ``--dns`` and ``--no-dns``.

No daemon: the test plays the tunnel's other end (tests/e2e/test_connect_address.py's harness) and
reads the resolv.conf the command sees. The host's file is only ever read; the cases that need
another "host" resolv.conf (search and options lines, a symlink as systemd-resolved makes, none at
all) run ``ipferry connect`` in a mount namespace of the test's own whose /etc is a farm of
symlinks to the real one, but for resolv.conf.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from ipferry.nsd.connect import parse_dns, resolv_conf
from ipferry.wire.dns import DNS_ADDRESS4, DNS_ADDRESS6
from tests.e2e.test_connect_address import tunnel_end
from tests.helpers import IPFERRY, NO_CAPS

HOST = Path("/etc/resolv.conf")
HEADER = ("# ipferry connect: resolvers through the tunnel; search and options from the host's "
          "/etc/resolv.conf\n")
# Inside: the resolv.conf, then where it is mounted from (its mountinfo line, if a mount).
SHOW = 'cat /etc/resolv.conf; echo "--mounts--"; grep ipferry-connect- /proc/self/mountinfo'
TIMEOUT = 60


def run_connect(tmp_path: Path, *options: str, command: str = SHOW,
                prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``ipferry connect OPTIONS -- sh -c COMMAND`` over a fake tunnel (after ``prefix``, the
    test's own mount namespace if any)."""
    path = tmp_path / "tunnel.sock"
    path.unlink(missing_ok=True)  # (a test may connect more than once)
    srv, t, seen = tunnel_end(path)
    try:
        return subprocess.run([*prefix, *NO_CAPS, IPFERRY, "connect", "--tunnel", str(path),
                               "--tenant", "acme", *options, "--", "sh", "-c", command],
                              capture_output=True, text=True, timeout=TIMEOUT,
                              stdin=subprocess.DEVNULL)
    finally:
        srv.close()
        t.join(10)


def inside(res: subprocess.CompletedProcess) -> tuple[str, str]:
    """(the resolv.conf the command saw, its mountinfo line)."""
    assert res.returncode in (0, 1), res.stderr  # (grep: 1 when /etc/resolv.conf is no mount)
    text, _, mounts = res.stdout.partition("--mounts--\n")
    return text, mounts


def nameservers(text: str) -> list[str]:
    return [line.split()[1] for line in text.splitlines() if line.startswith("nameserver")]


def fingerprint(path: Path) -> tuple[bytes, int, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_ino, st.st_dev, st.st_mtime_ns


def scratch_of(mounts: str) -> Path:
    """The temporary directory the bound file came from (deleted by the time CMD runs)."""
    m = re.search(r" (/\S*/ipferry-connect-[^/\s]+)/resolv\.conf//deleted /etc/resolv\.conf ", mounts)
    assert m, mounts
    return Path(m.group(1))


def test_by_default_the_daemons_resolver_and_nothing_on_the_host_changes(tmp_path):
    before = fingerprint(HOST)
    res = run_connect(tmp_path, command=SHOW + "; if (echo x >> /etc/resolv.conf) 2>/dev/null; "
                                               "then echo WROTE; fi")
    text, mounts = inside(res)
    assert res.stderr == ""
    assert nameservers(text) == [DNS_ADDRESS4, DNS_ADDRESS6] == ["100.100.100.100", "fd53::53"]
    assert text.startswith(HEADER + "nameserver 100.100.100.100\nnameserver fd53::53\n")
    assert "WROTE" not in res.stdout  # read-only inside
    assert " ro," in mounts or " ro " in mounts
    # The file was removed once bound (the bind keeps it), and the host's is as it was.
    assert not scratch_of(mounts).exists()
    assert fingerprint(HOST) == before


def test_dns_names_other_resolvers(tmp_path):
    before = fingerprint(HOST)
    res = run_connect(tmp_path, "--dns", "192.0.2.53", "--dns", "2001:DB8:0::53",
                      "--dns", "192.0.2.53")  # (normalised, each once)
    text, _ = inside(res)
    assert res.stderr == ""
    assert nameservers(text) == ["192.0.2.53", "2001:db8::53"]
    assert fingerprint(HOST) == before


def test_no_dns_keeps_the_hosts_file_byte_for_byte(tmp_path):
    before = fingerprint(HOST)
    res = run_connect(tmp_path, "--no-dns")
    text, mounts = inside(res)
    assert res.stderr == ""
    assert text.encode() == before[0]
    assert "ipferry-connect-" not in mounts
    assert fingerprint(HOST) == before


# -- another "host" resolv.conf, in a mount namespace of the test's ---------------------------

STUB = "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch corp.example lab.example\n"


def host_etc(tmp_path: Path, resolv: str | None,
             symlink: bool = False) -> tuple[tuple[str, ...], Path | None]:
    """(a command prefix running what follows with an /etc whose resolv.conf is ``resolv``, as
    a file, or a symlink to a file elsewhere, or none if None; that file's path outside)."""
    real, farm = tmp_path / "etc-real", tmp_path / "etc"
    real.mkdir()
    farm.mkdir()
    for entry in os.listdir("/etc"):
        if entry != "resolv.conf":
            (farm / entry).symlink_to(real / entry)
    file = None
    if resolv is not None:
        if symlink:
            file = tmp_path / "run/systemd/resolve/stub-resolv.conf"
            file.parent.mkdir(parents=True)
            (farm / "resolv.conf").symlink_to(file)
        else:
            file = farm / "resolv.conf"
        file.write_text(resolv)
    script = 'mount --bind /etc "$1" && mount --bind "$2" /etc && shift 2 && exec "$@"'
    return ("unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
            str(real), str(farm)), file


@pytest.mark.parametrize("symlink", [False, True], ids=["file", "symlink"])
def test_search_and_options_are_the_hosts_and_its_loopback_stub_is_not(tmp_path, symlink):
    prefix, file = host_etc(tmp_path, STUB, symlink)
    assert file is not None
    before = fingerprint(file)
    res = run_connect(tmp_path, prefix=prefix)
    text, mounts = inside(res)
    assert res.stderr == ""
    assert text == (HEADER + "nameserver 100.100.100.100\nnameserver fd53::53\n"
                    "options edns0 trust-ad\nsearch corp.example lab.example\n")
    if symlink:  # bound over the link's target, which /etc/resolv.conf leads to
        assert f" {file} " in mounts
    assert fingerprint(file) == before

    res = run_connect(tmp_path, "--dns", "192.0.2.53", prefix=prefix)
    text, _ = inside(res)
    assert text == (HEADER + "nameserver 192.0.2.53\n"
                    "options edns0 trust-ad\nsearch corp.example lab.example\n")

    res = run_connect(tmp_path, "--no-dns", prefix=prefix)
    text, _ = inside(res)
    assert text == STUB
    assert fingerprint(file) == before


def test_no_resolv_conf_to_bind_over_is_one_warning(tmp_path):
    prefix, _ = host_etc(tmp_path, None)
    res = run_connect(tmp_path, prefix=prefix,
                      command="test -e /etc/resolv.conf && echo THERE || echo NONE")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "NONE\n"
    assert res.stderr == ("ipferry connect: warning: CMD gets no resolv.conf of its own: there is "
                          "no /etc/resolv.conf to bind it over\n")
    assert not (tmp_path / "etc" / "resolv.conf").exists()


def test_a_dangling_symlink_is_one_warning(tmp_path):
    prefix, file = host_etc(tmp_path, "", symlink=True)
    assert file is not None
    file.unlink()  # (systemd-resolved not running)
    res = run_connect(tmp_path, prefix=prefix, command="echo RAN")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "RAN\n"
    assert res.stderr == (f"ipferry connect: warning: CMD gets no resolv.conf of its own: "
                          f"/etc/resolv.conf is a symlink to {file}, which does not exist\n")
    assert not file.exists()


# -- bad values ---------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (["--dns", "bogus"], "--dns bogus: not an IPv4 or IPv6 address"),
    (["--dns", "192.0.2.0/24"], "--dns 192.0.2.0/24: not an IPv4 or IPv6 address"),
    (["--dns", "1.1.1.1:53"], "--dns 1.1.1.1:53: not an IPv4 or IPv6 address"),
    (["--dns", "fe80::1%eth0"], "--dns fe80::1%eth0: no %scope"),
    (["--dns", "0.0.0.0"], "--dns 0.0.0.0: unspecified; a resolver's address must be unicast"),
    (["--dns", "ff02::fb"], "--dns ff02::fb: multicast"),
    (["--dns", "192.0.2.1", "--dns", "192.0.2.2", "--dns", "192.0.2.3", "--dns", "192.0.2.4"],
     "--dns 192.0.2.4: at most 3 resolvers"),
    (["--dns", "192.0.2.1", "--no-dns"], "--dns 192.0.2.1 and --no-dns: give one of them"),
])
def test_a_bad_dns_is_one_line_and_nothing_starts(tmp_path, options, message):
    # The tunnel does not exist: had anything started, connect would say so (exit 1) instead.
    res = subprocess.run([*NO_CAPS, IPFERRY, "connect", "--tunnel", str(tmp_path / "nothing.sock"),
                          *options, "--", "true"], capture_output=True, text=True, timeout=TIMEOUT,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(f"ipferry connect: {message}"), res.stderr
    assert res.stderr.count("\n") == 1


# -- the file itself ----------------------------------------------------------------------------

def test_resolv_conf_keeps_search_domain_and_options_only():
    host = ("# written by NetworkManager\nnameserver 127.0.0.53\nnameserver ::1\n"
            "domain corp.example\n  search a.example b.example  \noptions ndots:2\n"
            "sortlist 10.0.0.0/255.0.0.0\n; a comment\nsearchx x\n")
    assert resolv_conf([DNS_ADDRESS4, DNS_ADDRESS6], host) == (
        HEADER + "nameserver 100.100.100.100\nnameserver fd53::53\ndomain corp.example\n"
        "  search a.example b.example\noptions ndots:2\n")
    # No IPv6 in the namespace: no IPv6 nameserver.
    assert nameservers(resolv_conf([DNS_ADDRESS4, DNS_ADDRESS6], "", ipv6=False)) == [DNS_ADDRESS4]
    assert parse_dns(["2001:db8:0:0::1", "192.0.2.1", "2001:db8::1"]) == ["2001:db8::1", "192.0.2.1"]


def test_the_random_client_address_is_never_the_resolvers():
    import ipaddress

    from ipferry.nsd.connect import random_address
    assert ipaddress.ip_address(DNS_ADDRESS4) not in ipaddress.ip_network("10.98.0.0/16")
    assert all(random_address().ip != ipaddress.ip_address(DNS_ADDRESS4) for _ in range(1000))
