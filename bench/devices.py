"""Device to device: two devices of a tenant's private network, and what the kernel does between
two namespaces, for bench/run's ``devices-*`` transports.

- ``devices-ip-w1``/``-w2``: a daemon (``--workers 1``/``2``, no capabilities, in the server
  namespace) with a ``[[networks]]`` entry for the tenant; a device ``ipferry connect --address
  10.77.0.2`` holds the iperf3 and rr.py servers, another device of the tenant (no address of its
  own choosing) the clients: their packets go through the daemon as IP packets.
- ``devices-stream-w1``/``-w2``: the same with a ``[[rules]]`` entry ``layer = "stream"`` for the
  tenant's TCP, so that TCP flows are upgraded at the client device's tunnel and downgraded again
  into the serving device's.
- ``devices-veth``: two namespaces joined by a veth pair, the same addresses: the limit.
- ``devices-wireguard``: two namespaces, a veth pair as the underlay and kernel WireGuard
  (``ip link add type wireguard``, keys and peers set with ``wg``) between them, the same
  addresses on the WireGuard links; only where the kernel has WireGuard (:func:`wireguard_missing`).

Every namespace is made for the run and deleted by the :class:`testbed.Reaper`; the devices'
``ipferry connect`` runs in the server namespace without capabilities, as the other transports'.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import time
from pathlib import Path

from testbed import (
    IPERF_PORT,
    IPFERRY,
    KEEPER,
    NO_CAPS,
    PYTHON,
    RR,
    RR_PORT,
    Client,
    IpferryDaemon,
    NetNs,
    Reaper,
    ServerNamespace,
    Transport,
    in_netns,
    proc_children,
    sh,
    sysctl,
    wait_for_keeper,
)

TENANT = "bench"
NETWORK = "10.77.0.0/16"
DEVICE_ADDR = "10.77.0.2"  # the serving device (iperf3 -s, rr.py serve)
CLIENT_ADDR = "10.77.0.3"  # the other end, where the kernel's peers need one given
UNDERLAY = ("10.78.0.1", "10.78.0.2")  # WireGuard's veth underlay, /30
WG_PORT = 51820
WG_OVERHEAD = 80  # IPv6 outer header, UDP, WireGuard's own: the worst case, as wg-quick assumes
MAX_LINK_MTU = 65535
IDS = ["devices-ip-w1", "devices-ip-w2", "devices-stream-w1", "devices-stream-w2",
       "devices-veth", "devices-wireguard"]
LIMIT = "devices-veth"
NETWORKS = f'\n[[networks]]\ntenant = "{TENANT}"\ncidr = "{NETWORK}"\n'
STREAM_RULE = (f'\n[[rules]]\naction = "allow"\ntenant = "{TENANT}"\nprotocol = "tcp"\n'
               f'layer = "stream"\n')
PORT_RANGE = {"net.ipv4.ip_local_port_range": "1024 65535", "net.ipv4.tcp_tw_reuse": "1"}


def is_device(transport_id: str) -> bool:
    return transport_id.startswith("devices-")


def wait_listening(netns: str, port: int, proc: subprocess.Popen, what: str,
                   timeout: float = 10) -> None:
    """Until something listens on TCP ``port`` in ``netns`` (``ss``, iproute2)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        res = subprocess.run(in_netns(netns, "ss", "-Hltn", f"sport = :{port}"),
                             capture_output=True, text=True)
        if res.returncode == 0 and res.stdout.strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} not listening on port {port} after {timeout}s")


