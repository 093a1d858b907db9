"""Send stdin's bytes to HOST:PORT in pieces, print what comes back until it ends with --until.

Run as a script inside the test's namespace (a client with no protocol of its own: the bytes go
as given, each piece its own segment, and the answer comes out exactly as received)::

    printf 'PING\\r\\n' | python raw_client.py 127.0.0.1:6380 --piece 3 --until 2b504f4e470d0a
"""

from __future__ import annotations

import argparse
import socket
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address")
    parser.add_argument("--piece", type=int, default=1 << 16, help="bytes per send")
    parser.add_argument("--until", required=True, help="the answer's last bytes, in hex")
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args()
    host, _, port = args.address.rpartition(":")
    data, until = sys.stdin.buffer.read(), bytes.fromhex(args.until)
    deadline = time.monotonic() + args.timeout
    with socket.create_connection((host, int(port)), timeout=args.timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(data), args.piece):
            sock.sendall(data[i:i + args.piece])
            if args.piece < 64:
                time.sleep(0.001)  # let tiny pieces leave as segments of their own
        got = bytearray()
        while not got.endswith(until):
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            got += chunk
    sys.stdout.buffer.write(got)


if __name__ == "__main__":
    main()
