"""The worker's tests: ``run`` runs a coroutine on each event loop the worker may use."""

from __future__ import annotations

import asyncio

import pytest

try:
    import uvloop
except ImportError:  # pragma: no cover (a Linux install has it)
    uvloop = None

LOOPS = ["asyncio"] + (["uvloop"] if uvloop is not None else [])


@pytest.fixture(params=LOOPS)
def run(request):
    """Run a coroutine to its end on the loop under test (the worker prefers uvloop)."""
    def runner(coro, timeout: float = 30.0):
        async def bounded():
            return await asyncio.wait_for(coro, timeout)
        if request.param == "uvloop":
            return uvloop.run(bounded())
        return asyncio.run(bounded())
    return runner
