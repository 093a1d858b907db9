"""Shared by the monitoring tests: promtool (Debian's ``prometheus`` package, installed by
deploy/setup.sh), the metric names docs/admin-api.md documents, and the PromQL of
deploy/grafana-dashboard.json and deploy/ipferry-alerts.yml."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
ALERTS = ROOT / "deploy" / "ipferry-alerts.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus.yml"
ALERTS_TEST = Path(__file__).with_name("alerts_test.yml")
ADMIN_API_DOC = ROOT / "docs" / "admin-api.md"

# Metrics Prometheus itself gives every target (used by IpferryDown).
SCRAPE_METRICS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def promtool(*args: str, stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run promtool; fail (never skip) when it is not installed."""
    exe = shutil.which("promtool")
    if exe is None:
        raise AssertionError("promtool is not installed: run deploy/setup.sh as root (it installs "
                             "Debian's prometheus package, without starting its service), or "
                             "apt-get install prometheus")
    return subprocess.run([exe, *args], input=stdin, capture_output=True, timeout=timeout,
                          cwd=ROOT)


def explain(res: subprocess.CompletedProcess) -> str:
    return (f"promtool {' '.join(map(str, res.args[1:]))} exited {res.returncode}\n"
            f"stdout:\n{res.stdout.decode(errors='replace')}\n"
            f"stderr:\n{res.stderr.decode(errors='replace')}")


# -- the metrics docs/admin-api.md documents --------------------------------------------------

def documented_metrics() -> dict[str, str]:
    """``{family name as exposed: type}`` from the tables under ``## Metrics``."""
    text = ADMIN_API_DOC.read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    found: dict[str, str] = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`(ipferry_[a-z0-9_]+)`\s*\|\s*(counter|gauge|histogram|summary)?", line)
        if m:
            found[m.group(1)] = m.group(2) or "gauge"
    assert len(found) > 20, f"no metrics table found in {ADMIN_API_DOC}"
    return found


def sample_names(family: str, kind: str) -> set[str]:
    """The sample names a family of this type exposes (prometheus-client's conventions)."""
    base = family.removesuffix("_total")
    if kind == "counter":
        return {base + "_total", base + "_created"}
    if kind == "histogram":
        return {family + s for s in ("_bucket", "_sum", "_count", "_created")}
    if kind == "summary":
        return {family, family + "_sum", family + "_count", family + "_created"}
    return {family}


def documented_sample_names() -> set[str]:
    names: set[str] = set()
    for family, kind in documented_metrics().items():
        names |= sample_names(family, kind)
    return names


def exposed_sample_names(exposition: str) -> set[str]:
    """Every sample name a /metrics body declares (by its ``# TYPE`` lines, so families with no
    series yet count too) or has a sample of."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            names |= sample_names(family, kind.strip())
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


# -- PromQL ------------------------------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
             "unless", "offset", "bool", "atan2", "inf", "nan"}
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (not functions, keywords, labels or values)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^{}]*\}", "{}", s)  # label matchers
    s = re.sub(r"\[[^\[\]]*\]", "[]", s)  # ranges and subqueries
    s = _LABEL_LISTS.sub(" ", s)
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    s = re.sub(r"(?<![\w.])\d[\w.]*", " ", s)  # numbers, durations
    return {m for m in _IDENT.findall(s) if m not in _KEYWORDS}


def for_promtool(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced by what Prometheus would get."""
    s = re.sub(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}",
               "5m", expr)
    s = re.sub(r"\$\{\w+(:\w+)?\}|\$\w+", ".*", s)  # as a variable at "All"
    return s


# -- the dashboard -----------------------------------------------------------------------------

def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> Iterator[dict]:
    """Every panel, those inside collapsed rows included."""
    for panel in dash.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def targets(dash: dict) -> Iterator[tuple[dict, dict]]:
    """(panel, target) for every query of every panel."""
    for panel in panels(dash):
        for target in panel.get("targets", []):
            yield panel, target


def variable_queries(dash: dict) -> Iterator[tuple[str, str]]:
    """(variable name, the PromQL inside its ``label_values(...)``/``query_result(...)``)."""
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", query) or \
            re.fullmatch(r"\s*query_result\((.*)\)\s*", query)
        assert m, f"variable {var['name']}: a query other than label_values/query_result: {query}"
        yield var["name"], m.group(1)


def all_exprs(dash: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every query: panels' targets, annotations, variables."""
    out = [(f"panel {p['id']} {p['title']!r} target {t['refId']}", t["expr"])
           for p, t in targets(dash)]
    out += [(f"annotation {a['name']!r}", a["expr"])
            for a in dash["annotations"]["list"] if "expr" in a]
    out += [(f"variable {name}", query) for name, query in variable_queries(dash)]
    return out


# -- the alerting rules ------------------------------------------------------------------------

def rule_exprs(path: Path = ALERTS) -> list[tuple[str, str]]:
    """(alert or record name, expr) of every rule of a rules file. (No YAML library in the
    venv: a small reader of the two keys, plain or as a block scalar, ``|`` or ``>``.)"""
    lines = path.read_text().splitlines()
    out: list[tuple[str, str]] = []
    name = None
    for i, line in enumerate(lines):
        m = re.match(r"\s*(?:-\s+)?(alert|record):\s*(\S+)\s*$", line)
        if m:
            name = m.group(2)
            continue
        m = re.match(r"(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        assert name is not None, f"{path}:{i + 1}: an expr before any alert or record"
        indent, value = len(m.group(1)), m.group(2).strip()
        if value[:1] in ("|", ">"):
            block = []
            for following in lines[i + 1:]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            value = " ".join(b for b in block if b and not b.startswith("#"))
        elif value[:1] in ("'", '"'):
            raise AssertionError(f"{path}:{i + 1}: quote-free exprs only (or a block scalar)")
        out.append((name, value))
        name = None
    return out
