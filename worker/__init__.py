"""The workers: one asyncio loop each; flow table, NAT, hooks and off-ramps of the flows they own."""
