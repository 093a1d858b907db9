"""The wire: packets, checksums, ICMP, NAT rewrites, GUE and virtio-net framing, flow hashing and
the steering program. Pure functions over bytes; it imports nothing else of ipferry and does no I/O."""
