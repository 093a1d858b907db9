"""`ipferry connect` passes its TUN to the daemon (the default): one queue per worker, so with
--workers 2 the kernel spreads the flows over both workers, each serves the flows whose first
packet reached its queue, and the mesh carries none of them. Against a real daemon without
capabilities, real TCP."""

from __future__ import annotations

import hashlib
import json
import textwrap
import threading

from tests.e2e.dataplane import SERVER_ADDR, STREAM_PORT, config, connect, counter
from tests.e2e.streams import pattern
from tests.helpers import wait_for

# 24 concurrent GETs of 2 MB each; prints the sha256 of each body and the bytes.
MANY_GETS = textwrap.dedent(f"""
    import hashlib, json, socket, threading
    out = []
    def get(i):
        with socket.create_connection(("{SERVER_ADDR}", {STREAM_PORT}), timeout=60) as s:
            s.sendall(b"GET %d\\n" % (2 << 20))
            h, n = hashlib.sha256(), 0
            while chunk := s.recv(1 << 16):
                h.update(chunk)
                n += len(chunk)
        out.append((n, h.hexdigest()))
    threads = [threading.Thread(target=get, args=(i,)) for i in range(24)]
    for t in threads: t.start()
    for t in threads: t.join()
    print(json.dumps(out))
""")


def test_two_workers_each_read_a_queue_and_flows_bypass_the_mesh(daemon_factory, streams,
                                                                 tmp_path):
    d = daemon_factory("--workers", "2", config=config(tmp_path))
    res = connect(d, "python3", "-c", MANY_GETS, timeout=120)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    got = json.loads(res.stdout)
    expected = hashlib.sha256(pattern(2 << 20)).hexdigest()
    assert len(got) == 24 and all(g == [2 << 20, expected] for g in got), got
    started = counter(d, "ipferry_flows_started_total", "worker")
    # Both workers own flows (24 flows land on one worker with odds 2^-23).
    assert started.get("0", 0) > 0 and started.get("1", 0) > 0, started
    assert sum(started.values()) >= 24
    packets = counter(d, "ipferry_packets_total", "direction")
    crossed = packets.get("to_mesh", 0)
    # Each flow is served by the worker whose queue its SYN reached, and the kernel keeps its
    # later packets there (superframes of 64 KB down, their ACKs up: hundreds of packets): no
    # packet crosses the mesh.
    assert packets["from_tunnel"] > 500 and packets["to_tunnel"] > 500, packets
    assert crossed == 0, packets
    assert counter(d, "ipferry_tunnels_closed_total", "reason") == {"closed_by_peer": 1.0}


def test_the_tunnels_row_counts_the_packets_of_every_workers_queue(daemon_factory, streams,
                                                                   tmp_path):
    """/api/tunnels shows an attached tunnel once, on its holder, with the packets every worker
    read from its queue (the kernel hands each worker's flows to that worker's queue)."""
    d = daemon_factory("--workers", "2", config=config(tmp_path))
    done, stop = tmp_path / "gets-done", tmp_path / "stop"
    script = MANY_GETS + textwrap.dedent(f"""
        import os, time
        open("{done}", "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists("{stop}") and time.monotonic() < deadline:
            time.sleep(0.05)
    """)
    result: dict = {}
    client = threading.Thread(target=lambda: result.update(res=connect(d, "python3", "-c", script,
                                                                       timeout=120)))
    client.start()
    try:
        wait_for(done.exists, 90, "the 24 GETs")
        started = counter(d, "ipferry_flows_started_total", "worker")
        assert started.get("0", 0) > 0 and started.get("1", 0) > 0, started
        rows = d.get_json("/api/tunnels")
        read = counter(d, "ipferry_packets_total", "direction")["from_tunnel"]
    finally:
        stop.touch()
        client.join(130)
    assert result["res"].returncode == 0, result["res"].stderr.decode()[-2000:]
    assert len(rows) == 1 and not any("queue_of" in r for r in rows), rows
    row = rows[0]
    assert row["attached"] == 2 and row["device"] == [row["worker"], row["id"]], row
    # Both queues' packets: the holder's alone would be about half (its flows' share).
    assert read > 500 and row["packets_in"] >= 0.9 * read, (row, read)
    assert row["packets_out"] > 500, row


def test_no_attach_carries_packets_over_the_socket(daemon_factory, streams, tmp_path):
    """The packet protocol (what any other client speaks) still works end to end, and with it
    the tunnel's worker forwards the other worker's flows over the mesh."""
    d = daemon_factory("--workers", "2", config=config(tmp_path))
    res = connect(d, "python3", "-c", MANY_GETS, timeout=120, options=["--no-attach"])
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert len(json.loads(res.stdout)) == 24
    packets = counter(d, "ipferry_packets_total", "direction")
    started = counter(d, "ipferry_flows_started_total", "worker")
    assert started.get("0", 0) > 0 and started.get("1", 0) > 0, started
    assert packets.get("to_mesh", 0) > 100, packets  # the non-holder's flows, every packet
