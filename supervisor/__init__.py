"""The supervisor: config, on-ramp listeners, children, admin API and metrics. Never a packet."""
