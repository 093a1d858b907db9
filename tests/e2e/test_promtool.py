"""The monitoring files against the real daemon, after traffic through ``ipferry connect``:
a live scrape checked by ``promtool check metrics``, the names the dashboard and the alerts
select against it, and a real Prometheus (inside the test's namespace, scraping the daemon as
deploy/prometheus.yml says, with deploy/ipferry-alerts.yml loaded) answering every dashboard
query and evaluating every alert."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from tests.deploy.promtool import (
    ALERTS,
    PROMETHEUS_CONFIG,
    SCRAPE_METRICS,
    all_exprs,
    dashboard,
    documented_metrics,
    explain,
    exposed_sample_names,
    for_promtool,
    metric_names,
    promtool,
    rule_exprs,
)
from tests.e2e.dataplane import SERVER_ADDR, config, connect, counter
from tests.helpers import wait_for

RULES = """
[[rules]]
action = "deny"
name = "no-admin"
path = "/admin"

[[rules]]
action = "deny"
name = "no-discard"
protocol = "tcp"
ports = "9"

[[rules]]
action = "allow"
name = "web-as-http"
protocol = "tcp"
ports = "8080"
layer = "http"
"""

# Panels that must show data once the daemon has served traffic (the others may rightly be
# empty here: no TLS port, no DNS, no GUE, no private network, no failures).
PANELS_WITH_DATA = [
    "Admin endpoint", "Workers ready", "nsd", "Audit sink", "Restarts in range",
    "Flows and throughput", "Tunnel traffic (bits/s)", "Packets by direction",
    "Packets from tunnels by worker", "TUN devices (bits/s)", "TUN devices (packets/s)",
    "Active flows", "Flows started", "Flows ended by reason", "NAT slots in use", "Tunnels",
    "Drops by reason", "Top drop reasons in range", "Drops by worker",
    "HTTP requests by status class", "HTTP request duration",
    "HTTP request duration distribution", "HTTP 5xx ratio", "Restarts", "Workers",
    "Config reloads", "CPU by process", "Resident memory by process",
    "Open file descriptors by process", "Process uptime",
]


def traffic(d) -> None:
    """HTTP requests answered 200, 403 (a rule) and 404 (the server), and a denied flow."""
    web = f"http://{SERVER_ADDR}:8080"
    script = (f"for path in index.html admin missing; do curl -sS --max-time 20 -o /dev/null "
              f"-w '%{{http_code}} ' {web}/$path; done; "
              f"curl -sS --max-time 5 http://{SERVER_ADDR}:9/ >/dev/null 2>&1; exit 0")
    res = connect(d, "sh", "-c", script, timeout=60)
    assert res.returncode == 0, res
    assert res.stdout.decode().split() == ["200", "403", "404"], res


def counted(d, times: int) -> None:
    """Wait until the counters show ``times`` rounds of :func:`traffic`."""
    def done() -> bool:
        classes = counter(d, "ipferry_http_requests_total", "status_class")
        drops = counter(d, "ipferry_drops_total", "reason")
        return classes.get("2xx", 0) >= times and classes.get("4xx", 0) >= 2 * times \
            and drops.get("denied", 0) >= times
    wait_for(done, 10, f"the counters of {times} rounds of traffic")


def start_daemon(daemon_factory, upstream, tmp_path):
    (upstream / "index.html").write_text("hello\n")
    d = daemon_factory("--workers", "2", config=config(tmp_path, RULES))
    traffic(d)
    counted(d, 1)
    return d


def scrape(d) -> str:
    """GET /metrics as Prometheus does: over TCP, 127.0.0.1:9180 in the daemon's namespace."""
    status, body = d.netns.http("GET", "127.0.0.1", 9180, "/metrics")
    assert status == 200, (status, body[:500])
    return body.decode()


def test_a_live_scrape_passes_promtool_check_metrics(daemon_factory, upstream, tmp_path):
    d = start_daemon(daemon_factory, upstream, tmp_path)
    body = scrape(d)
    for series in ('ipferry_http_requests_total{status_class="2xx"',
                   "ipferry_http_request_duration_seconds_bucket{",
                   'ipferry_drops_total{reason="denied"', 'ipferry_flows_started_total{protocol="tcp"',
                   'ipferry_worker_restarts_total{worker="1"}', 'role="nsd"'):
        assert series in body, f"{series} not in the scrape:\n{body}"
    res = promtool("check", "metrics", stdin=body.encode(), timeout=30)
    problems = (res.stdout + res.stderr).decode(errors="replace").strip()
    assert res.returncode == 0 and not problems, f"{explain(res)}\nthe scrape:\n{body}"

    # The names the dashboard and the alerts select, and those docs/admin-api.md lists, are
    # families the daemon exposes (declared even before a labelled series is first used).
    exposed = exposed_sample_names(body) | SCRAPE_METRICS
    used: dict[str, set[str]] = {}
    for where, expr in all_exprs(dashboard()) + [(f"rule {n}", e) for n, e in rule_exprs()]:
        for name in metric_names(expr):
            used.setdefault(name, set()).add(where)
    unknown = {name: sorted(where) for name, where in used.items() if name not in exposed}
    assert not unknown, f"selected but not exposed: {unknown}"
    # (A counter's TYPE line names it with _total, as the docs do.)
    declared = {m.group(1) for m in re.finditer(r"^# TYPE (\S+) ", body, re.M)}
    missing = set(documented_metrics()) - declared
    assert not missing, f"documented in docs/admin-api.md, not exposed: {sorted(missing)}"


