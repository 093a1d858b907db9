"""What every ipferry process shares: the fd-passing message protocol, logging, the process
lifecycle, the runtime directory and the entry point of a child (nsd, the workers)."""
