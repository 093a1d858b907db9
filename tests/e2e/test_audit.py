"""A failing audit sink is contained: transfers stay intact, no flow is left half-made, the lost
records are counted and logged, readiness and status name the sink, and ``audit.on_error``
decides whether new flows go on (``continue``) or are refused (``refuse``). Refusals past a limit
are summed up, so a SYN flood cannot fill the disk through the audit stream."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import textwrap

import pytest

from tests.e2e.dataplane import (
    SERVER_ADDR,
    STREAM_PORT,
    audit_records,
    connect,
    counter,
    read_all,
    stream_client,
    syn_flood,
)
from tests.e2e.streams import pattern
from tests.helpers import wait_for

MB = 1 << 20


def audit_config(sink, on_error: str = "continue", extra: str = "") -> str:
    return textwrap.dedent(f"""\
        [audit]
        sink = "{sink}"
        on_error = "{on_error}"
        """) + extra


def get_intact(d, n: int) -> None:
    r = stream_client(d, "get", n)
    assert r["bytes"] == n and r["sha256"] == hashlib.sha256(pattern(n)).hexdigest()


def readyz(d) -> tuple[int, str]:
    status, body = d.request("GET", "/readyz")
    return status, body.decode()


def test_dev_full_with_continue_keeps_transfers_intact_and_says_so(daemon_factory, streams):
    d = daemon_factory("--workers", "2", config=audit_config("/dev/full"))
    get_intact(d, 50 * MB)
    for _ in range(3):
        get_intact(d, 1 * MB)
    errors = counter(d, "ipferry_audit_errors_total", "")[""]
    assert errors >= 8  # 4 flows, a start and an end record each, all lost
    status, body = readyz(d)
    assert status == 503 and "audit sink /dev/full failing" in body and "No space" in body, body
    audit = d.status()["audit"]
    assert audit["degraded"] is True and audit["on_error"] == "continue" and audit["failing"]
    assert sum(v for (n, _), v in d.metrics().items() if n == "ipferry_audit_degraded") >= 1
    logged = [e for e in d.log_events() if e.get("event") == "audit_write_failed"]
    # Logged, but rate-limited: far fewer lines than lost records.
    assert 1 <= len(logged) <= 2 and logged[0]["sink"] == "/dev/full", logged
    # No flow was left half-made: the table is empty once the transfers are done.
    wait_for(lambda: d.get_json("/api/flows")["total"] == 0, 10, "no flow left")


def test_dev_full_with_refuse_refuses_new_flows(daemon_factory, streams):
    d = daemon_factory("--workers", "1", config=audit_config("/dev/full", "refuse"))
    res = connect(d, "curl", "-sS", "--max-time", "5", f"http://{SERVER_ADDR}:{STREAM_PORT}/")
    assert res.returncode == 7, res.stderr  # refused at once (a reset on the SYN)
    assert counter(d, "ipferry_drops_total", "reason").get("audit_unavailable") == 1
    assert counter(d, "ipferry_upstream_failures_total", "reason") == {}  # never connected
    assert readyz(d)[0] == 503
    assert d.get_json("/api/flows")["total"] == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs for the audit sink, unmounted (lazily: the daemon may hold it) after."""
    path = tmp_path / "disk"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path) -> None:
    """Fill the file system at ``path`` to the last byte."""
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError:
        pass
    finally:
        os.close(fd)
    assert os.statvfs(path).f_bavail == 0


def _lines_valid(sink) -> tuple[int, int]:
    good = bad = 0
    for line in sink.read_text().splitlines():
        try:
            json.loads(line)
            good += 1
        except ValueError:
            bad += 1
    return good, bad


