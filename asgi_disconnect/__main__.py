"""``python -m asgi_disconnect``: the same command line as ``asgi-disconnect``."""

from asgi_disconnect._tools.cli import main

raise SystemExit(main())
