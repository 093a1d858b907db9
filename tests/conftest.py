"""Fixtures that build real kernel parts and always take them down again.

The daemon under test runs inside a network namespace the test created (nothing it does can leave
the machine); the test reaches it through its admin unix socket, which the shared filesystem makes
visible from here, or from a thread that entered the namespace.

Only the end-to-end tests (tests/e2e/) need root and those kernel parts; every other test runs as
any user (``pytest tests --ignore=tests/e2e``; tests/e2e/test_unprivileged_units.py proves it).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.helpers import Daemon, NetNs, require_kernel_features

E2E = Path(__file__).parent / "e2e"


def pytest_collection_modifyitems(session, config, items):
    # CI runs as root: an end-to-end test missing a kernel feature (or root) must fail the run
    # loudly, never skip quietly. Runs without end-to-end tests need neither.
    if not any(E2E in Path(item.path).parents for item in items):
        return
    problem = require_kernel_features()
    if problem:
        raise pytest.UsageError(f"ipferry's end-to-end tests (tests/e2e/) need real kernel "
                                f"features: {problem}")


@pytest.fixture
def netns():
    ns = NetNs(f"ipft-{uuid.uuid4().hex[:8]}")
    try:
        yield ns
    finally:
        ns.delete()


@pytest.fixture
def runtime_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    os.chmod(d, 0o755)
    return d


@pytest.fixture
def daemon_factory(netns, runtime_dir, tmp_path):
    started: list[Daemon] = []

    def start(*args: str, config: str | None = None, wait_ready: bool = True,
              no_caps: bool = True, env: dict | None = None, **start_kw) -> Daemon:
        d = Daemon(netns, runtime_dir, tmp_path, config=config, no_caps=no_caps, env=env)
        started.append(d)
        d.start(*args, **start_kw)
        if wait_ready:
            d.wait_ready()
        return d

    try:
        yield start
    finally:
        for d in started:
            d.destroy()