class Servers:
    """iperf3 -s and rr.py serve on ``addr`` inside ``netns`` (entered as root, like the servers of
    the server namespace)."""

    def __init__(self, reaper: Reaper, netns: str, addr: str, log_dir: Path, tag: str) -> None:
        self.reaper, self.netns, self.addr = reaper, netns, addr
        self.log_dir, self.tag = log_dir, tag
        self.iperf: subprocess.Popen | None = None
        self.start_iperf()
        self.rr = reaper.popen(in_netns(netns, PYTHON, RR, "serve", "--host", addr, "--port",
                                        str(RR_PORT)), log=log_dir / f"{tag}-rr-server.log")
        wait_listening(netns, RR_PORT, self.rr, "rr.py serve")

    def start_iperf(self) -> None:
        if self.iperf is not None:
            self.reaper.stop(self.iperf, grace=1)
        self.iperf = self.reaper.popen(in_netns(self.netns, "iperf3", "-s", "-B", self.addr, "-p",
                                                str(IPERF_PORT)),
                                       log=self.log_dir / f"{self.tag}-iperf3-server.log")
        wait_listening(self.netns, IPERF_PORT, self.iperf, "iperf3 -s")

    def close(self) -> None:
        for proc in (self.iperf, self.rr):
            if proc is not None:
                self.reaper.stop(proc, grace=1)


class IpferryDevices(Transport):
    """Two devices of the tenant through one daemon, as IP packets or as streams."""

    needs = ("nsenter", "setpriv", "ss")

    def __init__(self, server: ServerNamespace, reaper: Reaper, tmp: Path, workers: int,
                 layer: str) -> None:
        self.reaper, self.tmp, self.layer = reaper, tmp, layer
        self.id = f"devices-{layer}-w{workers}"
        self.label = f"ipferry {'IP packets' if layer == 'ip' else 'streams'} w={workers}"
        self.daemon = IpferryDaemon(server, reaper, workers, None,
                                    extra_config=NETWORKS + (STREAM_RULE if layer == "stream"
                                                             else ""))

    def start(self) -> None:
        self.daemon.start()

    def _device(self, mtu: int, role: str, *options: str) -> tuple[subprocess.Popen, int]:
        log = self.tmp / f"{self.id}-{role}.log"
        launcher = self.reaper.popen(
            in_netns(self.daemon.server.path, *NO_CAPS, IPFERRY, "connect", "--tunnel",
                     self.daemon.tunnel, "--tenant", TENANT, "--mtu", str(mtu), *options, "--",
                     *KEEPER), log=log)
        try:
            return launcher, wait_for_keeper(launcher)
        except RuntimeError as exc:
            self.reaper.stop(launcher)
            raise RuntimeError(f"ipferry connect ({role}) {exc}: "
                               f"{log.read_text()[-500:]}") from None

    def _wait_route(self, launcher: subprocess.Popen, timeout: float = 20) -> None:
        """Until the daemon routes the serving device's address (its tunnel is connected)."""
        assert self.daemon.daemon is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if launcher.poll() is not None:
                raise RuntimeError(f"the serving device exited ({launcher.returncode})")
            rows = self.daemon.daemon.get_json(f"/api/routes?tenant={TENANT}")["routes"]
            if any(r["prefix"] == f"{DEVICE_ADDR}/32" for r in rows):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the daemon did not list {DEVICE_ADDR}/32 in {timeout}s")

    def open(self, mtu: int) -> Client:
        started: list[subprocess.Popen] = []
        servers: Servers | None = None

        def close() -> None:
            if servers is not None:
                servers.close()
            for proc in reversed(started):
                self.reaper.stop(proc)

        try:
            srv_launcher, srv_keeper = self._device(mtu, "server", "--address", DEVICE_ADDR)
            started.append(srv_launcher)
            self._wait_route(srv_launcher)
            servers = Servers(self.reaper, f"/proc/{srv_keeper}/ns/net", DEVICE_ADDR, self.tmp,
                              self.id)
            cli_launcher, cli_keeper = self._device(mtu, "client")
            started.append(cli_launcher)
        except BaseException:
            close()
            raise
        keepers = {srv_keeper, cli_keeper}

        def pids() -> list[int]:
            # the daemon, both connect processes (their pump threads), not their keepers
            own = [p for launcher in started
                   for p in (launcher.pid, *proc_children(launcher.pid)) if p not in keepers]
            return self.daemon.pids() + own

        return Client(f"/proc/{cli_keeper}/ns/net", pids, close, server=DEVICE_ADDR,
                      restart_iperf=servers.start_iperf)

    def counters(self) -> dict[str, float]:
        """How the daemon carried the run's flows (its metrics since it started): packets routed
        between devices each way, and flows downgraded into a device's tunnel. The proof that a
        layer's figures are that layer's."""
        if self.daemon.daemon is None:
            return {}
        out = {"routed_to_device": 0.0, "routed_to_client": 0.0, "flows_downgraded": 0.0}
        for (name, labels), value in self.daemon.daemon.metrics().items():
            if name == "ipferry_routed_packets_total":
                direction = dict(labels).get("direction", "")
                if f"routed_{direction}" in out:
                    out[f"routed_{direction}"] += value
            elif name == "ipferry_flows_downgraded_total":
                out["flows_downgraded"] += value
        return out


