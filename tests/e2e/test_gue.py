"""The unconnected GUE tunnel: the kernel steers every flow to its owner, no mesh hops."""

from __future__ import annotations

import hashlib
import socket

import pytest

from ipferry.wire import gue
from tests.e2e.dataplane import SERVER_ADDR, audit_records, config, connect, counter, drops, stream_client
from tests.helpers import wait_for

GUE = "127.0.0.1:6080"


def gue_config(tmp_path, extra: str = "") -> str:
    return config(tmp_path, f"""
[[onramps]]
kind = "tunnel"

[[onramps]]
kind = "gue"
listen = "{GUE}"
tenants = ["acme"]
{extra}""")


def by_worker(d, name: str, **labels) -> dict[str, float]:
    out: dict[str, float] = {}
    for (metric, lbls), v in d.metrics().items():
        lbls = dict(lbls)
        if metric == name and all(lbls.get(k) == v2 for k, v2 in labels.items()):
            out[lbls["worker"]] = out.get(lbls["worker"], 0) + v
    return out


def test_hundred_concurrent_flows_each_handled_by_its_owner_alone(daemon_factory, streams,
                                                                  tmp_path):
    d = daemon_factory("--workers", "2", config=gue_config(tmp_path))
    r = stream_client(d, "many", 100, 100_000, gue=GUE)
    assert r["ok"] == 100, r
    packets_in = by_worker(d, "ipferry_packets_total", direction="from_tunnel")
    assert set(packets_in) == {"0", "1"} and all(v > 0 for v in packets_in.values()), packets_in
    assert sum(by_worker(d, "ipferry_packets_total", direction="to_mesh").values()) == 0
    assert sum(by_worker(d, "ipferry_packets_total", direction="from_mesh").values()) == 0
    assert sum(by_worker(d, "ipferry_gue_missteered_total").values()) == 0
    starts = wait_for(lambda: (s := [r for r in audit_records(tmp_path / "audit.jsonl")
                                     if r["audit"] == "flow_start"]) and len(s) >= 100 and s,
                      10, "100 flow starts")
    flows = {(s["src"], s["sport"]): s["worker"] for s in starts}
    assert len(starts) == len(flows) == 100  # every flow started once, on one worker
    assert set(flows.values()) == {0, 1}
    ends = wait_for(lambda: (e := [r for r in audit_records(tmp_path / "audit.jsonl")
                                   if r["audit"] == "flow_end"]) and len(e) >= 100 and e,
                    10, "100 flow ends")
    assert {(e["src"], e["sport"]): e["worker"] for e in ends} == flows
    tunnels = d.get_json("/api/tunnels")
    assert any(t.get("kind") == "gue" and t["tenant"] == "acme" and t["offload"]
               for t in tunnels), tunnels


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "plain"])
def test_pmtu_shrinks_packets_that_do_not_fit_a_datagram(daemon_factory, streams, tmp_path,
                                                         offload):
    """With a 65520 MTU inside connect, packets exceed what one GUE datagram carries: both
    kernels learn the smaller path MTU from our ICMP and the transfer completes intact (with
    superframes and partial checksums in the offload option, or plain packets)."""
    from tests.e2e.streams import pattern
    d = daemon_factory("--workers", "1", config=gue_config(tmp_path))
    options = [] if offload else ["--no-offload"]
    size = 20 << 20
    expected = hashlib.sha256()
    block = pattern(1 << 22)
    for _ in range(size // len(block)):
        expected.update(block)
    down = stream_client(d, "get", size, gue=GUE, mtu=65520, options=options)
    assert down["bytes"] == size and down["sha256"] == expected.hexdigest()
    up = stream_client(d, "put", size, gue=GUE, mtu=65520, options=options)
    assert up["server_sha256"] == expected.hexdigest()
    assert counter(d, "ipferry_drops_total", "reason")["too_big"] >= 1  # the kernel was told


def send_datagrams(datagrams: list[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for datagram in datagrams:
            s.sendto(datagram, ("127.0.0.1", 6080))


def test_bad_gue_and_unknown_tenants_are_dropped_and_counted(daemon_factory, netns, streams,
                                                            tmp_path):
    d = daemon_factory("--workers", "2", config=gue_config(tmp_path))
    syn = bytes.fromhex("450000280001400040060000") + socket.inet_aton("10.98.0.9") + \
        socket.inet_aton(SERVER_ADDR) + bytes.fromhex("9c40232800000000000000005002ffff00000000")
    good = gue.header(b'{"tenant":"acme"}', 4)
    bad = [b"\x40" + good[1:] + syn,  # version 1
           good[:2] + b"\x80\x00" + good[4:] + syn,  # flags
           good[:1] + b"\x29" + good[2:] + syn,  # says IPv6, carries IPv4
           bytes([31]) + good[1:] + syn,  # header longer than the datagram
           b"\x00\x04"]  # short
    netns.run(send_datagrams, bad)
    wait_for(lambda: drops(d).get("bad_gue") == len(bad), 5, "bad GUE drops")
    res = connect(d, "curl", "-sS", "--max-time", "2", f"http://{SERVER_ADDR}:9000/",
                  tenant="evil", gue=GUE)
    assert res.returncode != 0
    assert drops(d).get("gue_unknown_tenant", 0) >= 1
    assert not [r for r in audit_records(tmp_path / "audit.jsonl") if r["tenant"] == "evil"]


@pytest.mark.parametrize("listen,error", [
    ("0.0.0.0:6080", "needs an allow list"),
    ("localhost:6080", "expected an IP address"),
])
def test_gue_config_errors_name_the_line(tmp_path, listen, error):
    from ipferry.supervisor.config import ConfigError, parse
    text = f'[[onramps]]\nkind = "gue"\nlisten = "{listen}"\n'
    with pytest.raises(ConfigError) as exc:
        parse(text, "t.toml")
    assert "t.toml:" in str(exc.value) and error in str(exc.value)


def test_sources_outside_the_allow_list_are_dropped(daemon_factory, netns, tmp_path):
    d = daemon_factory("--workers", "1", config=gue_config(tmp_path, 'allow = ["192.0.2.0/24"]'))
    syn = bytes.fromhex("450000280001400040060000") + socket.inet_aton("10.98.0.9") + \
        socket.inet_aton(SERVER_ADDR) + bytes.fromhex("9c40232800000000000000005002ffff00000000")
    netns.run(send_datagrams, [gue.header(b'{"tenant":"acme"}', 4) + syn] * 3)
    wait_for(lambda: drops(d).get("gue_source_denied") == 3, 5, "denied sources")
    assert not audit_records(tmp_path / "audit.jsonl")


def test_check_config_and_status_show_the_gue_onramp(daemon_factory, tmp_path):
    import subprocess

    from tests.helpers import IPFERRY
    path = tmp_path / "gue.toml"
    path.write_text(gue_config(tmp_path))
    out = subprocess.run([IPFERRY, "check-config", str(path)], capture_output=True, text=True)
    assert out.returncode == 0 and f"gue at udp {GUE} (GUE)" in out.stdout, out
    d = daemon_factory("--workers", "2", config=gue_config(tmp_path))
    [gue_row] = [o for o in d.status()["onramps"] if o["kind"] == "gue"]
    assert gue_row["address"] == GUE and gue_row["path"] is None


def test_a_restarted_worker_gets_its_socket_back_and_steering_still_holds(daemon_factory,
                                                                          streams, tmp_path):
    import os
    import signal
    d = daemon_factory("--workers", "2", config=gue_config(tmp_path))
    old = {w["index"]: w["pid"] for w in d.workers()}
    os.kill(old[1], signal.SIGKILL)
    wait_for(lambda: [w for w in d.workers() if w["index"] == 1 and w["state"] == "ready"
                      and w["pid"] != old[1]], 10, "worker 1 to be replaced")
    r = stream_client(d, "many", 40, 10_000, gue=GUE)
    assert r["ok"] == 40, r
    assert sum(by_worker(d, "ipferry_gue_missteered_total").values()) == 0
    packets_in = by_worker(d, "ipferry_packets_total", direction="from_tunnel")
    assert packets_in.get("1", 0) > 0, packets_in  # the new worker 1 serves its flows