def test_a_disk_filling_up_mid_run_and_freed_again(daemon_factory, streams, small_disk):
    disk, sink = small_disk, small_disk / "audit.jsonl"
    d = daemon_factory("--workers", "1", config=audit_config(sink, "continue"))
    get_intact(d, 1 * MB)
    wait_for(lambda: _lines_valid(sink)[0] >= 2, 5, "the first records")
    _fill(disk)
    get_intact(d, 20 * MB)  # while full: intact, records lost and counted
    # Enough flows to outgrow the page the file already had (tmpfs allocates by pages).
    assert stream_client(d, "many", 20, 1000, 10)["ok"] == 20
    assert counter(d, "ipferry_audit_errors_total", "")[""] >= 2
    assert readyz(d)[0] == 503
    (disk / "filler").unlink()
    get_intact(d, 1 * MB)  # the sink works again: records are written, readiness is back
    wait_for(lambda: readyz(d)[0] == 200, 5, "/readyz 200 again")
    assert d.status()["audit"]["degraded"] is False
    good, bad = _lines_valid(sink)
    assert good >= 4 and bad <= 1  # at most the one line the full disk cut short
    assert any(e.get("event") == "audit_recovered" for e in d.log_events())
    d.terminate()


def test_a_disk_filling_up_with_refuse(daemon_factory, streams, small_disk):
    disk, sink = small_disk, small_disk / "audit.jsonl"
    d = daemon_factory("--workers", "1", config=audit_config(sink, "refuse"))
    get_intact(d, 1 * MB)
    _fill(disk)
    # The file's last page still takes a few records: connect until the disk says no.
    res = connect(d, "python3", "-c", textwrap.dedent(f"""\
        import socket
        out = []
        for _ in range(40):
            try:
                socket.create_connection(('{SERVER_ADDR}', {STREAM_PORT}), timeout=5).close()
                out.append("ok")
            except ConnectionRefusedError:
                out.append("refused")
        print(" ".join(out))
        """))
    outcomes = res.stdout.decode().split()
    assert len(outcomes) == 40 and "refused" in outcomes, res
    first = outcomes.index("refused")
    assert set(outcomes[first:]) == {"refused"}  # refused from then on, every one
    refused = counter(d, "ipferry_drops_total", "reason").get("audit_unavailable")
    assert refused == 40 - first
    assert readyz(d)[0] == 503
    (disk / "filler").unlink()
    get_intact(d, 1 * MB)  # the first record that goes through ends the refusals
    assert readyz(d)[0] == 200
    d.terminate()


def test_a_syn_flood_past_the_limit_is_summed_up_in_the_audit(daemon_factory, streams,
                                                              tmp_path):
    sink = tmp_path / "audit.jsonl"
    d = daemon_factory("--workers", "1", config=audit_config(sink, extra=textwrap.dedent("""\
        [flows]
        max_per_tenant = 50
        """)))
    flood = 20_000
    tunnel = syn_flood(d.runtime_dir / "tunnel.sock", flood)
    try:
        wait_for(lambda: read_all(tunnel) or counter(d, "ipferry_drops_total", "reason").get(
            "flow_limit_tenant", 0) >= flood - 50, 60, "the flood to be refused")
    finally:
        tunnel.close()
    refused = counter(d, "ipferry_drops_total", "reason")["flow_limit_tenant"]
    assert d.terminate() == 0  # writes the refusals counted so far
    records = audit_records(sink)
    summed = [r for r in records if r["audit"] == "flows_refused"]
    assert summed and sum(r["count"] for r in summed) == refused
    assert {(r["tenant"], r["reason"]) for r in summed} == {("acme", "flow_limit_tenant")}
    # Every allowed flow got its records; the refused ones none of their own.
    starts = [r for r in records if r["audit"] == "flow_start"]
    assert len(starts) == 50 and all(r["decision"] == "upgrade" for r in starts)
    # Before: ~250 bytes of flow_start per refused SYN. Now the refusals cost a few lines.
    refusal_bytes = sum(len(json.dumps(r)) for r in summed)
    assert refusal_bytes <= 0.01 * 250 * refused, (refusal_bytes, refused)
    assert os.path.getsize(sink) < 0.01 * 250 * refused + 50 * 2 * 600
