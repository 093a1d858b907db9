"""The process architecture, end to end: real processes, namespaces, TUN devices, signals."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import textwrap

import pytest

from tests.helpers import alive, proc_cmdline, wait_for

SEND_UDP = textwrap.dedent("""\
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(int(sys.argv[2])):
        s.sendto(b"x" * 100, (sys.argv[1], 9))
""")


def tun_rx(metrics: dict, worker: int) -> float:
    return metrics.get(("ipferry_tun_packets_total",
                        (("direction", "rx"), ("worker", str(worker)))), 0.0)


def send_into_block(daemon, address: str, count: int) -> None:
    """Have the kernel in nsd's namespace send ``count`` UDP packets to ``address``."""
    daemon.in_namespace("python3", "-c", SEND_UDP, address, str(count))


def worker_pids(daemon) -> dict[int, int]:
    return {w["index"]: w["pid"] for w in daemon.workers()}


def socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


def tun_names(pid: int) -> set[str]:
    """The TUN devices a process holds, from the ``iff:`` line of each fd's fdinfo."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("iff:"):
                        out.add(line.split()[1])
        except OSError:
            continue
    return out


def mesh_peers(daemon) -> dict[str, float]:
    return {dict(labels)["worker"]: v for (name, labels), v in daemon.metrics().items()
            if name == "ipferry_mesh_peers"}


def test_three_workers_one_nsd_in_its_own_namespaces(daemon_factory):
    d = daemon_factory("--workers", "3")
    kids = d.children()
    titles = sorted(proc_cmdline(p) for p in kids)
    assert titles == ["ipferry: nsd", "ipferry: worker 0", "ipferry: worker 1",
                      "ipferry: worker 2"], titles
    assert d.get_json("/api/mesh")["whole"] is True
    assert proc_cmdline(d.pid) == "ipferry: supervisor"

    nsd = d.nsd_pid()
    for ns in ("user", "net"):
        assert os.readlink(f"/proc/{nsd}/ns/{ns}") != os.readlink(f"/proc/{d.pid}/ns/{ns}"), ns
    # Workers stay in the supervisor's namespaces: they only hold fds into nsd's.
    for pid in worker_pids(d).values():
        assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink(f"/proc/{d.pid}/ns/net")

    links = json.loads(d.in_namespace("ip", "-j", "addr", "show").stdout)
    by_name = {link["ifname"]: link for link in links}
    for i in range(3):
        tun = by_name[f"ipf{i}"]
        assert tun["mtu"] == 65520
        assert "UP" in tun["flags"]
        addrs = {ipaddress.ip_interface(f'{a["local"]}/{a["prefixlen"]}') for a in tun["addr_info"]}
        assert ipaddress.ip_interface(f"100.{64 + i}.0.1/16") in addrs, addrs
        assert ipaddress.ip_interface(f"fd69:7066:0:{i:x}::1/64") in addrs, addrs
    # Each worker's block is routed to its own TUN.
    routes = json.loads(d.in_namespace("ip", "-j", "route", "show").stdout)
    assert {(r["dst"], r["dev"]) for r in routes} >= {(f"100.{64 + i}.0.0/16", f"ipf{i}")
                                                     for i in range(3)}

    before = d.metrics()
    counts = {0: 7, 1: 13, 2: 19}
    for i, n in counts.items():
        send_into_block(d, f"100.{64 + i}.7.9", n)

    def counted():
        m = d.metrics()
        return all(tun_rx(m, i) - tun_rx(before, i) >= n for i, n in counts.items())
    wait_for(counted, 10, "each worker to count the packets routed to its TUN")
    after = d.metrics()
    # Packets for one worker's block never show up at another (allow IPv6 chatter: < 7).
    for i, n in counts.items():
        assert tun_rx(after, i) - tun_rx(before, i) < n + 7


def test_kill_9_worker_is_restarted_and_others_untouched(daemon_factory):
    d = daemon_factory("--workers", "3")
    pids = worker_pids(d)
    os.kill(pids[1], signal.SIGKILL)

    def replaced():
        ws = {w["index"]: w for w in d.workers()}
        w = ws[1]
        return w["pid"] not in (None, pids[1]) and w["state"] == "ready" and w
    w1 = wait_for(replaced, 10, "worker 1 to be replaced")
    assert w1["restarts"] == 1
    now = worker_pids(d)
    assert now[0] == pids[0] and now[2] == pids[2]
    assert d.metrics()[("ipferry_worker_restarts_total", (("worker", "1"),))] == 1
    # The same on-ramp listener and upgrade listeners (the very sockets the supervisor holds,
    # shared with the old worker 0 too), and the same TUN device.
    shared = socket_inodes(now[1]) & socket_inodes(d.pid)
    assert len(shared) >= 3, shared  # onramp:tunnel, upgrade4, upgrade6
    assert socket_inodes(now[1]) & socket_inodes(now[0]) & socket_inodes(d.pid), "the on-ramp"
    assert tun_names(now[1]) == {"ipf1"}
    # Fresh mesh links: every worker reaches the two others again, each on the right link.
    wait_for(lambda: mesh_peers(d) == {"0": 2, "1": 2, "2": 2}, 5, "a full mesh")
    assert d.get_json("/api/mesh") == {"whole": True, "workers": {
        "0": {"1": 1, "2": 2}, "1": {"0": 0, "2": 2}, "2": {"0": 0, "1": 1}}}

    before = tun_rx(d.metrics(), 1)
    send_into_block(d, "100.65.1.1", 11)
    wait_for(lambda: tun_rx(d.metrics(), 1) - before >= 11, 10, "the new worker 1 to count packets")


def test_kill_9_nsd_rebuilds_namespace_and_reequips_workers(daemon_factory):
    d = daemon_factory("--workers", "2")
    old_nsd = d.nsd_pid()
    old_net = os.readlink(f"/proc/{old_nsd}/ns/net")
    pids = worker_pids(d)
    os.kill(old_nsd, signal.SIGKILL)
    wait_for(lambda: d.request("GET", "/readyz")[0] == 503, 5, "/readyz to report nsd down")

    def recovered():
        st = d.status()
        return st["ready"] and st["nsd"]["pid"] not in (None, old_nsd) and st
    st = wait_for(recovered, 15, "/readyz 200 with a new nsd")
    assert st["nsd"]["restarts"] == 1
    new_nsd = st["nsd"]["pid"]
    assert os.readlink(f"/proc/{new_nsd}/ns/net") != old_net
    assert worker_pids(d) == pids, "workers are re-equipped in place, not restarted"
    assert tun_names(pids[0]) == {"ipf0"} and tun_names(pids[1]) == {"ipf1"}
    assert mesh_peers(d) == {"0": 1, "1": 1}, "the mesh is untouched"
    assert d.get_json("/api/mesh")["whole"] is True

    before = d.metrics()
    send_into_block(d, "100.64.3.3", 9)
    send_into_block(d, "100.65.3.3", 9)
    wait_for(lambda: all(tun_rx(d.metrics(), i) - tun_rx(before, i) >= 9 for i in (0, 1)), 10,
             "both workers to count packets on the new TUNs")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT to the process group"])
def test_stop_ends_everything_and_removes_socket_files(daemon_factory, runtime_dir, how):
    d = daemon_factory("--workers", "2")
    kids = d.children()
    assert len(kids) == 3
    sockets = sorted(p.name for p in runtime_dir.iterdir())
    assert sockets == ["admin.sock", "tunnel.sock"]
    if how == "SIGTERM":
        d.proc.send_signal(signal.SIGTERM)
    else:  # what ^C in a terminal does: every process of the group gets it
        os.killpg(d.pid, signal.SIGINT)
    assert d.proc.wait(20) == 0
    events = [e.get("event") for e in d.log_events()]
    assert "nsd_died" not in events and "worker_died" not in events, "an orderly drain"
    for pid in kids:
        wait_for(lambda pid=pid: not alive(pid), 5, f"child {pid} to be gone")
    assert list(runtime_dir.iterdir()) == []
    assert '"event": "stopped"' in d.logs()


def test_sighup_with_broken_config_keeps_running(daemon_factory):
    good = textwrap.dedent("""\
        workers = 1
        [admin]
        listen = "127.0.0.1:9180"
        token = "0123456789abcdef0123"
        """)
    d = daemon_factory(config=good)
    d.config_path.write_text(good.replace("workers = 1", "workers = 'many'"))
    os.kill(d.pid, signal.SIGHUP)
    wait_for(lambda: "reload_refused" in d.logs(), 10, "the refused reload to be logged")
    refused = next(e for e in d.log_events() if e.get("event") == "reload_refused")
    assert any("workers" in line for line in refused["errors"]), refused
    assert d.ready()
    assert d.metrics()[("ipferry_config_reloads_total", (("result", "refused"),))] == 1

    # A valid config reloads; its admin token is live at once.
    d.config_path.write_text(good.replace("0123456789abcdef0123", "fedcba9876543210fedc"))
    os.kill(d.pid, signal.SIGHUP)
    wait_for(lambda: '"event": "reloaded"' in d.logs(), 10, "the reload")
    status, _ = d.netns.http("POST", "127.0.0.1", 9180, "/api/reload",
                             {"Authorization": "Bearer fedcba9876543210fedc"})
    assert status == 200


def test_metrics_parse_and_mutations_need_the_token(daemon_factory):
    token = "s3cret-token-0123456789"
    d = daemon_factory(config=f'workers = 2\n[admin]\ntoken = "{token}"\n')
    status, body = d.netns.http("GET", "127.0.0.1", 9180, "/metrics")
    assert status == 200
    from prometheus_client.parser import text_string_to_metric_families
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in ("ipferry_worker_restarts", "ipferry_workers_ready", "ipferry_tun_packets",
                 "ipferry_process_resident_memory_bytes", "ipferry_process_cpu_seconds"):
        assert name in families, name
    assert families["ipferry_workers_ready"].samples[0].value == 2
    roles = {s.labels["role"] for s in families["ipferry_process_resident_memory_bytes"].samples}
    assert roles == {"supervisor", "nsd", "worker"}
    tun_workers = {s.labels["worker"] for s in families["ipferry_tun_packets"].samples}
    assert tun_workers == {"0", "1"}

    for path in ("/api/reload", "/api/workers/0/restart"):
        status, _ = d.netns.http("POST", "127.0.0.1", 9180, path)
        assert status == 401, path
        status, _ = d.netns.http("POST", "127.0.0.1", 9180, path,
                                 {"Authorization": "Bearer wrong-token-000000000"})
        assert status == 401, path
    pids = worker_pids(d)
    status, _ = d.netns.http("POST", "127.0.0.1", 9180, "/api/workers/0/restart",
                             {"Authorization": f"Bearer {token}"})
    assert status == 202
    wait_for(lambda: (w := d.workers()[0])["pid"] != pids[0] and w["state"] == "ready", 10,
             "worker 0 to restart")
    assert worker_pids(d)[1] == pids[1]
    # Over the unix socket (mode 0600) no token is needed.
    assert oct(os.stat(d.admin_socket).st_mode & 0o777) == "0o600"
    assert d.request("POST", "/api/reload")[0] == 200


def test_no_stale_series_from_dead_worker(daemon_factory):
    d = daemon_factory("--workers", "2", config="[supervision]\nbackoff_initial = 3\n")
    pids = worker_pids(d)
    os.kill(pids[1], signal.SIGKILL)
    wait_for(lambda: d.workers()[1]["state"] == "backoff", 5, "worker 1 in backoff")
    m = d.metrics()
    assert not [k for k in m if k[0] == "ipferry_tun_packets_total" and ("worker", "1") in k[1]]
    assert [k for k in m if k[0] == "ipferry_tun_packets_total" and ("worker", "0") in k[1]]
    assert not [k for k in m if k[0].startswith("ipferry_process") and ("worker", "1") in k[1]]
    assert m[("ipferry_workers_ready", ())] == 1
    assert d.request("GET", "/readyz")[0] == 503


def test_runs_without_any_capability(daemon_factory):
    d = daemon_factory("--workers", "2", no_caps=True)
    for pid in [d.pid, *d.children()]:
        with open(f"/proc/{pid}/status") as f:
            caps = dict(line.split(":\t") for line in f.read().splitlines() if ":\t" in line)
        # nsd holds capabilities only over its own user namespace; outside it has none.
        assert int(caps["CapBnd"], 16) == 0 or proc_cmdline(pid) == "ipferry: nsd", caps
        if proc_cmdline(pid) != "ipferry: nsd":
            assert int(caps["CapEff"], 16) == 0 and int(caps["CapPrm"], 16) == 0
    assert d.ready()


@pytest.mark.parametrize("workers", [1, 4])
def test_startup_reaches_ready(daemon_factory, workers):
    d = daemon_factory("--workers", str(workers))
    ready = next(e for e in d.log_events() if e.get("event") == "ready")
    assert ready["workers"] == workers
    assert len(d.children()) == workers + 1


def test_every_log_line_says_who_wrote_it(daemon_factory):
    d = daemon_factory("--workers", "2")
    d.request("POST", "/api/reload")
    assert d.terminate() == 0
    lines = [line for line in d.logs().splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every line is JSON
    roles = {e["role"] for e in events}
    assert roles == {"supervisor", "nsd", "worker"}
    for e in events:
        assert {"event", "level", "timestamp", "role"} <= e.keys(), e
        if e["role"] == "worker":
            assert e["worker"] in (0, 1), e
    assert {e["worker"] for e in events if e["role"] == "worker"} == {0, 1}


def test_namespace_sysctls_and_routes(daemon_factory):
    d = daemon_factory("--workers", "2",
                       config='[namespace.sysctls]\n"net.core.somaxconn" = "2048"\n')
    def sysctl(key: str) -> str:
        return d.in_namespace("cat", "/proc/sys/" + key.replace(".", "/")).stdout.split()
    assert sysctl("net.ipv4.conf.all.rp_filter") == ["0"]
    assert sysctl("net.ipv4.ip_local_port_range") == ["1024", "65535"]
    assert sysctl("net.core.somaxconn") == ["2048"], "a configured sysctl wins over the default"
    assert sysctl("net.ipv6.conf.ipf0.router_solicitations") == ["0"]
    routes6 = json.loads(d.in_namespace("ip", "-6", "-j", "route", "show").stdout)
    assert {(r["dst"], r["dev"]) for r in routes6} >= {("fd69:7066::/64", "ipf0"),
                                                       ("fd69:7066:0:1::/64", "ipf1")}
    # The upgrade listeners, one per worker and family, on the worker's own address.
    listening = d.in_namespace("ss", "-Htln").stdout
    for addr in ("100.64.0.1:1", "100.65.0.1:1", "[fd69:7066::1]:1", "[fd69:7066:0:1::1]:1"):
        assert addr in listening, listening


def test_crash_loop_stops_the_daemon_with_exit_1(daemon_factory):
    d = daemon_factory("--workers", "2", config=textwrap.dedent("""\
        [supervision]
        backoff_initial = 0.1
        crash_loop_limit = 2
        crash_loop_window = 60
        """))
    for n in range(3):
        pid = d.workers()[0]["pid"]
        os.kill(pid, signal.SIGKILL)
        if n < 2:
            wait_for(lambda pid=pid: (w := d.workers()[0])["pid"] not in (None, pid)
                     and w["state"] == "ready", 10, f"restart {n + 1}")
    assert d.proc.wait(20) == 1
    crash = next(e for e in d.log_events() if e.get("event") == "crash_loop")
    assert crash["process"] == "worker 0" and crash["level"] == "critical"


def test_kill_9_supervisor_takes_every_child_with_it(daemon_factory):
    d = daemon_factory("--workers", "2")
    kids = d.children()
    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(5)
    for pid in kids:  # the death signal set with prctl, not any clean-up code, does this
        wait_for(lambda pid=pid: not alive(pid), 5, f"child {pid} to die with the supervisor")


def test_restart_of_a_worker_in_backoff_is_a_conflict(daemon_factory):
    d = daemon_factory("--workers", "2", config="[supervision]\nbackoff_initial = 5\n")
    os.kill(d.workers()[1]["pid"], signal.SIGKILL)
    wait_for(lambda: d.workers()[1]["state"] == "backoff", 5, "worker 1 in backoff")
    status, body = d.request("POST", "/api/workers/1/restart")
    assert status == 409 and b"backoff" in body
    assert d.request("POST", "/api/workers/7/restart")[0] == 404


def test_reload_applies_supervision_and_log_level_live(daemon_factory):
    slow = "[supervision]\nbackoff_initial = 30\n[logging]\nlevel = \"info\"\n"
    d = daemon_factory("--workers", "2", config=slow)
    d.config_path.write_text(slow.replace("30", "0.1").replace('"info"', '"debug"'))
    status, body = d.request("POST", "/api/reload")
    assert status == 200 and json.loads(body)["message"] == "reloaded"
    pid = d.workers()[0]["pid"]
    os.kill(pid, signal.SIGKILL)
    # With the old 30 s backoff this would time out.
    wait_for(lambda: (w := d.workers()[0])["pid"] not in (None, pid) and w["state"] == "ready",
             10, "a restart after the reloaded 0.1 s backoff")
    died = next(e for e in d.log_events() if e.get("event") == "worker_died")
    assert died["restart_in"] == 0.1
    d.config_path.write_text(slow.replace(
        "[supervision]", "workers = 3\n[supervision]"))
    status, body = d.request("POST", "/api/reload")
    assert json.loads(body)["message"] == ("reloaded; changes to workers take effect at the "
                                           "next restart")


PICKY_APP = textwrap.dedent("""\
    import sys
    from ipferry.worker.app import RulesApplication

    class App(RulesApplication):
        def __init__(self, rules=None, default_action="allow"):
            index = sys.argv[sys.argv.index("--index") + 1]
            if default_action == "deny" and index == "1":
                raise RuntimeError(f"worker {index} refuses deny")
            super().__init__(rules, default_action)
    """)


def test_reload_whose_application_a_worker_cannot_build_changes_nothing(daemon_factory, tmp_path):
    (tmp_path / "pickyapp.py").write_text(PICKY_APP)
    good = '[app]\nclass = "pickyapp:App"\ndefault_action = "allow"\n'
    d = daemon_factory("--workers", "2", config=good, env={"PYTHONPATH": str(tmp_path)})
    d.config_path.write_text(good.replace("allow", "deny") + '[logging]\nlevel = "debug"\n')
    status, body = d.request("POST", "/api/reload")
    assert status == 422, body
    assert json.loads(body)["message"] == ("worker 1: cannot build the application: "
                                           "RuntimeError: worker 1 refuses deny")
    events = d.log_events()
    assert any(e.get("event") == "reload_prepare_failed" and e.get("worker") == 1 for e in events)
    assert not any(e.get("event") == "reconfigured" for e in events), "nobody switched"
    assert d.metrics()[("ipferry_config_reloads_total", (("result", "refused"),))] == 1
    # A worker started later gets the settings that run: worker 1 starts (with deny it could not).
    pid = d.workers()[1]["pid"]
    assert d.request("POST", "/api/workers/1/restart")[0] == 202
    wait_for(lambda: (w := d.workers()[1])["pid"] not in (None, pid) and w["state"] == "ready",
             10, "worker 1 restarted on the running settings")
    # The file as it runs again: the reload goes through.
    d.config_path.write_text(good)
    status, body = d.request("POST", "/api/reload")
    assert (status, json.loads(body)["message"]) == (200, "reloaded")