class _TwoNamespaces(Transport):
    """Two namespaces of the run's own, the servers in the first, the clients in the second."""

    def __init__(self, reaper: Reaper, tmp: Path) -> None:
        self.reaper, self.tmp = reaper, tmp
        tag = os.getpid()
        self.names = (f"ipfbench-{tag}-{self.short}a", f"ipfbench-{tag}-{self.short}b")
        self.veth = (f"ipfb{tag}{self.short}a", f"ipfb{tag}{self.short}b")
        self.ns: tuple[NetNs, NetNs] | None = None
        self.servers: Servers | None = None

    short = ""

    def _namespaces(self) -> tuple[NetNs, NetNs]:
        a, b = (self.reaper.netns(n) for n in self.names)
        self.ns = (a, b)
        sh("ip", "link", "add", self.veth[0], "netns", a.name, "type", "veth", "peer", "name",
           self.veth[1], "netns", b.name)
        for ns, dev in zip(self.ns, self.veth, strict=True):
            sh("ip", "-n", ns.name, "link", "set", dev, "up")
            sysctl(ns.path, PORT_RANGE)
        return a, b

    def _client(self) -> Client:
        assert self.ns is not None and self.servers is not None
        return Client(self.ns[1].path, lambda: [], lambda: None, server=DEVICE_ADDR,
                      restart_iperf=self.servers.start_iperf)


class DevicesVeth(_TwoNamespaces):
    """The two devices' namespaces joined by a veth pair: the kernel's shortest path, the limit."""

    id, label, needs = "devices-veth", "veth (limit)", ("ip", "nsenter", "ss")
    short = "dv"

    def start(self) -> None:
        a, b = self._namespaces()
        sh("ip", "-n", a.name, "addr", "add", f"{DEVICE_ADDR}/24", "dev", self.veth[0])
        sh("ip", "-n", b.name, "addr", "add", f"{CLIENT_ADDR}/24", "dev", self.veth[1])
        self.servers = Servers(self.reaper, a.path, DEVICE_ADDR, self.tmp, self.id)

    def open(self, mtu: int) -> Client:
        assert self.ns is not None
        for ns, dev in zip(self.ns, self.veth, strict=True):
            sh("ip", "-n", ns.name, "link", "set", dev, "mtu", str(mtu))
        return self._client()


def wireguard_missing() -> str | None:
    """Why kernel WireGuard cannot be measured here (None: it can): a link of type wireguard is
    made, and deleted, in a namespace of its own."""
    name = f"ipfbench-{os.getpid()}-wgprobe"
    try:
        ns = NetNs(name)
    except subprocess.CalledProcessError as exc:
        return f"could not make a namespace to probe WireGuard in ({exc})"
    try:
        res = subprocess.run(["ip", "-n", name, "link", "add", "wgprobe", "type", "wireguard"],
                             capture_output=True, text=True)
    finally:
        ns.delete()
    if res.returncode == 0:
        return None
    why = res.stderr.strip() or f"status {res.returncode}"
    config = kernel_config("CONFIG_WIREGUARD")
    return (f"the kernel cannot make WireGuard links (`ip link add type wireguard`: {why}"
            + (f"; /proc/config.gz: {config}" if config else "") + ")")


