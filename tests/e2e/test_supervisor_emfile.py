"""The supervisor out of fds when a worker dies (issue #9): the restart fails with EMFILE, which is
a failed start (logged with its cause, counted, retried with backoff), not the supervisor's end;
the worker comes back once fds are free again, and the failed start left no fd behind."""

from __future__ import annotations

import os
import signal
import socket

from tests.helpers import alive, proc_cmdline, wait_for

FD_LIMIT = 200  # under the admin socket's cap of live connections (256): connections exhaust it
BACKLOG = 40  # connections more than it can take: they wait in the listen queue, and take each
# fd the supervisor frees (the worker's pidfd and channel) as soon as it accepts again (1 s)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_links(pid: int) -> list[str]:
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            out.append(f"{fd}:{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            pass
    return out


def test_a_restart_without_fds_is_a_failed_start_retried_until_fds_are_back(daemon_factory):
    d = daemon_factory("--workers", "1", config="[supervision]\nbackoff_initial = 3\n"
                       "crash_loop_limit = 10\n", sh_prefix=f"ulimit -n {FD_LIMIT};")
    sup = d.pid  # nsenter, setpriv and bash all exec
    assert proc_cmdline(sup) == "ipferry: supervisor"
    worker = d.workers()[0]["pid"]
    baseline = wait_for(lambda: (n := fd_count(sup)) <= FD_LIMIT - 50 and n, 5, "quiet fds")
    before = fd_links(sup)
    conns: list[socket.socket] = []
    try:
        for _ in range(FD_LIMIT - baseline + BACKLOG):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conns.append(s)
            s.setblocking(False)
            # EAGAIN while the listen queue is full: the supervisor accepts in bursts.
            wait_for(lambda s=s: s.connect_ex(d.admin_socket) == 0, 5, "room in the queue",
                     interval=0.01)
        wait_for(lambda: fd_count(sup) == FD_LIMIT, 5, "the supervisor's fds to run out")
        os.kill(worker, signal.SIGKILL)
        failed = wait_for(lambda: [e for e in d.log_events()
                                   if e.get("event") == "worker_start_failed"], 15,
                          "the restart to fail")[0]
        assert failed["worker"] == 0 and failed["errno"] == 24, failed  # EMFILE
        assert "Too many open files" in failed["error"] and failed["restart_in"] > 0
        assert d.proc.poll() is None and alive(sup), d.logs()[-3000:]
    finally:
        for s in conns:
            s.close()
    # The next try, after its backoff, finds fds again.
    wait_for(d.ready, 30, "the worker back and the daemon ready")
    [w] = d.workers()
    assert w["pid"] != worker and w["state"] == "ready"
    events = [e.get("event") for e in d.log_events()]
    assert "supervisor_failed" not in events and "crash_loop" not in events
    assert d.proc.poll() is None
    # No fd left behind by the failed start(s): back to where it was with one worker.
    try:
        wait_for(lambda: fd_count(sup) <= baseline, 20, f"{baseline} fds in the supervisor")
    except AssertionError:
        raise AssertionError(f"{before} -> {fd_links(sup)}") from None
