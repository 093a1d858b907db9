"""The ``ipferry`` command: run the daemon, check a config, and talk to a running daemon."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import textwrap

from pydantic import ValidationError

from ipferry.wire.dns import DNS_ADDRESS4, DNS_ADDRESS6
from ipferry.wire.gue import (
    DEFAULT_SENDER_PORTS,
    MAX_CONTEXT,
    MAX_SENDER_PORTS,
    MAX_VNET_CONTEXT,
)

from . import config as configmod

DESCRIPTION = """\
ipferry carries traffic across OSI layers: it on-ramps raw IP packets from tunnels, tracks
flows per tenant, upgrades them into real TCP streams through the kernel of an unprivileged
user+network namespace, and off-ramps them at any layer. It needs no privileges.
"""

EPILOG = """\
examples:
  ipferry run                              built-in default: a tunnel on-ramp, admin on :9180
  ipferry run --config /etc/ipferry/ipferry.toml --workers 4
  ipferry check-config /etc/ipferry/ipferry.toml
  ipferry status                           ask the running daemon (over its admin unix socket)
  ipferry reload                           re-read the config (same as SIGHUP)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipferry", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground (supervisor, nsd, workers)",
                         description="Run the supervisor in the foreground. It binds the on-ramps, "
                         "starts nsd and the workers, serves the admin API and stops cleanly on "
                         "SIGTERM; SIGHUP reloads the config.")
    run.add_argument("--config", "-c", metavar="FILE",
                     help="TOML config (default: built-in: one tunnel on-ramp at "
                          "$RUNTIME_DIRECTORY/tunnel.sock, else $XDG_RUNTIME_DIR/ipferry/tunnel.sock,"
                          " else /run/ipferry/tunnel.sock; admin on 127.0.0.1:9180)")
    run.add_argument("--workers", "-w", type=int, metavar="N",
                     help="number of worker processes (default: config, else the number of CPUs)")
    run.add_argument("--admin-listen", metavar="HOST:PORT",
                     help="admin HTTP listener, loopback only; '' disables TCP admin")
    run.add_argument("--log-format", choices=["json", "console"],
                     help="log format (default: config, else json lines)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                     help="least severe log lines written (default: config, else info)")

    check = sub.add_parser("check-config", help="validate a config file without starting",
                           description="Validate a config file; exit 0 if it would start, else "
                           "print each problem (file:line: key = value: reason) and exit 2.")
    check.add_argument("file", help="the TOML config to check, as `ipferry run --config` reads it")

    def admin_client(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--admin", metavar="PATH|HOST:PORT",
                       help="the daemon's admin unix socket (default: <runtime dir>/admin.sock), "
                            "or its TCP listener as HOST:PORT, [IPV6]:PORT or http://HOST:PORT")
        p.add_argument("--token", default=os.environ.get("IPFERRY_ADMIN_TOKEN"),
                       help="bearer token for mutating calls over TCP (env IPFERRY_ADMIN_TOKEN)")
        return p

    connect = sub.add_parser(
        "connect", help="run a command whose every packet goes through the daemon's tunnel",
        description="\n\n".join(textwrap.fill(p, 79, break_on_hyphens=False) for p in (
            "Run CMD in a fresh, unprivileged user+net namespace whose IPv4 and IPv6 default "
            "routes are a TUN device; every packet it sends is carried to the daemon over a "
            "connected IP tunnel (the context first, then raw IP packets), or with --gue over UDP "
            "to the daemon's GUE on-ramp, and the daemon's replies come back the same way. Exits "
            "with CMD's status. Like pasta or slirp4netns, but policy-checked and audited.",
            "Devices: with --address the namespace is a device of the tenant's private network "
            "at that address (instead of a random one), and the tunnel's context claims it, "
            'with every --route, as "routes": ["10.77.0.2/32", ...]; the daemon carries flows '
            "to a claimed address (within the tenant's [[networks]]) into this tunnel, so "
            "another device of the tenant reaches a server CMD runs there. With --gue the "
            "context carries no routes (the daemon takes a GUE site's prefixes from its "
            "[[sites]] config, naming the sender as HOST:PORT: see --gue-port); --address and "
            "--route still shape the namespace.",
            "Names: CMD gets its own /etc/resolv.conf (bind-mounted in a private mount "
            "namespace; nothing on the host changes) naming the daemon's resolver inside the "
            f"tunnel network, {DNS_ADDRESS4} and {DNS_ADDRESS6}, which forwards to the resolvers of "
            "the daemon's host, or the --dns addresses; the host's search, domain and options "
            "lines are kept, /etc/hosts stays the host's. With --no-dns CMD reads the host's "
            "resolv.conf as it is: a loopback resolver there (systemd-resolved's 127.0.0.53) "
            "is then unreachable, the namespace's loopback being its own.")),
        epilog="examples:\n"
               "  ipferry connect --tenant acme -- curl http://198.18.0.1/\n"
               "  ipferry connect --gue 127.0.0.1:6080 --tenant acme -- ping -c 3 198.18.0.1\n"
               "\n"
               "  a private network: a server on a device of acme (one shell) ...\n"
               "  ipferry connect --tenant acme --address 10.77.0.2 -- python3 -m http.server "
               "8000\n"
               "  ... reached from another device of acme (another shell):\n"
               "  ipferry connect --tenant acme -- curl http://10.77.0.2:8000/\n"
               "\n"
               "  a GUE site (its [[sites]] entry in the daemon's config names 127.0.0.1:7001):\n"
               "  ipferry connect --gue 127.0.0.1:6080 --gue-port 7001 --tenant acme \\\n"
               "      --address 10.77.5.1 --route 10.77.5.0/24 -- python3 -m http.server 8000",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    how = connect.add_mutually_exclusive_group()
    how.add_argument("--tunnel", metavar="PATH",
                     help="the daemon's connected tunnel on-ramp (default: as `ipferry run` "
                          "binds it)")
    how.add_argument("--gue", metavar="HOST:PORT",
                     help="use the daemon's unconnected GUE on-ramp at HOST:PORT instead (UDP; "
                          "the context rides in every datagram's GUE header: at most "
                          f"{MAX_VNET_CONTEXT} bytes of JSON with offload, {MAX_CONTEXT} with "
                          "--no-offload; it never carries routes). Before CMD starts, one probe "
                          "checks that the on-ramp carries the tunnel: nothing listening there is "
                          "an error, no answer within 3 s a warning naming the likely causes")
    connect.add_argument("--gue-port", metavar="PORT",
                         help="with --gue: send from this local UDP port (default: any), so the "
                              "daemon's config can name this sender as a [[sites]] entry's "
                              "HOST:PORT; every flow then leaves from it")
    connect.add_argument("--gue-ports", metavar="N", type=int,
                         help=f"with --gue: spread the flows over N local UDP ports (default "
                              f"{DEFAULT_SENDER_PORTS}, at most {MAX_SENDER_PORTS}; 1 is a single "
                              f"sender), each flow on the one its hash picks (RFC 8086's "
                              f"entropy), so that a router's ECMP hash in front of several "
                              f"ipferry nodes spreads the flows over them and keeps each on one")
    connect.add_argument("--tenant", default="default",
                         help="tenant of the tunnel's context (default: %(default)s)")
    connect.add_argument("--context", metavar="JSON", default="{}",
                         help="more context, a JSON object merged under the tenant (its "
                              '"routes", if any, go as they are; not with --address/--route, '
                              "nor --gue)")
    connect.add_argument("--mtu", type=int,
                         help="MTU of the TUN (default 65520; with --gue the largest packet a "
                              "datagram carries, 65507 minus the GUE header)")
    connect.add_argument("--address", metavar="ADDR", action="append", default=[],
                         help="an address of the namespace, IPv4 or IPv6, claimed as a route "
                              "(/32, /128) on a connected tunnel; repeatable: the first of each "
                              "family is CMD's source address, the others are added for servers "
                              "to bind (default: random in 10.98.0.0/16 and fd98::/16, unclaimed)")
    connect.add_argument("--source", metavar="ADDR", action="append", default=[],
                         help="CMD's source address, IPv4 or IPv6, as the first --address of its "
                              "family would be, but claimed by nothing (no \"routes\"): a fixed "
                              "client address for audit records and rules; at most one per "
                              "family, and not with an --address of that family")
    connect.add_argument("--route", metavar="CIDR", action="append", default=[],
                         help="a prefix claimed as a route on a connected tunnel and local in "
                              "the namespace (AnyIP: a server there answers every address in "
                              "it); repeatable")
    connect.add_argument("--no-offload", dest="offload", action="store_false",
                         help="plain packets through the tunnel (connected or GUE), one per MTU "
                              "(default: TSO superframes of up to 64 KB with partial checksums, "
                              "whatever the MTU; much faster at small MTUs)")
    connect.add_argument("--no-attach", dest="attach", action="store_false",
                         help="on a connected tunnel, copy packets between the TUN and the "
                              "tunnel socket here (the protocol any other client speaks) "
                              "instead of passing the TUN to the daemon, which then reads and "
                              "writes it itself, one queue per worker (default; 2-4x less "
                              "CPU per packet)")
    connect.add_argument("--address6", metavar="IPV6", action="append", default=[],
                         help="as --address, for an IPv6 address only")
    connect.add_argument("--dns", metavar="ADDR", action="append", default=[],
                         help="a resolver for CMD's /etc/resolv.conf, IPv4 or IPv6, reached "
                              "through the tunnel; repeatable, at most 3 (default: the "
                              f"daemon's, {DNS_ADDRESS4} and {DNS_ADDRESS6})")
    connect.add_argument("--no-dns", action="store_true",
                         help="leave CMD the host's /etc/resolv.conf (a loopback stub resolver "
                              "there, such as systemd-resolved's 127.0.0.53, is unreachable from "
                              "the namespace)")
    connect.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    admin_client("status", "show the running daemon's readiness, nsd and workers")
    routes = admin_client("routes", "list the private networks' routes: which device holds which "
                                    "prefix")
    routes.add_argument("--tenant", help="only this tenant's networks and routes")
    admin_client("reload", "make the running daemon re-read its config (like SIGHUP)")
    restart = admin_client("restart-worker", "restart one worker of the running daemon gracefully")
    restart.add_argument("index", type=int,
                         help="the worker's index, as `ipferry status` lists it (worker 0, 1, ...)")
    top = admin_client("top", "a refreshing view of the running daemon: workers, drops by reason, "
                              "tunnels and the busiest flows with their rates")
    top.add_argument("--once", action="store_true",
                     help="print one snapshot and exit (plain text when not a terminal): two "
                          "samples --interval apart, for the rates")
    top.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                     help="seconds between samples; rates are over this interval (default: "
                          "%(default)s; with --once, 0 takes one sample and shows no rates)")
    top.add_argument("--sort", choices=["rate", "packets", "bytes", "duration"], default="rate",
                     help="order of the flows: byte rate, packet rate, bytes so far or age, "
                          "largest first (default: %(default)s; keys b, p, t, d in the view)")
    top.add_argument("--limit", type=int, default=20, metavar="N",
                     help="show the N busiest flows, and at most N tunnels and drop reasons "
                          "(default: %(default)s)")
    top.add_argument("--tenant", help="only this tenant's flows and tunnels (workers and drops "
                                      "stay those of all)")
    top.add_argument("--max-flows", type=int, default=10_000, metavar="N",
                     help="read at most N flows per sample (200 a request) to rank and rate "
                          "(default: %(default)s)")
    top.formatter_class = argparse.RawDescriptionHelpFormatter
    top.description = textwrap.fill(
        "A refreshing view of the running daemon, from its admin API: readiness, nsd and the "
        "workers (flows, tunnels, bytes/s in and out, CPU, drops/s), drops by reason, the "
        "busiest tunnels and the busiest flows with their byte and packet rates, computed from "
        "two successive samples of /api/flows (and /metrics, /api/tunnels).", 79)
    top.epilog = ("keys in the view: the order of the flows, b byte rate, p packet rate,\n"
                  "  t bytes so far, d duration; q quits (Ctrl-C too)\n\n"
                  "examples:\n"
                  "  ipferry top\n"
                  "  ipferry top --admin /run/ipferry/admin.sock --tenant acme --sort packets\n"
                  "  ipferry top --once --interval 1 --limit 5 > snapshot.txt")
    return parser


def cmd_check_config(args) -> int:
    try:
        cfg = configmod.load(args.file)
        n = cfg.worker_count()
        cfg.check_startable()  # what `run` refuses too (check_runtime, less the token file)
    except configmod.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"{args.file}: ok ({_plural(n, 'worker')}, on-ramps: "
          f"{', '.join(f'{o.name} at {_where(o)}' for o in cfg.onramps)})")
    return 0


