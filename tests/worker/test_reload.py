"""A worker's half of a reload (no root): ``prepare`` builds the new application and keeps it
aside, ``commit`` switches to it, ``abort`` forgets it; a constructor that raises is an ``error``
reply and changes nothing."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import structlog

from ipferry.runtime import fdpass
from ipferry.runtime.settings import App, Audit, Flows, WorkerSettings
from ipferry.worker.__main__ import Worker
from ipferry.worker.app import RulesApplication


class Broken:
    def __init__(self) -> None:
        raise RuntimeError("no database")


def settings(app_class: str | None = None, default_action: str = "allow") -> dict:
    app = App.model_validate({"class": app_class, "default_action": default_action})
    return WorkerSettings(workers=1, mtu=1500, offload=False, flows=Flows(), audit=Audit(),
                          app=app, rules=[], gue={}).dump()


def test_prepare_then_commit_or_abort():
    async def go():
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        worker = Worker(0, theirs, structlog.get_logger())
        old = RulesApplication(default_action="allow")

        async def shutdown(timeout):
            pass

        worker.app = old
        worker.datapath = SimpleNamespace(app=old, shutdown=shutdown)
        running = asyncio.create_task(worker.run())
        sup = fdpass.AsyncChannel(ours, "worker")

        reply = await sup.request("prepare", {"settings": settings(default_action="deny")})
        assert reply.type == "prepared" and worker.app is old
        sup.send("commit", {"log_level": "info"})
        reply = await sup.request("prepare", {"settings": settings("tests.worker.test_reload:Broken")})
        assert reply.type == "error"
        assert reply["error"] == "cannot build the application: RuntimeError: no database"
        new = worker.app
        assert new is not old and new.default_action == "deny" and worker.datapath.app is new
        assert worker.settings.app.default_action == "deny"

        reply = await sup.request("prepare", {"settings": settings(default_action="allow")})
        assert reply.type == "prepared"
        sup.send("abort")
        sup.send("commit", {"log_level": "info"})  # nothing prepared any more: the level only
        sup.send("stop")
        await asyncio.wait_for(running, 5)
        assert worker.app is new and worker.prepared is None
        sup.close()
        ours.close()

    asyncio.run(go())
