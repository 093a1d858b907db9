"""A fleet of ipferry nodes behind a router's resilient ECMP group, in namespaces made here.

::

    client --veth-- router --veth-- node 1 .. node N   (each: the anycast GUE address on lo,
                      |                                 an ipferry daemon, no capabilities)
                      +--veth-- server                  (198.18.0.1: the upstream servers)

The router reaches the anycast address through a nexthop group of type resilient (``idle_timer
0``: a bucket moves as soon as the group changes) and hashes over the outer addresses and UDP
ports (``fib_multipath_hash_policy = 1``), as docs/scale-out.md configures a router. Nothing
here routes anywhere but between these namespaces. Used by tests/e2e/test_scaleout.py and
bench/scaleout.py.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

from tests.helpers import IPFERRY, NO_CAPS, Daemon, NetNs

ANYCAST = "198.51.100.1"
GUE_PORT = 6080
SERVER = "198.18.0.1"
CLIENT = "10.200.100.2"
GROUP = 100  # the nexthop group's id; node i's nexthop is id i
BUCKETS = 120  # divisible by 1, 2 and 3 nodes: every node's share is whole


def ip(netns: NetNs, *args: str) -> str:
    res = subprocess.run(["ip", "-n", netns.name, *args], capture_output=True, text=True,
                         timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"ip -n {netns.name} {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def sysctl(netns: NetNs, **values: str) -> None:
    for key, value in values.items():
        subprocess.run(["ip", "netns", "exec", netns.name, "sysctl", "-q", "-w",
                        f"{key.replace('__', '.')}={value}"], check=True, capture_output=True,
                       timeout=30)


def node_config(index: int, tmp: Path, workers: int) -> str:
    return f"""\
node = "node-{index}"
workers = {workers}

[audit]
sink = "{tmp / f'audit-{index}.jsonl'}"