def cmd_run(args) -> int:
    # Lazy for start-up time: only `ipferry run` needs the supervisor (aiohttp, the workers'
    # modules) and structlog; connect, check-config and the admin commands start without them.
    from ipferry.runtime.lifecycle import raise_fd_limit, set_title
    from ipferry.runtime.logs import configure

    from .arbiter import StartupError, Supervisor

    log_overrides = {k: v for k, v in (("format", args.log_format), ("level", args.log_level))
                     if v}
    try:
        cfg = configmod.load(args.config)
        if log_overrides:
            cfg = cfg.model_copy(update={"logging": cfg.logging.model_copy(update=log_overrides)})
        if args.admin_listen is not None:
            configmod.Admin(listen=args.admin_listen)  # the same loopback-only check as the file
        if args.workers is not None and args.workers < 1:
            raise configmod.ConfigError(f"--workers {args.workers}: must be at least 1")
        cfg.worker_count(args.workers)
        cfg.check_runtime()
    except configmod.ConfigError as exc:
        print(f"ipferry: refusing to start:\n{exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"ipferry: refusing to start: --admin-listen {args.admin_listen!r}: "
              f"{exc.errors()[0]['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2

    set_title("ipferry: supervisor")
    raise_fd_limit()
    configure("supervisor", fmt=cfg.logging.format, level=cfg.logging.level, node=cfg.node)

    class SayWhyFirst(Supervisor):
        async def start(self) -> None:
            try:
                await super().start()
            except StartupError as exc:
                # The reason goes in the log before the shutdown's stopping/stopped lines; the
                # one line below, after them, stays the last word.
                self.log.error("cannot_start", reason=str(exc))
                raise

    async def main() -> int:
        supervisor = SayWhyFirst(cfg, args.config, workers=args.workers,
                                 admin_listen=args.admin_listen, log_overrides=log_overrides)
        return await supervisor.run()

    try:
        return asyncio.run(main())
    except StartupError as exc:
        print(f"ipferry: cannot start: {exc}", file=sys.stderr)
        return 1


def cmd_connect(args) -> int:
    import json
    from pathlib import Path

    # Lazy for start-up time: the other commands need none of the connect client.
    from ipferry.nsd.connect import (
        DEFAULT_DNS,
        ConnectError,
        addressing,
        parse_dns,
        run,
        tunnel_context,
    )

    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        print("ipferry connect: no command given (ipferry connect [OPTIONS] -- CMD [ARGS...])",
              file=sys.stderr)
        return 2
    try:
        extra = json.loads(args.context)
        if not isinstance(extra, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        print(f"ipferry connect: bad --context: {exc}", file=sys.stderr)
        return 2
    try:
        for a in args.address6:
            if ":" not in a:
                raise ValueError(f"--address6 {a}: not an IPv6 address")
        claims = addressing([*args.address, *args.address6], args.route, args.source)
        context = tunnel_context(extra, args.tenant, claims, gue=args.gue is not None)
        gue_port = None
        if args.gue_port is not None:
            if args.gue is None:
                raise ValueError(f"--gue-port {args.gue_port}: only with --gue HOST:PORT")
            if not args.gue_port.isdigit() or not 1 <= int(args.gue_port) <= 65535:
                raise ValueError(f"--gue-port {args.gue_port}: not a port (1..65535)")
            gue_port = int(args.gue_port)
        gue_ports = DEFAULT_SENDER_PORTS
        if args.gue_ports is not None:
            if args.gue is None:
                raise ValueError(f"--gue-ports {args.gue_ports}: only with --gue HOST:PORT")
            if gue_port is not None and args.gue_ports != 1:
                raise ValueError(f"--gue-ports {args.gue_ports} and --gue-port {gue_port}: a "
                                 f"fixed port is one sender (a site): give one of them")
            if not 1 <= args.gue_ports <= MAX_SENDER_PORTS:
                raise ValueError(f"--gue-ports {args.gue_ports}: must be within "
                                 f"1..{MAX_SENDER_PORTS}")
            gue_ports = args.gue_ports
        if args.no_dns and args.dns:
            raise ValueError(f"--dns {args.dns[0]} and --no-dns: give one of them")
        dns = None if args.no_dns else (parse_dns(args.dns) if args.dns else list(DEFAULT_DNS))
    except ValueError as exc:
        print(f"ipferry connect: {exc}", file=sys.stderr)
        return 2
    if args.mtu is not None and not 1280 <= args.mtu <= 65520:
        print(f"ipferry connect: --mtu {args.mtu}: must be within 1280..65520", file=sys.stderr)
        return 2
    try:
        return run(command, tunnel_path=Path(args.tunnel) if args.tunnel else None,
                   context=context, mtu=args.mtu, address=claims.address,
                   address6=claims.address6, gue=args.gue, offload=args.offload,
                   extra=claims.extra, local=claims.local, gue_port=gue_port,
                   gue_ports=gue_ports, dns=dns,
                   attach=args.attach)
    except ConnectError as exc:
        print(f"ipferry connect: {exc}", file=sys.stderr)
        return 1


def cmd_admin(args) -> int:
    from .adminclient import AdminClientError, call  # lazy for start-up time: only these commands

    try:
        if args.command == "status":
            status, body = call(args.admin, "GET", "/api/status", args.token)
            if status == 200:
                print(format_status(body))
                return 0 if body["ready"] else 1
        elif args.command == "routes":
            return print_routes(call, args)
        elif args.command == "reload":
            status, body = call(args.admin, "POST", "/api/reload", args.token)
            if status == 200:
                print(body["message"])
                return 0
            if status == 422:
                print(f"reload refused; the daemon keeps its running config:\n{body['message']}",
                      file=sys.stderr)
                return 1
        else:
            status, body = call(args.admin, "POST", f"/api/workers/{args.index}/restart",
                                args.token)
            if status == 202:
                print(f"worker {args.index} (pid {body['pid']}) is restarting")
                return 0
    except AdminClientError as exc:
        print(f"ipferry: {exc}", file=sys.stderr)
        return 1
    print(f"ipferry: admin API answered {status}: {body}", file=sys.stderr)
    return 1


def print_routes(call, args) -> int:
    """Every page of ``/api/routes``, as a table (the networks first)."""
    from urllib.parse import quote

    query = f"tenant={quote(args.tenant, safe='')}&" if args.tenant is not None else ""
    after, shown, networks = None, 0, None
    while True:
        page = f"&after={quote(after, safe='')}" if after else ""
        status, body = call(args.admin, "GET", f"/api/routes?{query}limit=200{page}", args.token)
        if status != 200:
            print(f"ipferry: admin API answered {status}: {body}", file=sys.stderr)
            return 1
        if networks is None:
            networks = body["networks"]
            for n in networks:
                print(f"network {n['tenant']} {n['cidr']}")
            if not networks:
                print("no [[networks]] configured: no private networks")
        for r in body["routes"]:
            holder = (f"site {r['site']}" if r["kind"] == "site"
                      else f"tunnel {r['tunnel']} of worker {r['worker']}")
            print(f"route {r['tenant']} {r['prefix']} -> {holder}")
            shown += 1
        after = body["next"]
        if not after:
            break
    print(_plural(shown, "route"))
    return 0


def _where(onramp) -> str:
    from .listeners import listener_class  # lazy for start-up time, as the commands' imports

    return listener_class(onramp.kind).where(onramp)


def _pid(pid: int | None) -> str:
    """A child's pid, or what stands for none (in backoff, failed or not started yet)."""
    return f"pid {pid}" if pid is not None else "no process"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ipferry")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "(not installed)"


def format_status(body: dict) -> str:
    lines = [f"{'ready' if body['ready'] else 'NOT READY'}: {body['status']} "
             f"(supervisor pid {body['pid']}, config {body['config'] or 'built-in default'})",
             f"nsd: {_pid(body['nsd']['pid'])}, {body['nsd']['state']}, "
             f"restarts {body['nsd']['restarts']}"]
    for w in body["workers"]:
        lines.append(f"worker {w['index']}: {_pid(w['pid'])}, {w['state']}, "
                     f"restarts {w['restarts']}, tun {w['tun']}")
    for o in body["onramps"]:
        where = o.get("address") and f"GUE on udp {o['address']}" or o["path"] or "from systemd"
        lines.append(f"on-ramp {o['name']}: {where}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "check-config":
        return cmd_check_config(args)
    if args.command == "connect":
        return cmd_connect(args)
    if args.command == "top":
        from .top import cmd_top  # lazy for start-up time: only `top` needs rich

        return cmd_top(args)
    return cmd_admin(args)


if __name__ == "__main__":
    sys.exit(main())
