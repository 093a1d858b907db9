"""``check-config`` refuses what ``run`` refuses: an application class that does not import and
an audit sink that cannot be opened. Both commands on the same files, compared (``run`` stops at
its config checks: nothing is started)."""

from __future__ import annotations

import pytest

from ipferry.supervisor import cli


@pytest.mark.parametrize("text, problem", [
    ('workers = 1\n[app]\nclass = "no_such_module_here:App"\n',
     "app.class = 'no_such_module_here:App': cannot import"),
    ('workers = 1\n[audit]\nsink = "{tmp}/missing/audit.jsonl"\n', "does not exist"),
    ('workers = 1\n[audit]\nsink = "{tmp}"\n', "cannot open for append"),
], ids=["app-class", "sink-directory", "sink-is-a-directory"])
def test_check_config_and_run_refuse_alike(tmp_path, capsys, text, problem):
    path = tmp_path / "c.toml"
    path.write_text(text.format(tmp=tmp_path))
    assert cli.main(["check-config", str(path)]) == 2
    checked = capsys.readouterr().err
    assert cli.main(["run", "--config", str(path)]) == 2
    refused = capsys.readouterr().err
    assert problem in checked and problem in refused
    assert refused == f"ipferry: refusing to start:\n{checked}"