[[onramps]]
kind = "gue"
listen = "{ANYCAST}:{GUE_PORT}"
allow = ["10.200.100.0/24"]
tenants = ["acme"]
anycast = true
"""


class Fleet:
    """``count`` nodes behind the router, all in the group; :meth:`close` removes everything.
    ``resilient`` False: a plain multipath group (hash-threshold), to compare what a change
    of nodes moves."""

    def __init__(self, count: int, tmp: Path, workers: int = 1, resilient: bool = True) -> None:
        self.resilient = resilient
        tag = uuid.uuid4().hex[:6]
        self.tmp = tmp
        self.namespaces: list[NetNs] = []
        self.daemons: list[Daemon] = []
        self.router = self._netns(f"ipff-{tag}-r")
        self.server = self._netns(f"ipff-{tag}-s")
        self.client = self._netns(f"ipff-{tag}-c")
        self.nodes = [self._netns(f"ipff-{tag}-n{i}") for i in range(1, count + 1)]
        self.workers = workers
        try:
            self._wire()
        except BaseException:
            self.close()
            raise

    def _netns(self, name: str) -> NetNs:
        ns = NetNs(name)
        self.namespaces.append(ns)
        return ns

    def _link(self, name: str, peer: NetNs, subnet: int) -> None:
        """A veth pair: ``name`` in the router (10.200.subnet.1/30), ``uplink`` in ``peer`` (.2),
        whose default route is the router."""
        r = self.router
        ip(r, "link", "add", name, "type", "veth", "peer", "name", "uplink", "netns", peer.name)
        ip(r, "addr", "add", f"10.200.{subnet}.1/30", "dev", name)
        ip(peer, "addr", "add", f"10.200.{subnet}.2/30", "dev", "uplink")
        ip(r, "link", "set", name, "up")
        ip(peer, "link", "set", "uplink", "up")
        ip(peer, "route", "add", "default", "via", f"10.200.{subnet}.1")

    def _wire(self) -> None:
        # rp_filter off before any device exists: replies from the anycast address come back
        # over whichever node's link, and multipath sources fail a strict check.
        sysctl(self.router, net__ipv4__conf__all__rp_filter="0",
               net__ipv4__conf__default__rp_filter="0", net__ipv4__ip_forward="1",
               net__ipv4__fib_multipath_hash_policy="1")
        self._link("c", self.client, 100)
        self._link("s", self.server, 200)
        ip(self.server, "addr", "add", f"{SERVER}/32", "dev", "lo")
        ip(self.router, "route", "add", f"{SERVER}/32", "via", "10.200.200.2")
        for i, node in enumerate(self.nodes, 1):
            self._link(f"n{i}", node, i)
            ip(node, "addr", "add", f"{ANYCAST}/32", "dev", "lo")
            ip(self.router, "nexthop", "add", "id", str(i), "via", f"10.200.{i}.2", "dev", f"n{i}")
        self.set_group(list(range(1, len(self.nodes) + 1)), verb="add")
        ip(self.router, "route", "add", f"{ANYCAST}/32", "nhid", str(GROUP))

    def start(self) -> None:
        """A daemon on every node (started together, then each waited for)."""
        for i, node in enumerate(self.nodes, 1):
            run = self.tmp / f"run-{i}"
            run.mkdir()
            run.chmod(0o755)
            home = self.tmp / f"node-{i}"
            home.mkdir()
            d = Daemon(node, run, home, config=node_config(i, self.tmp, self.workers),
                       no_caps=True, env=None)
            self.daemons.append(d)
            d.start()
        for d in self.daemons:
            d.wait_ready(60)

    def set_group(self, members: list[int], verb: str = "replace") -> None:
        """The nodes (1-based) the router spreads over now (resilient: only the buckets of a
        node that leaves or joins move)."""
        kind = ["type", "resilient", "buckets", str(BUCKETS), "idle_timer", "0"] \
            if self.resilient else []
        ip(self.router, "nexthop", verb, "id", str(GROUP), "group", "/".join(map(str, members)),
           *kind)

    def buckets(self) -> list[int]:
        """Each bucket's node (1-based), by bucket index."""
        rows = json.loads(ip(self.router, "-j", "nexthop", "bucket", "show", "id", str(GROUP)))
        out = [0] * BUCKETS
        for row in rows:
            out[row["bucket"]["index"]] = row["bucket"]["nhid"]
        return out

    def connect(self, *cmd: str, ports: int = 32, tenant: str = "acme") -> list[str]:
        """``ipferry connect --gue`` from the client namespace, no capabilities, running cmd."""
        return ["nsenter", f"--net={self.client.path}", *NO_CAPS, IPFERRY, "connect", "--gue",
                f"{ANYCAST}:{GUE_PORT}", "--gue-ports", str(ports), "--tenant", tenant, "--",
                *cmd]

    def in_netns(self, netns: NetNs, *cmd: str) -> list[str]:
        return ["nsenter", f"--net={netns.path}", *cmd]

    def audit(self, index: int) -> list[dict]:
        path = self.tmp / f"audit-{index}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] \
            if path.exists() else []

    def flow_starts(self, dport: int) -> dict[int, list[dict]]:
        """Each node's (1-based) flow_start records of flows to ``dport``."""
        return {i: [r for r in self.audit(i) if r["audit"] == "flow_start"
                    and r.get("dport") == dport] for i in range(1, len(self.nodes) + 1)}

    def close(self) -> None:
        for d in self.daemons:
            d.destroy()
        self.daemons.clear()
        for ns in reversed(self.namespaces):
            ns.delete()
        self.namespaces.clear()


def wait_file(path: Path, timeout: float, proc: subprocess.Popen | None = None) -> dict:
    """The JSON ``path`` holds once it exists (AssertionError if ``proc`` exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                return json.loads(path.read_text())
            except ValueError:
                pass  # being written
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise AssertionError(f"the client exited ({proc.returncode}) before {path.name}: "
                                 f"{out[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no {path.name} after {timeout} s")
