"""Where ipferry's sockets live when the config does not say: the daemon and ``ipferry connect``
must agree on it without reading each other's config."""

from __future__ import annotations

import os
from pathlib import Path


def default_runtime_dir() -> Path:
    """$RUNTIME_DIRECTORY (systemd), else $XDG_RUNTIME_DIR/ipferry, else /run/ipferry."""
    if rd := os.environ.get("RUNTIME_DIRECTORY"):
        return Path(rd.split(":")[0])
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "ipferry"
    return Path("/run/ipferry")
