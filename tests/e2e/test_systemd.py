"""The systemd contracts, spoken for real: sd_notify on a datagram socket, socket activation."""

from __future__ import annotations

import socket
import time

from tests.helpers import wait_for


def test_sd_notify_ready_watchdog_stopping(daemon_factory, tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(0.2)
    d = daemon_factory("--workers", "2", wait_ready=False,
                       env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                            "WATCHDOG_USEC": "400000"})
    messages: list[str] = []

    def drain(seconds: float = 0.3) -> list[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                messages.append(notify.recv(4096).decode())
            except TimeoutError:
                pass
        return messages

    wait_for(lambda: any("READY=1" in m for m in drain()), 30, "READY=1")
    d.wait_ready()  # READY=1 is only sent once /readyz would say 200
    ready = next(m for m in messages if "READY=1" in m)
    assert "STATUS=nsd ready, 2/2 workers ready" in ready
    assert f"MAINPID={d.pid}" in ready
    # Children never inherit the notify socket: only the supervisor speaks to systemd.
    for pid in d.children():
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert b"NOTIFY_SOCKET" not in f.read()
    start = len(messages)
    pets = [m for m in drain(2.0)[start:] if m == "WATCHDOG=1"]
    assert len(pets) >= 3, messages  # every 0.2 s: about 10 in 2 s, even on a busy machine
    assert d.terminate() == 0
    assert "STOPPING=1" in "\n".join(drain())


def test_socket_activation_uses_the_passed_listener(daemon_factory, runtime_dir, tmp_path):
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(16)
    fd = listener.fileno()
    d = daemon_factory("--workers", "1", pass_fds=(fd,),
                       sh_prefix=f"exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ LISTEN_FDS=1 "
                                 "LISTEN_FDNAMES=tunnel")
    listener.close()  # only the daemon holds it now
    onramps = d.status()["onramps"]
    assert onramps == [{"name": "tunnel", "kind": "tunnel", "path": None, "address": None,
                        "from_systemd": True}]
    assert not (runtime_dir / "tunnel.sock").exists()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client.connect(str(path))  # the passed socket is listening in the daemon
    client.close()
    assert d.terminate() == 0
    assert path.exists(), "a socket systemd passed belongs to systemd: never unlinked"
