"""Where the daemon answers DNS inside the tunnel network.

A tunnel client (``ipferry connect``'s namespace, a GUE sender, any client of a connected tunnel)
may send DNS queries to these addresses, port 53, over UDP or TCP: the daemon answers them itself,
forwarding each query to the resolvers of its own host (loopback stubs such as systemd-resolved's
127.0.0.53 included), so names resolve whatever the client's host uses. ``ipferry connect`` names
them in the ``/etc/resolv.conf`` it gives its command. Constants only: no I/O here.
"""

from __future__ import annotations

DNS_ADDRESS4 = "100.100.100.100"  # (shared address space, RFC 6598: never a real host's)
DNS_ADDRESS6 = "fd53::53"  # (a unique local address, RFC 4193)
DNS_PORT = 53
# As the engine compares a packet's destination (packed bytes).
DNS_ADDRESSES = frozenset({bytes(int(x) for x in DNS_ADDRESS4.split(".")),
                           bytes.fromhex("fd53" + "0" * 26 + "0053")})
