#!/usr/bin/env bash
# Install ipferry on this machine (as root), for systemd:
#   /opt/ipferry                         its own virtualenv, ipferry installed from this checkout
#                                        (not editable: the checkout may be removed afterwards)
#   /usr/local/bin/ipferry               symlink to /opt/ipferry/bin/ipferry (the unit's ExecStart)
#   user and group ipferry               a system user, no home, nologin (kept if present)
#   /etc/systemd/system/ipferry.service  and ipferry.socket
#   /etc/ipferry/ipferry.toml            the example config (never overwritten)
#   /var/log/ipferry, /var/lib/ipferry   audit file and state (the unit's LogsDirectory= and
#                                        StateDirectory=, writable under ProtectSystem=strict)
# Then `systemctl enable --now ipferry` is all that is left.
#
# Usage: deploy/install.sh [--uninstall [--purge]]
#   --uninstall  remove what it installed; keeps /etc/ipferry, /var/log/ipferry, /var/lib/ipferry
#                and the ipferry user
#   --purge      with --uninstall: remove those too
# Idempotent: a second run changes nothing and says so (the venv is rebuilt only when the
# checkout's package sources changed).
#
# Environment:
#   DESTDIR  install everything under this directory instead of /, for staging and inspection.
#            No user is created and systemctl is not called. The virtualenv's scripts then have
#            shebangs inside DESTDIR ($DESTDIR/opt/ipferry/bin/python): it runs from there, but
#            is not relocatable. Packagers should build the venv at its final path (e.g. in a
#            chroot or container) or use a relocatable tool (dh-virtualenv, a wheel-based
#            package), not copy a DESTDIR tree as is.
#   PREFIX   the virtualenv's path (default /opt/ipferry)
#   PYTHON   the interpreter the virtualenv is made from (default python3)
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
root=${DESTDIR:-}
root=${root%/}
prefix=${PREFIX:-/opt/ipferry}
python=${PYTHON:-python3}

action=install
purge=0
for arg in "$@"; do
    case "$arg" in
        --uninstall) action=uninstall ;;
        --purge) purge=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "install: unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done
if [ "$purge" = 1 ] && [ "$action" != uninstall ]; then
    echo "install: --purge goes with --uninstall" >&2
    exit 2
fi

venv=$root$prefix
link=$root/usr/local/bin/ipferry
unitdir=$root/etc/systemd/system
confdir=$root/etc/ipferry
logdir=$root/var/log/ipferry
statedir=$root/var/lib/ipferry
units=(ipferry.service ipferry.socket)
# The package sources pip installs (pyproject.toml [tool.setuptools]).
sources=(pyproject.toml README.md supervisor worker nsd runtime wire engine)

changed=0
say() { echo "install: $*"; changed=1; }

if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install: run as root (or set DESTDIR to stage the files elsewhere)" >&2
    exit 1
