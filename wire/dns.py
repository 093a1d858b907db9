"""Where the daemon answers DNS inside the tunnel network.

A tunnel client (``ipferry connect``'s namespace, a GUE sender, any client of a connected tunnel)
may send DNS queries to these addresses, port 53, over UDP or TCP: the daemon answers them itself,
forwarding each query to the resolvers of its own host (loopback stubs such as systemd-resolved's
127.0.0.53 included), so names resolve whatever the client's host uses. ``ipferry connect`` names
them in the ``/etc/resolv.conf`` it gives its command. Constants only: no I/O here.
"""

from __future__ import annotations

import ipaddress

DNS_ADDRESS4 = "100.100.100.100"  # (shared address space, RFC 6598: never a real host's)
DNS_ADDRESS6 = "fd53::53"  # (a unique local address, RFC 4193)
DNS_PORT = 53
# As the engine compares a packet's destination (packed bytes).
DNS_ADDRESSES = frozenset({ipaddress.ip_address(DNS_ADDRESS4).packed,
                           ipaddress.ip_address(DNS_ADDRESS6).packed})
