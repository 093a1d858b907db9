"""A network namespace any user can make, with real servers in it, taken down on every exit.

``unshare`` makes a user namespace (the test's user is root there), a mount namespace in which
/etc/passwd and /etc/group gain a user ``ferry`` (uid 4242, a shell and a home in the test's
tmp dir), then a second user namespace in which the test's user is ``ferry``, with its own
network namespace (loopback up) and mount namespace. Programs are started in it with
``nsenter`` and run as ``ferry``: unprivileged, as sshd needs to be to run without its privilege
separation user and chroot (which a namespace with one uid mapped cannot give it). Nothing in it
can reach another address than its own loopback.

Root is not needed (the tests run as root in CI, and as nobody in the unprivileged unit run).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path

UID = 4242
USER = "ferry"

# $1 passwd, $2 group: bound over /etc's in the outer mount namespace; then the inner namespaces
# (keeping the capabilities to bring loopback up), and a process holding them until killed.
_HOLD = """
mount --bind "$1" /etc/passwd
mount --bind "$2" /etc/group
exec unshare --user --map-user=UID --map-group=UID --net --mount --keep-caps \
    sh -ec 'ip link set lo up; echo up; exec sleep 100000'
""".replace("UID", str(UID))


class UserNetNs:
    """The namespaces; :meth:`start` runs a program in them (killed by :meth:`close`)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        passwd, group = home / "passwd", home / "group"
        passwd.write_text(Path("/etc/passwd").read_text()
                          + f"{USER}:x:{UID}:{UID}:ipferry test:{home}:/bin/sh\n")
        group.write_text(Path("/etc/group").read_text() + f"{USER}:x:{UID}:\n")
        self.procs: list[subprocess.Popen] = []
        self.holder = subprocess.Popen(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-ec", _HOLD, "sh",
             str(passwd), str(group)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            line = read_line(self.holder, 10)
            if line != "up":
                raise RuntimeError(f"the namespace did not come up: {line!r} "
                                   f"{self.holder.stderr.read().decode() if self.holder.stderr else ''}")
        except BaseException:
            self.close()
            raise

    def start(self, *argv: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
        """``argv`` inside, as ``ferry``, in ``home``."""
        proc = subprocess.Popen(
            ["nsenter", f"--target={self.holder.pid}", "--user", "--net", "--mount",
             "--preserve-credentials", f"--wd={self.home}", "--", *argv],
            env={**os.environ, **(env or {})}, **kw)
        self.procs.append(proc)
        return proc

    def run(self, *argv: str, input: bytes | None = None, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        """``argv`` inside, to its end (killed after ``timeout``), given ``input``."""
        kw.setdefault("stdin", subprocess.DEVNULL if input is None else subprocess.PIPE)
        proc = self.start(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"{argv[0]} still running after {timeout}s: "
                                 f"{out[-2000:]!r} {err[-2000:]!r}") from None
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def close(self) -> None:
        for proc in [*self.procs, self.holder]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in [*self.procs, self.holder]:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            for pipe in (proc.stdout, proc.stderr, proc.stdin):
                if pipe is not None:
                    pipe.close()


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The next line of ``proc``'s stdout (a pipe), within ``timeout`` seconds."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no line from {proc.args[0]} within {timeout}s (so far {buf!r})")
        chunk = os.read(fd, 1)
        if not chunk:
            raise AssertionError(f"{proc.args[0]} ended its output (exit {proc.wait(5)}): {buf!r}")
        buf += chunk
    return buf.decode().strip()