def kernel_config(option: str) -> str | None:
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            for line in f:
                if line.startswith(f"{option}=") or line.startswith(f"# {option} is not set"):
                    return line.strip()
    except OSError:
        return None
    return None


class DevicesWireGuard(_TwoNamespaces):
    """Kernel WireGuard between the two namespaces over a veth underlay."""

    id, label, needs = "devices-wireguard", "WireGuard (kernel)", ("ip", "nsenter", "ss", "wg")
    short = "wg"

    def probe(self) -> str | None:
        return wireguard_missing()

    def start(self) -> None:
        a, b = self._namespaces()
        keys_dir = self.reaper.tmpdir()
        for ns, dev, addr in zip(self.ns or (), self.veth, UNDERLAY, strict=True):
            sh("ip", "-n", ns.name, "addr", "add", f"{addr}/30", "dev", dev)
        publics = []
        for i, ns in enumerate((a, b)):
            key = keys_dir / f"wg{i}.key"
            private = subprocess.run(["wg", "genkey"], capture_output=True, text=True,
                                     check=True).stdout
            key.write_text(private)
            os.chmod(key, 0o600)
            publics.append(subprocess.run(["wg", "pubkey"], input=private, capture_output=True,
                                          text=True, check=True).stdout.strip())
            sh("ip", "-n", ns.name, "link", "add", "wg0", "type", "wireguard")
        for i, (ns, addr) in enumerate(((a, DEVICE_ADDR), (b, CLIENT_ADDR))):
            other = 1 - i
            peer_addr = CLIENT_ADDR if i == 0 else DEVICE_ADDR
            sh(*in_netns(ns.path, "wg", "set", "wg0", "private-key", str(keys_dir / f"wg{i}.key"),
                         "listen-port", str(WG_PORT), "peer", publics[other], "allowed-ips",
                         f"{peer_addr}/32", "endpoint", f"{UNDERLAY[other]}:{WG_PORT}"))
            sh("ip", "-n", ns.name, "addr", "add", f"{addr}/24", "dev", "wg0")
            sh("ip", "-n", ns.name, "link", "set", "wg0", "up")
        self.servers = Servers(self.reaper, a.path, DEVICE_ADDR, self.tmp, self.id)

    def open(self, mtu: int) -> Client:
        assert self.ns is not None
        wg_mtu = min(mtu, MAX_LINK_MTU - WG_OVERHEAD)
        for ns, dev in zip(self.ns, self.veth, strict=True):
            sh("ip", "-n", ns.name, "link", "set", dev, "mtu", str(wg_mtu + WG_OVERHEAD))
            sh("ip", "-n", ns.name, "link", "set", "wg0", "mtu", str(wg_mtu))
        return self._client()


def build(ids: list[str], server: ServerNamespace, reaper: Reaper, tmp: Path) -> list[Transport]:
    """The chosen device transports, in table order."""
    out: list[Transport] = []
    for tid in IDS:
        if tid not in ids:
            continue
        if tid == "devices-veth":
            out.append(DevicesVeth(reaper, tmp))
        elif tid == "devices-wireguard":
            out.append(DevicesWireGuard(reaper, tmp))
        else:
            _, layer, w = tid.split("-")
            out.append(IpferryDevices(server, reaper, tmp, int(w[1:]), layer))
    return out


def wireguard_version() -> str:
    if shutil.which("wg") is None:
        return "not installed"
    res = subprocess.run(["wg", "--version"], capture_output=True, text=True)
    return (res.stdout or res.stderr).strip().splitlines()[0] if res.returncode == 0 else "unknown"
