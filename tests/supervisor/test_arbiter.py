"""The supervisor without processes (no root): reload all or nothing against fake workers, the
event queue as the only writer of its state, and the one helper that asks every worker."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest

from ipferry.runtime import fdpass
from ipferry.supervisor import config as configmod
from ipferry.supervisor.arbiter import Supervisor
from ipferry.supervisor.children import State


class FakeChannel:
    def __init__(self, answer) -> None:
        self.answer = answer  # (type, body) -> Message, or an exception to raise
        self.sent: list[tuple[str, dict | None]] = []
        self.inbox: asyncio.Queue = asyncio.Queue()

    async def request(self, type_, body=None, fds=None, timeout=5.0):
        self.sent.append((type_, body))
        answer = self.answer(type_, body or {})
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def send(self, type_, body=None, fds=None) -> None:
        self.sent.append((type_, body))

    def types(self) -> list[str]:
        return [t for t, _ in self.sent]


class FakeChild:
    def __init__(self, pid: int, answer=None) -> None:
        self.pid = pid
        self.returncode = None
        self.channel = FakeChannel(answer or (lambda t, b: fdpass.Message("prepared", {})))
        self.signals: list[int] = []
        self.stopped = False

    @property
    def alive(self) -> bool:
        return self.returncode is None

    def signal(self, sig: int) -> None:
        self.signals.append(sig)

    async def stop(self, timeout, *, message=None) -> None:
        self.stopped = True


def refuse(type_, body):
    return fdpass.Message("error", {"error": "cannot build the application: RuntimeError: no"})


def write(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text))


def supervisor(path: Path, text: str, workers: int = 2, **answers) -> Supervisor:
    """A supervisor of ``workers`` ready, equipped fake workers (answers by index) and nsd."""
    write(path, text)
    sup = Supervisor(configmod.load(path), str(path), workers=workers)
    sup.nsd.child = FakeChild(100)
    sup.nsd.state = State.READY
    for w in sup.workers:
        w.child = FakeChild(200 + w.index, answers.get(f"w{w.index}"))
        w.state = State.READY
        w.equipped = True
    return sup


def run(coro):
    return asyncio.run(coro)


async def reload(sup: Supervisor) -> tuple[bool, str]:
    """What a SIGHUP, or the admin API's reload event, has the loop do."""
    return await sup.reloader.reload()


RULES = """\
    [logging]
    level = "info"
    [[rules]]
    action = "deny"
    tenant = "old"
    """


def test_a_reload_is_applied_when_every_worker_prepared_it(tmp_path):
    async def go():
        sup = supervisor(tmp_path / "c.toml", RULES)
        write(Path(sup.config_path), RULES.replace("old", "new"))
        ok, msg = await reload(sup)
        assert (ok, msg) == (True, "reloaded")
        assert [r.tenant for r in sup.config.rules] == ["new"]
        for w in sup.workers:
            prepare = w.child.channel.sent[0]
            assert prepare[0] == "prepare"
            assert [r["tenant"] for r in prepare[1]["settings"]["rules"]] == ["new"]
            assert w.child.channel.types() == ["prepare", "commit"]
        assert sup.nsd.child.channel.types() == ["reconfigure"]
        assert sup.metrics.reloads.labels("applied")._value.get() == 1

    run(go())


def test_an_application_a_worker_cannot_build_leaves_the_old_settings_everywhere(tmp_path):
    async def go():
        sup = supervisor(tmp_path / "c.toml", RULES, w1=refuse)
        before = sup.config
        write(Path(sup.config_path), RULES.replace("old", "new"))
        ok, msg = await reload(sup)
        assert not ok
        assert msg == "worker 1: cannot build the application: RuntimeError: no"
        assert sup.config is before  # and so what a worker started later is given
        assert [r.tenant for r in sup.worker_settings().rules] == ["old"]
        for w in sup.workers:
            assert w.child.channel.types() == ["prepare", "abort"]
        assert sup.nsd.child.channel.types() == []
        assert sup.metrics.reloads.labels("refused")._value.get() == 1

    run(go())


def test_a_worker_that_does_not_answer_refuses_the_reload(tmp_path):
    async def go():
        sup = supervisor(tmp_path / "c.toml", RULES, w0=lambda t, b: None)
        write(Path(sup.config_path), RULES.replace("old", "new"))
        ok, msg = await reload(sup)
        assert not ok and msg.startswith("worker 0: no answer")
        assert [r.tenant for r in sup.config.rules] == ["old"]

    run(go())


def test_an_application_the_supervisor_cannot_import_is_refused_before_any_worker_is_asked(
        tmp_path):
    async def go():
        sup = supervisor(tmp_path / "c.toml", RULES)
        write(Path(sup.config_path), RULES + '[app]\nclass = "no_such_module_here:App"\n')
        ok, msg = await reload(sup)
        assert not ok and "app.class = 'no_such_module_here:App': cannot import" in msg
        assert all(w.child.channel.sent == [] for w in sup.workers)
        assert sup.config.app.cls is None

    run(go())


def test_needs_restart_is_judged_against_what_runs(tmp_path):
    async def go():
        sup = supervisor(tmp_path / "c.toml", "workers = 2\n", workers=None)
        assert len(sup.workers) == 2
        write(Path(sup.config_path), "workers = 3\n")
        assert await reload(sup) == (
            True, "reloaded; changes to workers take effect at the next restart")
        write(Path(sup.config_path), "workers = 2\n")
        assert await reload(sup) == (True, "reloaded")  # 2 run: nothing waits

    run(go())


