"""The flow engine, sans I/O: flows, their two legs and the decisions about their packets."""
