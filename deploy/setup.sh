#!/usr/bin/env bash
# Prepare a fresh Debian machine (as root) for ipferry: the Debian packages it builds and runs with,
# and a virtualenv in .venv with ipferry installed (editable) plus the test tools.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

# (openssh-server, redis-server, dnsmasq, nginx: the end-to-end tests run sshd, redis, a resolver
# and web servers in their own namespaces; no service of theirs is started on the host, see
# deploy/debs.sh.)
debs=(libcap-dev iproute2 iperf3 iputils-ping procps util-linux gcc python3-dev curl
      openssh-server openssh-client redis-server redis-tools dnsmasq-base bind9-dnsutils
      nginx openssl
      wrk squid  # (the HTTP benchmark's CI run: a load generator and a proxy to compare with)
      haproxy  # (bench/run's relay floor: kernel TCP on both sides, a relay in C)
      prometheus  # (promtool: the tests check the alert rules, the dashboard and a live scrape)
      chromium fonts-dejavu-core  # (headless: the e2e test renders the admin status page)
      systemd)  # (systemd-analyze: the install test verifies the units)
. deploy/debs.sh
ensure_debs setup "${debs[@]}"

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=.venv/.ipferry-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1
    # The registry mirror here warns about every package it skips; keep real errors visible.
    # PYTHONWARNINGS: setuptools maps ipferry.wire to wire/ (package-dir) in an editable install
    # with an import finder, and says so in an "Editable installation." notice (be careful with
    # a folder named like the package, ipferry/: there is none), which pip relays as a warning
    # block. No editable mode is quiet here (strict prints a notice of its own; compat puts the
    # checkout on sys.path, where ipferry.* is not found), so that one notice is filtered out,
    # by its text, in pip and in the build backend it runs; any other warning still shows.
    PYTHONWARNINGS="ignore:Editable installation" \
        .venv/bin/pip install -q -e '.[test]' 2> >(grep -v 'is ignored: it is neither' >&2)
    touch "$stamp"
fi

# mypy runs no import hook, so it cannot see the editable install's finder that maps ipferry.wire
# to wire/ (pyproject.toml's package-dir); it reads the same mapping as symlinks in
# .venv/mypy-path/ipferry ([tool.mypy] mypy_path). Only a missing or wrong link is (re)made.
.venv/bin/python - <<'EOF'
import os
import tomllib
from pathlib import Path

package_dir = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
for package, folder in package_dir.items():
    link = Path(".venv/mypy-path", *package.split("."))
    target = os.path.relpath(folder, link.parent)
    if link.is_symlink() and os.readlink(link) == target:
        continue
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target, target_is_directory=True)
    tmp.replace(link)
EOF
