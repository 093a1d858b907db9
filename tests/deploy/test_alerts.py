"""deploy/ipferry-alerts.yml and deploy/prometheus.yml as promtool reads them, the alerts' unit
tests (alerts_test.yml), and their metric names against docs/admin-api.md."""

from __future__ import annotations

import shutil

from tests.deploy.promtool import (
    ALERTS,
    ALERTS_TEST,
    PROMETHEUS_CONFIG,
    SCRAPE_METRICS,
    documented_sample_names,
    explain,
    metric_names,
    promtool,
    rule_exprs,
)


def test_promtool_check_rules():
    res = promtool("check", "rules", str(ALERTS))
    assert res.returncode == 0, explain(res)
    assert f"SUCCESS: {len(rule_exprs())} rules found" in res.stdout.decode(), explain(res)


def test_promtool_check_config_with_its_rule_file(tmp_path):
    # The config names the rules by a path relative to itself: promtool reads them from there.
    res = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert res.returncode == 0, explain(res)
    out = res.stdout.decode()
    assert "SUCCESS: 1 rule files found" in out and f"Checking {ALERTS}" in out, explain(res)
    # The same from a copy elsewhere (as in /etc/prometheus), from any working directory.
    for path in (PROMETHEUS_CONFIG, ALERTS):
        shutil.copy(path, tmp_path)
    res = promtool("check", "config", str(tmp_path / PROMETHEUS_CONFIG.name))
    assert res.returncode == 0 and "SUCCESS: 1 rule files found" in res.stdout.decode(), \
        explain(res)
    # And a missing rules file is an error promtool reports (what the check above relies on).
    (tmp_path / ALERTS.name).unlink()
    res = promtool("check", "config", str(tmp_path / PROMETHEUS_CONFIG.name))
    assert res.returncode != 0, explain(res)


def test_promtool_test_rules():
    res = promtool("test", "rules", str(ALERTS_TEST), timeout=120)
    assert res.returncode == 0 and "SUCCESS" in res.stdout.decode(), explain(res)


def test_every_alert_has_a_unit_test_and_the_usual_fields():
    rules = rule_exprs()
    names = [name for name, _ in rules]
    assert len(names) == len(set(names)), names
    tested = ALERTS_TEST.read_text()
    untested = [n for n in names if f"alertname: {n}\n" not in tested]
    assert not untested, f"alerts without a test in {ALERTS_TEST.name}: {untested}"
    text = ALERTS.read_text()
    for name in names:
        rule = text.split(f"- alert: {name}\n", 1)[1].split("- alert:", 1)[0]
        assert "severity: " in rule and "summary: " in rule and "description: " in rule, name


def test_alerts_select_documented_metrics_only():
    known = documented_sample_names() | SCRAPE_METRICS
    for name, expr in rule_exprs():
        names = metric_names(expr)
        assert names, f"{name}: no metric found in {expr!r}"
        assert names <= known, f"{name}: {sorted(names - known)} not in docs/admin-api.md"


def test_promtool_check_metrics_reports_what_it_finds():
    """What tests/e2e/test_promtool.py relies on: problems come out, with a non-zero status."""
    res = promtool("check", "metrics", stdin=b"# TYPE foo_bytes counter\nfoo_bytes 1\n")
    out = (res.stdout + res.stderr).decode()
    assert res.returncode != 0 and '"_total" suffix' in out and "no help text" in out, explain(res)
