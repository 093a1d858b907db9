"""The HTTP layer: streams carried as HTTP/1.1 and the HTTP on-ramp's clients.

- :mod:`.conn`: one HTTP/1.1 connection, h11 driven over a non-blocking socket;
- :mod:`.pool`: keep-alive connections to upstreams, per tenant and upstream, bounded;
- :mod:`.session`: one client connection served, request by request (hooks, audit, metrics).

Why h11: it is sans I/O, so the layer owns its sockets. A CONNECT or a switched protocol
(WebSocket) hands the very socket back to the data path, which splices it in the kernel; an
upstream can be any connected stream (a socket downgraded into a device's tunnel); and every
limit (head size, timeouts, one chunk in flight) is ours to set. See docs/http.md.
"""
