"""The start of every child of the supervisor (nsd, the workers).

Both are run as ``python -m ipferry.<role> --control-fd N --parent-pid P`` (the workers with
``--index I`` too): each takes a title ``ps`` shows, dies with the supervisor, logs as its role and
talks to the supervisor over the control socket it inherited. In their asyncio loop SIGINT is
ignored (^C reaches the whole process group: the supervisor stops its children in order) and
SIGTERM alone (e.g. systemd's KillMode) asks the child to stop.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple

from . import logs
from .lifecycle import become_child


class Child(NamedTuple):
    args: argparse.Namespace
    control: socket.socket  # the link to the supervisor
    log: Any  # structlog's bound logger, bound to the role (and worker index)


def start(role: str, argv: list[str] | None, description: str | None, *,
          indexed: bool = False) -> Child:
    """Parse the child's command line, then title it, tie its life to the parent and configure
    its logging; ``indexed``: a worker, ``--index`` in the title and in every log line."""
    parser = argparse.ArgumentParser(prog=f"ipferry-{role}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if indexed:
        parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--log-format", default="json")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--node", default=None)  # the config's node name: in every log line
    args = parser.parse_args(argv)

    index = args.index if indexed else None
    become_child(f"ipferry: {role}" if index is None else f"ipferry: {role} {index}", args.parent_pid)
    log = logs.configure(role, index, fmt=args.log_format, level=args.log_level, node=args.node)
    return Child(args, socket.socket(fileno=args.control_fd), log)


def stop_on_sigterm(stop: Callable[[], object]) -> None:
    """In the running loop: SIGTERM calls ``stop``, SIGINT is ignored (see above)."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    loop.add_signal_handler(signal.SIGTERM, stop)


def run(main: Callable[[], Coroutine[Any, Any, None]], *, prefer_uvloop: bool = False) -> None:
    """Run ``main()`` to its end: on uvloop when asked for and installed, else asyncio's loop."""
    if prefer_uvloop:
        try:
            import uvloop
        except ImportError:  # only the loop is optional; an application's ImportError is not ours
            pass
        else:
            uvloop.run(main())
            return
    asyncio.run(main())
