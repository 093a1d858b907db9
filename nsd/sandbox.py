"""The inside of ``ipferry connect``: a fresh user+net namespace whose only way out is a TUN.

``python -m ipferry.nsd.sandbox --control-fd N --address A --address6 A6 [--extra-address X]...
[--local-route CIDR]... [--mtu M] [--resolv-conf FILE] -- CMD ...``
enters a new user and network namespace, brings up ``lo`` and a TUN device carrying both addresses
as the IPv4 and IPv6 default route (the extra addresses go on ``lo``, so they are never chosen as
sources; each local route makes a whole prefix local, AnyIP, as ``ip route add local CIDR dev
lo`` does), sends the TUN
fd to its parent (message ``tun``, fd ``tun``) and runs CMD, staying as the namespace's keeper
until CMD has exited and the sockets it left have said all they owed (at most 10 s); it exits
with CMD's status. The parent pumps packets between that TUN and a tunnel. Errors before CMD runs
are sent as ``error`` {cause, fix}.

With ``--resolv-conf FILE`` it also enters a private mount namespace (inside the new user
namespace: the host's mounts are untouched) and bind-mounts FILE, read-only, over
``/etc/resolv.conf`` (over its target if it is a symlink, as systemd-resolved's is), before the
``tun`` message; the parent may then remove FILE. If that cannot be done, the ``tun`` message
says why in ``dns_warning`` and CMD reads the host's file.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import ipaddress
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence

from ipferry.runtime import fdpass
from ipferry.wire import vnet

from .namespace import HostError, enter_user_and_net_namespace, unshare, write_sysctls
from .tun import open_tun

TUN_NAME = "ipf-tun0"
IFA_F_NODAD = 0x02  # usable at once: CMD may connect before duplicate detection would finish
RT_TABLE_LOCAL = 255
RT_SCOPE_HOST = 254
RESOLV_CONF = "/etc/resolv.conf"
CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]


def mount(source: str | None, target: str, flags: int) -> None:
    """mount(2) without a file system type or data: binds, remounts, propagation changes."""
    if _libc.mount(source.encode() if source else None, target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _kept_flags(path: str) -> int:
    """The flags of the mount at ``path`` a remount must repeat (nosuid, nodev, noexec, atime: a
    user namespace may not clear those it inherited)."""
    f = os.statvfs(path).f_flag
    kept = f & (os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC | os.ST_NOATIME | os.ST_NODIRATIME)
    # (the ST_ bits are the MS_ ones, but for relatime)
    return kept | (MS_RELATIME if f & os.ST_RELATIME else 0)


def private_resolv_conf(source: str, resolv_conf: str = RESOLV_CONF) -> str | None:
    """In a new mount namespace (the caller is single-threaded, in its own user namespace), bind
    ``source`` read-only over ``resolv_conf``, or over its target if it is a symlink. None when
    done, else one line saying why not (CMD then sees the host's file; the host's mounts are never
    touched)."""
    target = os.path.realpath(resolv_conf)
    if not os.path.exists(target):
        if os.path.islink(resolv_conf):
            return f"{resolv_conf} is a symlink to {target}, which does not exist"
        return f"there is no {resolv_conf} to bind it over"
    try:
        unshare(CLONE_NEWNS)
    except OSError as exc:
        return f"cannot make a mount namespace ({exc.strerror})"
    try:
        # Nothing done here may reach the host's mounts (a namespace made by an unprivileged user
        # namespace gets slaves of shared mounts already; private says it outright).
        mount(None, "/", MS_REC | MS_PRIVATE)
        mount(source, target, MS_BIND)
    except OSError as exc:
        return f"cannot bind it over {target} ({exc.strerror})"
    try:
        mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY | _kept_flags(target))
    except OSError:
        pass  # writable then: what CMD writes goes to our file, gone once the parent removes it
    return None


def build_network(address: ipaddress.IPv4Interface, mtu: int,
                  address6: ipaddress.IPv6Interface | None = None, offload: bool = False,
                  extra: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = (),
                  local: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
                  queues: int = 1) -> list[int]:
    """In the current (new) namespace: lo up, a TUN with the addresses as default routes;
    ``extra`` addresses on lo, ``local`` prefixes routed to lo as local (AnyIP). Returns the
    TUN's fds: ``queues`` of them (more than one: a multi-queue device)."""
    from pyroute2 import IPRoute  # only now: unshare needed a single-threaded process

    sysctls = {"net.ipv6.conf.default.router_solicitations": "0",
               "net.ipv6.conf.default.accept_dad": "0",
               "net.ipv6.conf.default.disable_ipv6": "0",
               # Let CMD (uid 0 inside, or unmapped) use ping sockets.
               "net.ipv4.ping_group_range": "0 2147483647"}
    if any(n.version == 6 for n in local):
        # IPv4 binds to any address of a local route; IPv6 only to addresses on an interface,
        # unless this says otherwise. (A server bound to :: answers the whole prefix either way.)
        sysctls["net.ipv6.ip_nonlocal_bind"] = "1"
    write_sysctls(sysctls)
    tun_fd, name = open_tun(TUN_NAME, offload, multi_queue=queues > 1)
    fds = [tun_fd] + [open_tun(name, offload, multi_queue=True)[0] for _ in range(queues - 1)]
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        for a in extra:
            ipr.addr("add", index=lo, address=str(a.ip), prefixlen=a.network.prefixlen,
                     **({"flags": IFA_F_NODAD} if a.version == 6 else {}))
        for net in local:  # ip route add local NET dev lo: table local, scope host
            ipr.route("add", dst=str(net), oif=lo, table=RT_TABLE_LOCAL, type="local",
                      scope=RT_SCOPE_HOST, family=socket.AF_INET6 if net.version == 6
                      else socket.AF_INET)
        idx = ipr.link_lookup(ifname=name)[0]
        if offload:
            ipr.link("set", index=idx, gso_max_size=vnet.GSO_MAX_SIZE)
        ipr.link("set", index=idx, mtu=mtu, state="up")
        ipr.addr("add", index=idx, address=str(address.ip), prefixlen=address.network.prefixlen)
        ipr.route("add", dst="0.0.0.0/0", oif=idx)
        if address6 is not None:
            ipr.addr("add", index=idx, address=str(address6.ip),
                     prefixlen=address6.network.prefixlen, flags=IFA_F_NODAD)
            ipr.route("add", dst="::/0", oif=idx, family=socket.AF_INET6)
    return fds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ipferry-sandbox", description=__doc__)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--address", type=ipaddress.IPv4Interface, required=True)
    parser.add_argument("--address6", type=ipaddress.IPv6Interface)
    parser.add_argument("--extra-address", type=ipaddress.ip_interface, action="append",
                        default=[], help="another address, on lo")
    parser.add_argument("--local-route", type=ipaddress.ip_network, action="append", default=[],
                        help="a prefix made local (AnyIP)")
    parser.add_argument("--mtu", type=int, default=65520)
    parser.add_argument("--offload", action="store_true",
                        help="virtio-net headers, TSO and partial checksums on the TUN")
    parser.add_argument("--queues", type=int, default=1, choices=range(1, 65), metavar="N",
                        help="a multi-queue TUN of N queues (fds tun, tun:1, ...)")
    parser.add_argument("--resolv-conf", metavar="FILE",
                        help="bind FILE over /etc/resolv.conf in a private mount namespace")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    control = socket.socket(fileno=args.control_fd)
    dns_warning = None
    try:
        enter_user_and_net_namespace()
        if args.resolv_conf is not None:
            # (before build_network: unshare wants a single-threaded process)
            dns_warning = private_resolv_conf(args.resolv_conf)
        tun_fds = build_network(args.address, args.mtu, args.address6, args.offload,
                                args.extra_address, args.local_route, args.queues)
    except HostError as exc:
        fdpass.send(control, "error", {"cause": exc.cause, "fix": exc.fix})
        return 2
    except OSError as exc:
        fdpass.send(control, "error", {"cause": f"cannot build the namespace's network: {exc}",
                                       "fix": "see the cause"})
        return 2
    fdpass.send(control, "tun", {"pid": os.getpid(), "dns_warning": dns_warning},
                {("tun" if i == 0 else f"tun:{i}"): fd for i, fd in enumerate(tun_fds)})
    for fd in tun_fds:
        os.close(fd)
    control.close()
    import prctl
    prctl.set_pdeathsig(signal.SIGTERM)  # we go when ipferry connect goes
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(command[0], command)
        except OSError as exc:
            print(f"ipferry connect: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
            os._exit(127)
    # We stay as the namespace's keeper: the command's signals are passed on, and once it has
    # exited its orphaned sockets get the time to deliver what they still hold.
    reaped: list[bool] = []

    def pass_on(signum: int, _frame) -> None:
        if not reaped:  # once CMD is reaped its pid may be someone else's
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass  # CMD has just exited: we only wait for its sockets now

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, pass_on)
    _, status = os.waitpid(pid, 0)
    reaped.append(True)
    wait_for_orphans()
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else \
        128 + os.WTERMSIG(status)


# TCP states (as /proc/net/tcp writes them) of a closed socket that still owes its peer data
# or a FIN: FIN_WAIT1, LAST_ACK, CLOSING.
_OWING = {"04", "09", "0B"}
ORPHAN_LINGER = 10.0


def wait_for_orphans(limit: float = ORPHAN_LINGER) -> None:
    """Until no socket of this namespace still owes data or a FIN (at most ``limit`` s)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        owing = False
        for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
            try:
                with open(table) as f:
                    next(f)
                    owing = owing or any(line.split()[3] in _OWING for line in f)
            except (OSError, StopIteration):
                continue
        if not owing:
            return
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