fi
have_systemd() { [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

if [ "$action" = uninstall ]; then
    if have_systemd; then
        for u in "${units[@]}"; do
            if systemctl is-enabled --quiet "$u" 2>/dev/null || systemctl is-active --quiet "$u"; then
                systemctl disable --now "$u" && say "stopped and disabled $u"
            fi
        done
    fi
    for u in "${units[@]}"; do
        if [ -e "$unitdir/$u" ]; then rm -f "$unitdir/$u"; say "removed $unitdir/$u"; fi
    done
    if have_systemd && [ "$changed" = 1 ]; then systemctl daemon-reload; fi
    if [ -L "$link" ]; then rm -f "$link"; say "removed $link"; fi
    if [ -e "$venv" ]; then rm -rf "$venv"; say "removed $venv"; fi
    if [ "$purge" = 1 ]; then
        for d in "$confdir" "$logdir" "$statedir"; do
            if [ -e "$d" ]; then rm -rf "$d"; say "removed $d"; fi
        done
        if [ -z "$root" ] && getent passwd ipferry >/dev/null; then
            userdel ipferry && say "removed the user ipferry"
        fi
        if [ -z "$root" ] && getent group ipferry >/dev/null; then
            groupdel ipferry && say "removed the group ipferry"
        fi
    else
        for d in "$confdir" "$logdir" "$statedir"; do
            if [ -e "$d" ]; then echo "install: kept $d (--purge removes it)"; fi
        done
    fi
    if [ "$changed" = 0 ]; then echo "install: nothing to remove: ipferry is not installed"; fi
    exit 0
fi

# Debian packages the venv builds with (python-prctl needs libcap-dev and a compiler), and acl:
# the unit's ExecStartPre= runs setfacl to let the service user open a 0600 /dev/net/tun.
. "$src/deploy/debs.sh"
ensure_debs install libcap-dev gcc python3-dev python3-venv acl

# The virtualenv: rebuilt only when the package sources differ from what it was built from.
digest=$(cd "$src" && find "${sources[@]}" -name __pycache__ -prune -o -type f -print \
         | LC_ALL=C sort | xargs -d '\n' sha256sum | sha256sum | cut -d' ' -f1)
stamp=$venv/.ipferry-source
if [ ! -x "$venv/bin/ipferry" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
    if [ ! -x "$venv/bin/python" ]; then
        mkdir -p "$(dirname "$venv")"
        "$python" -m venv "$venv"
        say "created the virtualenv $venv"
    fi
    # Build from a copy: a non-editable install writes build/ and *.egg-info into its source.
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    (cd "$src" && tar -cf - --exclude=__pycache__ --exclude='*.egg-info' "${sources[@]}") \
        | tar -C "$build" -xf -
    "$venv/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
    # The registry mirror here warns about every package it skips; keep real errors visible.
    # (Uninstalled first: the version does not change between checkouts.)
    "$venv/bin/pip" uninstall -q -y ipferry >/dev/null 2>&1 || true
    "$venv/bin/pip" install -q --no-cache-dir "$build" 2> >(grep -v 'is ignored: it is neither' >&2)
    echo "$digest" > "$stamp"
    say "installed ipferry from $src into $venv"
fi

# The command where the unit expects it. The target is the final path, without DESTDIR.
if [ "$(readlink "$link" 2>/dev/null)" != "$prefix/bin/ipferry" ]; then
    mkdir -p "$(dirname "$link")"
    ln -sfn "$prefix/bin/ipferry" "$link"
    say "linked $link -> $prefix/bin/ipferry"
fi

# The service user (not under DESTDIR: a package creates it at install time).
if [ -z "$root" ]; then
    if ! getent group ipferry >/dev/null; then
        groupadd --system ipferry
        say "created the group ipferry"
    fi
    if ! getent passwd ipferry >/dev/null; then
        useradd --system --gid ipferry --no-create-home --home-dir /nonexistent \
                --shell /usr/sbin/nologin ipferry
        say "created the user ipferry"
    fi
fi

units_changed=0
mkdir -p "$unitdir"
for u in "${units[@]}"; do
    if ! cmp -s "$src/deploy/$u" "$unitdir/$u"; then
        install -m 0644 "$src/deploy/$u" "$unitdir/$u"
        say "installed $unitdir/$u"
        units_changed=1
    fi
done

if [ ! -e "$confdir/ipferry.toml" ]; then
    install -d -m 0755 "$confdir"
    install -m 0644 "$src/deploy/ipferry.toml" "$confdir/ipferry.toml"
    say "installed the example config $confdir/ipferry.toml"
fi

# systemd creates (and chowns) them too, through LogsDirectory= and StateDirectory=.
for d in "$logdir" "$statedir"; do
    if [ ! -d "$d" ]; then
        install -d -m 0750 "$d"
        say "created $d"
    fi
    if [ -z "$root" ] && [ "$(stat -c %U:%G "$d")" != ipferry:ipferry ]; then
        chown ipferry:ipferry "$d"
        say "made $d owned by ipferry"
    fi
done

if have_systemd && [ "$units_changed" = 1 ]; then
    systemctl daemon-reload
    say "reloaded systemd"
fi

if [ "$changed" = 0 ]; then
    echo "install: nothing to do: ipferry is installed and up to date${root:+ in $root}"
fi
if [ -n "$root" ]; then
    echo "install: staged under $root (no user created, systemctl not called)"
else
    echo "install: left to do:  systemctl enable --now ipferry"
fi
