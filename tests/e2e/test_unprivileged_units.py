"""Root is required only by tests/e2e/: the rest of the suite passes as an unprivileged user.

The suite less tests/e2e/ runs as uid 65534 (nobody, no capabilities, no supplementary groups) in
a subprocess, from a scratch directory that user owns (its tmp_path, hypothesis' database), with
no bytecode written into the tree. A test that needs root, a real TUN, a namespace made with
privilege or a kernel feature a user cannot use fails there, so it belongs in tests/e2e/.

The interpreter, the virtualenv and the repository must be reachable by that user. Where one lives
under a directory others may not search (pyenv in /root, a checkout in a `mktemp -d` directory),
the run gets a private mount namespace in which that directory is an empty tmpfs with only what is
needed bound back (the interpreter's prefix read-only; every entry of the checkout when the
checkout itself is that directory): nothing changes outside.
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

# Groups "G <a directory others may not search> <paths under it, or itself, to keep>...", then
# "--" and the command, run as nobody.
SANDBOX = r"""
while [ "$1" != "--" ]; do
    if [ "$1" = "G" ]; then
        blocked=$2
        shift 2
        real=$(mktemp -d)
        mount --bind "$blocked" "$real"
        mount -t tmpfs -o mode=0755,size=1m ipferry-unprivileged "$blocked"
        continue
    fi
    keep=$1
    shift
    if [ "$keep" = "$blocked" ]; then  # the directory itself: every entry of it, bound back
        for entry in "$real"/* "$real"/.[!.]*; do
            [ -e "$entry" ] || continue
            name=${entry#"$real"/}
            if [ -d "$entry" ]; then mkdir "$blocked/$name"; else : > "$blocked/$name"; fi
            mount --bind "$entry" "$blocked/$name"
        done
    else
        mkdir -p "$keep"
        mount --bind "$real${keep#"$blocked"}" "$keep"
        mount -o remount,bind,ro "$keep"
    fi
done
shift
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
    prefix = Path(sys.base_prefix).resolve()
    assert Path(sys.executable).resolve().is_relative_to(prefix), sys.executable
    # What nobody must reach, grouped by the directory in the way (a path inside another kept
    # path of its group is kept with it).
    groups: dict[Path, list[Path]] = {}
    for path in sorted({REPO, Path(sys.prefix).resolve(), prefix}):
        blocked = unsearchable(path)
        if blocked is not None:
            kept = groups.setdefault(blocked, [])
            if not any(path.is_relative_to(k) for k in kept):
                kept.append(path)
    for blocked, kept in groups.items():
        for k in kept:  # below the directory in the way, every step must be searchable
            shut = [d for d in [*k.parents, k] if d.is_relative_to(blocked) and d != blocked
                    and not os.stat(d).st_mode & stat.S_IXOTH]
            assert not shut, f"{shut[-1]} is not searchable by others either: {k} is out of reach"
    spec = [arg for blocked, kept in groups.items() for arg in ("G", str(blocked), *map(str, kept))]
    scratch = Path(tempfile.mkdtemp(prefix="ipft-unprivileged-"))
    try:
        os.chown(scratch, NOBODY, NOBODY)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(scratch),
               "TMPDIR": str(scratch), "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-euc", SANDBOX, "sh",
             *spec, "--", sys.executable, "-c", RUN, str(REPO / "tests"),
             f"--ignore={REPO / 'tests' / 'e2e'}",
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
