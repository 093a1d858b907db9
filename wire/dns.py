"""The daemon's resolver, as tunnels see it: the addresses where it answers DNS.

A tunnel client (``ipferry connect`` names them in the command's resolv.conf; any GUE sender may
too) sends its queries to one of these addresses, port 53, UDP or TCP; the daemon forwards them
to the resolvers of its own host (``[dns] upstreams``, by default the host's resolv.conf,
loopback stubs included). Both are outside what a client of ipferry would otherwise use: the
IPv4 one is in the shared address space of RFC 6598, the IPv6 one a unique local address.
"""

from __future__ import annotations

import ipaddress

DNS_ADDRESS4 = "100.100.100.100"
DNS_ADDRESS6 = "fd53::53"
DNS_PORT = 53
DNS_ADDRESSES = frozenset({ipaddress.ip_address(DNS_ADDRESS4).packed,
                           ipaddress.ip_address(DNS_ADDRESS6).packed})
