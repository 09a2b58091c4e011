"""The ``asgi-disconnect`` command line: ``demo``, ``doctor`` and ``check``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

# name: (one line for the command list, the command's own description)
_COMMANDS = {
    "demo": (
        "show what happens when clients leave, with and without the middleware",
        "Serve small real-world apps from a real uvicorn on 127.0.0.1, disconnect "
        "clients mid-flight, and compare the bare app with DisconnectMiddleware.",
    ),
    "doctor": (
        "probe the ASGI servers installed here for how they report disconnects",
        "Start each installed ASGI server on 127.0.0.1 with a probe app and report the "
        "spec version it advertises, how fast http.disconnect arrives and whether send() raises.",
    ),
    "check": (
        "serve your own app and report how long its handlers run after the client left",
        "",  # check.add_arguments() sets it
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``asgi-disconnect`` command line and return its exit status."""
    parser = argparse.ArgumentParser(
        prog="asgi-disconnect",
        description="Make HTTP client disconnects visible and safe in any ASGI application.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (summary, description) in _COMMANDS.items():
        command = commands.add_parser(name, help=summary, description=description)
        if name == "demo":
            command.add_argument(
                "--quick", action="store_true", help="a shorter retry storm (for tests); noisier figures"
            )
        elif name == "check":
            from . import check

            check.add_arguments(command)
        command.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    args = parser.parse_args(argv)
    if args.command == "demo":
        try:
            from .demo import run_demo
        except ImportError as exc:  # uvicorn or starlette missing
            return _missing(exc, "demo")
        return run_demo(quick=args.quick, as_json=args.json)
    if args.command == "doctor":
        from .doctor import run_doctor

        return run_doctor(as_json=args.json)
    if args.command == "check":
        from .check import run_check

        return run_check(args)
    parser.print_help()
    return 2


def _missing(exc: ImportError, command: str) -> int:
    print(
        f"asgi-disconnect {command} needs {exc.name or 'a missing package'}: pip install 'asgi-disconnect[demo]'",
        file=sys.stderr,
    )
    return 1
