"""The ``asgi-disconnect`` command-line tools: the command line is their only interface."""