# -- a real Prometheus -------------------------------------------------------------------------

PROM = "127.0.0.1:9090"  # inside the test's namespace


@contextlib.contextmanager
def prometheus(netns, tmp: Path) -> Iterator[None]:
    """Prometheus inside ``netns`` with deploy/prometheus.yml and its rules, every second."""
    exe = shutil.which("prometheus")
    assert exe, "prometheus is not installed: run deploy/setup.sh (Debian's prometheus package)"
    tmp.mkdir()
    shutil.copy(ALERTS, tmp)
    conf = PROMETHEUS_CONFIG.read_text()
    conf, n = re.subn(r"scrape_interval: \S+", "scrape_interval: 1s", conf)
    conf, m = re.subn(r"scrape_timeout: \S+", "scrape_timeout: 1s", conf)
    assert n == m == 1, conf
    (tmp / "prometheus.yml").write_text("global:\n  evaluation_interval: 1s\n\n" + conf)
    log = open(tmp / "prometheus.log", "w")
    proc = subprocess.Popen(["nsenter", f"--net={netns.path}", exe,
                             f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address={PROM}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()
            return netns.http("GET", *PROM.split(":"), "/-/ready")[0] == 200
        wait_for(ready, 30, "Prometheus ready")
        yield
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


def api(netns, path: str, **params) -> dict | list:
    host, port = PROM.split(":")
    status, body = netns.http("GET", host, int(port),
                              f"/api/v1/{path}?{urllib.parse.urlencode(params)}")
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "success", (path, params, status, answer)
    return answer["data"]


def query(netns, expr: str) -> list:
    data = api(netns, "query", query=expr)
    assert data["resultType"] == "vector", (expr, data)
    return data["result"]


def test_prometheus_answers_the_dashboard_and_evaluates_the_alerts(daemon_factory, upstream,
                                                                   tmp_path):
    d = start_daemon(daemon_factory, upstream, tmp_path)
    with prometheus(d.netns, tmp_path / "prometheus"):
        samples = 'count_over_time(ipferry_workers_ready{job="ipferry"}[1m]) >= 3'
        wait_for(lambda: query(d.netns, samples), 30, "three scrapes of the daemon")
        traffic(d)  # so that the rates are not 0
        counted(d, 2)
        wait_for(lambda: query(d.netns, 'sum(ipferry_http_requests_total{status_class="2xx"})'
                                         ' >= 2'), 15, "a scrape of the second round")

        empty = []
        for where, expr in all_exprs(dashboard()):
            if where.startswith("variable"):
                continue
            result = query(d.netns, for_promtool(expr))  # (a query that fails, fails here)
            panel = re.fullmatch(r"panel \d+ '(.*)' target \w", where)
            if panel and panel.group(1) in PANELS_WITH_DATA and "internal_error" not in expr:
                # A "> 0" only hides the series at 0 (e.g. the many drop reasons never seen in
                # the interval); the rest must have data. (A labelled series' first increment
                # is no increase to rate(): the second round may have hit only new series.)
                if not result and not re.search(r"\s>\s*0$", expr):
                    empty.append(f"{where}: {expr}")
                elif not result and not query(d.netns, for_promtool(expr[:expr.rindex(">")])):
                    empty.append(f"{where}: {expr}")
        assert not empty, "queries without data:\n" + "\n".join(empty)
        for name, match in (("instance", 'ipferry_workers_configured{job=~".*"}'),
                            ("worker", 'ipferry_packets_total{job=~".*", instance=~".*"}')):
            values = api(d.netns, "label/" + name + "/values", **{"match[]": match})
            assert values == (["127.0.0.1:9180"] if name == "instance" else ["0", "1"]), values

        # Every rule evaluates without error, and a healthy daemon sets none off.
        def evaluated() -> list[dict]:
            groups = api(d.netns, "rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return rules if rules and all(r["health"] != "unknown" for r in rules) else []
        rules = wait_for(evaluated, 15, "every rule evaluated")
        assert sorted(r["name"] for r in rules) == sorted(n for n, _ in rule_exprs())
        bad = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert not bad, bad
        alerts = api(d.netns, "alerts")["alerts"]
        assert alerts == [], alerts

        # A worker restart sets IpferryWorkerRestarts off, for that worker.
        old = d.workers()[1]["pid"]
        status, _ = d.request("POST", "/api/workers/1/restart")
        assert status == 202
        wait_for(lambda: (w := d.workers()[1])["pid"] != old and w["state"] == "ready", 30,
                 "worker 1 restarted")

        def firing() -> list[dict]:
            return [a for a in api(d.netns, "alerts")["alerts"] if a["state"] == "firing"]
        alerts = wait_for(firing, 15, "an alert firing")
        assert [(a["labels"]["alertname"], a["labels"]["worker"]) for a in alerts] == \
            [("IpferryWorkerRestarts", "1")], alerts
