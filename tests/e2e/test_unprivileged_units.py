"""Root is required only by tests/e2e/: the rest of the suite passes as an unprivileged user.

The suite less tests/e2e/ runs as uid 65534 (nobody, no capabilities, no supplementary groups) in
a subprocess, from a scratch directory that user owns (its tmp_path, hypothesis' database), with
no bytecode written into the tree. A test that needs root, a real TUN, a namespace made with
privilege or a kernel feature a user cannot use fails there, so it belongs in tests/e2e/.

The interpreter must be reachable by that user. Where it lives under a directory others may not
search (pyenv in /root, say), the run gets a private mount namespace in which that directory is
an empty tmpfs with only the interpreter's prefix bound back, read-only: nothing changes outside.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
TIMEOUT = 600

# $1 the interpreter's prefix, $2 the directory above it others may not search ("" if none);
# then the command, run as nobody.
SANDBOX = r"""
prefix=$1 blocked=$2
shift 2
if [ -n "$blocked" ]; then
    real=$(mktemp -d)
    mount --bind "$blocked" "$real"
    mount -t tmpfs -o mode=0755,size=1m ipferry-unprivileged "$blocked"
    mkdir -p "$prefix"
    mount --bind "$real${prefix#"$blocked"}" "$prefix"
    mount -o remount,bind,ro "$prefix"
fi
exec setpriv --reuid=NOBODY --regid=NOBODY --clear-groups --inh-caps=-all "$@"
""".replace("NOBODY", str(NOBODY))

RUN = ("import os, sys, pytest; print(f'euid {os.geteuid()} egid {os.getegid()}', flush=True); "
       "sys.exit(pytest.main(sys.argv[1:]))")


def unsearchable(path: Path) -> Path | None:
    """The first directory on the way from / to ``path`` (itself included) that others may not
    search, if any."""
    for directory in [*reversed(path.parents), path]:
        if not os.stat(directory).st_mode & stat.S_IXOTH:
            return directory
    return None


@pytest.mark.timeout(TIMEOUT + 60)
def test_the_unit_tests_pass_unprivileged():
    for what, path in (("the repository", REPO), ("the virtualenv", Path(sys.prefix))):
        assert unsearchable(path) is None, (
            f"{what} at {path} is not searchable by others ({unsearchable(path)}): the unit "
            f"tests cannot be run as an unprivileged user from there")
    prefix = Path(sys.base_prefix).resolve()
    assert Path(sys.executable).resolve().is_relative_to(prefix), sys.executable
    blocked = unsearchable(prefix)
    assert blocked != prefix, f"the interpreter's prefix {prefix} is not searchable by others"
    scratch = Path(tempfile.mkdtemp(prefix="ipft-unprivileged-"))
    try:
        os.chown(scratch, NOBODY, NOBODY)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(scratch),
               "TMPDIR": str(scratch), "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-euc", SANDBOX, "sh",
             str(prefix), str(blocked or ""),
             sys.executable, "-c", RUN, str(REPO / "tests"), f"--ignore={REPO / 'tests' / 'e2e'}",
             "-q", "-p", "no:cacheprovider"],
            cwd=scratch, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out = proc.stdout + proc.stderr
    tail = out[-6000:]
    assert f"euid {NOBODY} egid {NOBODY}" in proc.stdout, tail
    assert proc.returncode == 0, f"the unit tests failed as uid {NOBODY}:\n{tail}"
    summary = out.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 0, tail
    assert not re.search(r"failed|error", summary), tail
