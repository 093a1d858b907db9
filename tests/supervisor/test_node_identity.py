"""A fleet's node name: checked in the config, a `node` label on every exposed sample, a field
of every audit record, an anycast GUE on-ramp's setting reaching the workers."""

from __future__ import annotations

import json
import textwrap

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipferry.supervisor.config import ConfigError, parse
from ipferry.supervisor.metrics import ProcessInfo, SupervisorMetrics
from ipferry.worker.audit import AuditLog


def test_the_node_name_is_checked_and_reaches_the_workers():
    cfg = parse(textwrap.dedent("""\
        node = "edge-1.fra"
        [[onramps]]
        kind = "gue"
        listen = "198.51.100.1:6080"
        allow = ["10.0.0.0/8"]
        anycast = true
        """), "t.toml")
    settings = cfg.worker_settings(2)
    assert settings.node == "edge-1.fra" and settings.gue["gue"].anycast is True
    assert parse("").worker_settings(1).node == ""
    with pytest.raises(ConfigError) as exc:
        parse('node = "a b"\n', "t.toml")
    assert str(exc.value).startswith("t.toml:1: node = 'a b': String should match pattern")


def samples(body: bytes) -> list:
    return [s for fam in text_string_to_metric_families(body.decode()) for s in fam.samples]


@pytest.mark.parametrize("node", ["edge-1", None])
def test_every_sample_carries_the_node_label(node):
    m = SupervisorMetrics(lambda: [ProcessInfo("supervisor", "", 1)], lambda: 2, lambda: 1,
                          node=node)
    worker = [{"name": "ipferry_flows_active", "help": "h", "type": "gauge",
               "samples": [("ipferry_flows_active", {}, 3.0)]}]
    out = samples(m.render({0: worker, 1: worker}))
    assert len(out) > 10
    assert {s.labels.get("node") for s in out} == {node}
    flows = [s for s in out if s.name == "ipferry_flows_active"]
    assert sorted(s.labels["worker"] for s in flows) == ["0", "1"]


def test_audit_records_name_the_node(tmp_path):
    sink = tmp_path / "audit.jsonl"
    for node in ("edge-1", ""):
        audit = AuditLog(str(sink), worker=1, node=node)
        try:
            assert audit.record("flow_start", flow=1)
        finally:
            audit.close()
    first, second = (json.loads(line) for line in sink.read_text().splitlines())
    assert list(first)[:4] == ["audit", "ts", "node", "worker"] and first["node"] == "edge-1"
    assert "node" not in second and second["worker"] == 1