def test_only_equipped_workers_are_asked_and_every_worker_hears_the_commit(tmp_path):
    async def go():
        sup = supervisor(tmp_path / "c.toml", RULES)
        sup.workers[1].equipped = False  # starting: it gets the settings with its equipment
        sup.workers[1].state = State.STARTING
        write(Path(sup.config_path), RULES.replace("old", "new"))
        assert (await reload(sup))[0]
        assert sup.workers[0].child.channel.types() == ["prepare", "commit"]
        assert sup.workers[1].child.channel.types() == ["commit"]

    run(go())


# -- the event queue is the only writer ---------------------------------------------------------

async def next_event(sup: Supervisor) -> None:
    await sup.dispatch(*sup.events.get_nowait())


def test_an_admin_restart_changes_state_only_in_the_loop(tmp_path):
    async def go():
        sup = supervisor(tmp_path / "c.toml", "")
        asking = asyncio.create_task(sup.call("restart_worker", 1))
        await asyncio.sleep(0)
        assert sup.workers[1].state is State.READY and not sup.workers[1].planned_restart
        await next_event(sup)
        slot = await asking
        assert slot is sup.workers[1] and slot.state is State.STOPPING and slot.planned_restart
        await asyncio.sleep(0)
        assert slot.child.stopped
        again = asyncio.create_task(sup.call("restart_worker", 1))
        await asyncio.sleep(0)
        await next_event(sup)
        assert await again is None  # already restarting: the admin API answers 409

    run(go())


def test_an_admin_reload_goes_through_the_loop(tmp_path):
    async def go():
        sup = supervisor(tmp_path / "c.toml", RULES)
        write(Path(sup.config_path), RULES.replace("old", "new"))
        asking = asyncio.create_task(sup.call("reload"))
        await asyncio.sleep(0)
        assert [r.tenant for r in sup.config.rules] == ["old"]
        await next_event(sup)
        assert await asking == (True, "reloaded")

    run(go())


def test_a_caller_is_answered_even_when_the_daemon_stops_first(tmp_path):
    async def go():
        sup = supervisor(tmp_path / "c.toml", RULES)
        asking = asyncio.create_task(sup.call("reload"))
        await asyncio.sleep(0)
        sup.stopping = True
        await sup._drain()
        assert await asking is None  # the admin API answers 503
        assert await sup.call("restart_worker", 0) is None

    run(go())


def test_what_a_worker_says_is_an_event(tmp_path):
    async def go():
        sup = supervisor(tmp_path / "c.toml", "")
        slot = sup.workers[0]
        slot.state = State.STARTING
        reader = asyncio.create_task(sup.pool._read(slot.child))
        slot.child.channel.inbox.put_nowait(fdpass.Message("ready", {"pid": 200}))
        slot.child.channel.inbox.put_nowait(fdpass.Message("audit", {"error": "disk full"}))
        slot.child.channel.inbox.put_nowait(None)
        await reader
        assert slot.state is State.STARTING and slot.audit_error is None
        await next_event(sup)
        assert slot.state is State.READY
        await next_event(sup)
        assert slot.audit_error == "disk full" and not sup.is_ready()

    run(go())


def test_a_link_for_a_process_the_slot_no_longer_has_is_closed_not_sent(tmp_path):
    async def go():
        import os
        sup = supervisor(tmp_path / "c.toml", "")
        slot = sup.workers[0]
        old = slot.child
        slot.child = FakeChild(300)
        r, w = os.pipe()
        os.close(w)
        sup.post("nsd_link", slot, old, sup.nsd.child, r)
        await next_event(sup)
        with pytest.raises(OSError):
            os.fstat(r)  # closed
        assert old.channel.sent == [] and slot.child.channel.sent == []

    run(go())


# -- one helper asks every worker -----------------------------------------------------------------

def parts_answer(rows_by_part: list[list[int]]):
    def answer(type_, body):
        start = body.get("start", 0)
        last = start == len(rows_by_part) - 1
        return fdpass.Message(type_, {"rows": rows_by_part[start], "snapshot": "s",
                                      "next": None if last else start + 1})
    return answer


def test_ask_workers_collects_parts_and_says_who_did_not_answer(tmp_path):
    async def go():
        sup = supervisor(tmp_path / "c.toml", "", workers=3,
                         w0=parts_answer([[1, 2], [3]]), w1=parts_answer([[4]]),
                         w2=lambda t, b: TimeoutError())
        got = await sup.pool.ask_workers("tunnels", parts="rows")
        assert got == {0: [1, 2, 3], 1: [4], 2: None}
        assert sup.workers[0].child.channel.sent[1] == ("tunnels", {"snapshot": "s", "start": 1})
        sup.workers[1].state = State.BACKOFF  # only ready workers are asked
        assert set(await sup.pool.ask_workers("tunnels", parts="rows")) == {0, 2}
        bodies = await sup.pool.ask_workers("flows", lambda i: {"n": i},
                                            workers=[(0, sup.workers[0].child)])
        assert sup.workers[0].child.channel.sent[-1] == ("flows", {"n": 0})
        assert list(bodies) == [0]

    run(go())

