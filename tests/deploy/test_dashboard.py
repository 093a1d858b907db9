"""deploy/grafana-dashboard.json: a Grafana dashboard one can import anywhere (its data source a
template variable), whose every query parses (promtool) and selects documented metrics only.
(tests/e2e/test_promtool.py checks the same names against a live scrape.)"""

from __future__ import annotations

import re

from tests.deploy.promtool import (
    DASHBOARD,
    SCRAPE_METRICS,
    all_exprs,
    dashboard,
    documented_metrics,
    documented_sample_names,
    explain,
    for_promtool,
    metric_names,
    panels,
    promtool,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_the_dashboard_is_a_grafana_dashboard():
    dash = dashboard()
    for key, kind in (("title", str), ("uid", str), ("panels", list), ("schemaVersion", int),
                      ("templating", dict), ("annotations", dict), ("time", dict)):
        assert isinstance(dash.get(key), kind), f"{key}: {dash.get(key)!r}"
    assert dash.get("id") is None, "an exported dashboard has no database id"
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", dash["uid"]), dash["uid"]
    assert dash["schemaVersion"] >= 36
    # Unique ids and titles, every panel placed on the 24-column grid, none overlapping.
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids), ids
    titles = [p["title"] for p in panels(dash)]
    duplicates = sorted({t for t in titles if titles.count(t) > 1})
    assert not duplicates, duplicates
    cells: dict[tuple[int, int], str] = {}
    for p in panels(dash):
        g = p["gridPos"]
        assert g["w"] >= 1 and g["h"] >= 1 and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
    for p in panels(dash):
        if p["type"] == "row":
            assert not p.get("targets"), p["title"]
            continue
        assert p["type"] in {"timeseries", "stat", "bargauge", "heatmap", "table", "gauge"}, p
        assert p["targets"] and p.get("description"), f"{p['title']!r}: no queries or description"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), (p["title"], refs)
        assert p["fieldConfig"]["defaults"].get("unit"), p["title"]


def test_the_data_source_is_a_template_variable():
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    names = list(variables)
    assert len(names) == len(set(names)), names
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus", ds
    for p in panels(dash):
        if p["type"] == "row":
            continue
        assert p["datasource"] == DATASOURCE, (p["title"], p["datasource"])
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE, (p["title"], t)
    for a in dash["annotations"]["list"]:
        if "expr" in a:
            assert a["datasource"] == DATASOURCE, a
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == DATASOURCE, v
    # No data source is named other than through the variable (a uid from someone's Grafana).
    text = DASHBOARD.read_text()
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', text)) - {dash["uid"]}
    assert uids <= {"${datasource}", "-- Grafana --"}, uids
    # Every variable a query uses is defined (or one of Grafana's own).
    for where, expr in all_exprs(dash):
        used = set(re.findall(r"\$\{?(\w+)", expr))
        assert used <= set(names) | {"__rate_interval", "__interval", "__range"}, (where, used)


def test_every_query_selects_documented_metrics():
    known = documented_sample_names() | SCRAPE_METRICS
    for where, expr in all_exprs(dashboard()):
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= known, f"{where}: {sorted(names - known)} not in docs/admin-api.md"


def test_the_dashboard_shows_the_metrics_the_issue_asks_for():
    """Throughput, flows, drops by reason, restarts, the latency histogram, the HTTP layer."""
    exprs = " ".join(e for _, e in all_exprs(dashboard()))
    for needle in ("ipferry_bytes_total", "ipferry_packets_total", "ipferry_flows_active",
                   "ipferry_flows_started_total", "ipferry_flows_ended_total",
                   "sum by (reason) (rate(ipferry_drops_total",
                   "ipferry_worker_restarts_total", "ipferry_nsd_restarts_total",
                   "histogram_quantile(0.99, sum by (le) (rate("
                   "ipferry_http_request_duration_seconds_bucket",
                   "sum by (status_class) (rate(ipferry_http_requests_total",
                   "sum by (reason) (rate(ipferry_http_rejected_total",
                   "sum by (result) (rate(ipferry_tls_streams_total"):
        assert needle in exprs, needle
    shown = {n for _, e in all_exprs(dashboard()) for n in metric_names(e)}
    missing = [family for family, kind in documented_metrics().items()
               if not ({family, family + "_bucket"} & shown)]
    assert not missing, f"documented metrics the dashboard shows nowhere: {missing}"


def test_every_query_parses(tmp_path):
    """promtool parses each expression (Grafana's variables substituted) as a recording rule."""
    exprs = all_exprs(dashboard())
    rules = ["groups:", "  - name: grafana-dashboard", "    rules:"]
    for i, (where, expr) in enumerate(exprs):
        rules += [f"      # {where}", f"      - record: dashboard:query_{i}",
                  "        expr: |", *(f"          {line}" for line in
                                       for_promtool(expr).splitlines())]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text("\n".join(rules) + "\n")
    res = promtool("check", "rules", str(path))
    assert res.returncode == 0, f"{explain(res)}\n{path.read_text()}"
    assert f"SUCCESS: {len(exprs)} rules found" in res.stdout.decode(), explain(res)
