"""The examples are imported as the docs tell users to: examples/ on the path (PYTHONPATH for
the daemon), ``ssh_auditor:SshAuditor`` and ``resp_logger:RespLogger``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.examples.userns import UserNetNs

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


@pytest.fixture
def userns(tmp_path):
    """A user and network namespace of the test's own (see userns.py), home in tmp_path/home."""
    ns = UserNetNs(tmp_path / "home")
    try:
        yield ns
    finally:
        ns.close()
