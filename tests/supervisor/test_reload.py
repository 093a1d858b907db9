"""Reload as declared next to each config key: what is live, what waits for a restart, and the
table in docs/configuration.md that says so."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ipferry.runtime.settings import WorkerSettings
from ipferry.supervisor import config as configmod
from ipferry.supervisor.config import parse

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_docs_table_is_the_generated_one():
    doc = DOCS.read_text()
    assert configmod.with_reload_table(doc) == doc, (
        "docs/configuration.md's reload table is stale: run "
        "python -m ipferry.supervisor.config --reload-table --write docs/configuration.md")


def test_every_key_declares_its_reload_behaviour():
    keys = {".".join(path) for path, _ in configmod.reload_rules()}
    assert {"workers", "onramps", "admin.listen", "admin.token", "namespace", "supervision",
            "logging.level", "logging.format", "flows", "audit", "app", "rules"} <= keys


def test_a_key_without_a_declaration_is_an_error():
    class Bare(configmod._Strict):
        undeclared: int = 1

    with pytest.raises(TypeError, match="undeclared declares no reload behaviour"):
        list(configmod.reload_rules(Bare))


def test_needs_restart_compares_with_the_running_config():
    running = parse("workers = 2\n")
    new, changed = running.reloaded(parse("workers = 3\n"))
    assert changed == ["workers"] and new.workers == 2  # 2 keep running
    new, changed = new.reloaded(parse("workers = 2\n"))
    assert changed == [] and new.workers == 2  # changed back: nothing waits for a restart


def test_live_keys_are_taken_and_the_others_kept():
    running = parse(textwrap.dedent("""\
        [admin]
        listen = "127.0.0.1:9180"
        [logging]
        format = "json"
        level = "info"
        [flows]
        max_per_tenant = 5
        """))
    new, changed = running.reloaded(parse(textwrap.dedent("""\
        [admin]
        listen = "127.0.0.1:9181"
        token = "0123456789abcdef"
        [logging]
        format = "console"
        level = "debug"
        [supervision]
        backoff_initial = 0.1
        [flows]
        max_per_tenant = 6
        [[rules]]
        action = "deny"
        """)))
    assert changed == ["admin.listen", "logging.format", "flows"]
    assert (new.admin.listen, new.admin.token) == ("127.0.0.1:9180", "0123456789abcdef")
    assert (new.logging.format, new.logging.level) == ("json", "debug")
    assert new.supervision.backoff_initial == 0.1
    assert new.flows.max_per_tenant == 5
    assert [r.action for r in new.rules] == ["deny"]


def test_worker_settings_survive_the_control_channel():
    cfg = parse(textwrap.dedent("""\
        [app]
        default_action = "deny"
        [[rules]]
        action = "allow"
        tenant = "acme"
        ports = "8000-8080"
        upstream = "[fd00::5]:8080"
        [[onramps]]
        kind = "gue"
        listen = "0.0.0.0:6080"
        allow = ["10.1.2.3/8"]
        tenants = ["acme"]
        """))
    settings = cfg.worker_settings(3)
    received = WorkerSettings.model_validate(settings.dump())
    assert received == settings
    assert received.workers == 3 and received.app.default_action == "deny"
    [rule] = received.rules
    assert (rule.name, rule.ports, rule.upstream) == ("0", (8000, 8080), ("fd00::5", 8080))
    assert received.gue["gue"].allow == ["10.0.0.0/8"]
    assert received.gue["gue"].address == ("0.0.0.0", 6080)
    assert received.flows == cfg.flows  # the config's section itself: its defaults, once
