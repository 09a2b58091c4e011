"""A throwaway PostgreSQL server for the test session, from Debian's packages.

``postgres_server()`` finds ``initdb`` and ``pg_ctl`` under /usr/lib/postgresql/*/bin
(the newest version), creates a cluster in a temporary directory, starts it on a free
port on 127.0.0.1 (and a Unix socket in that directory, never in /var/run), and stops
it with ``pg_ctl -m immediate stop`` at the end. It skips the calling test when the
binaries are missing.

PostgreSQL refuses to run as root: under euid 0 the directory is handed to the
``postgres`` system user (created by the Debian package) and every binary runs through
``runuser -u postgres --``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

MISSING = "PostgreSQL server binaries not found (Debian package postgresql; .ci/run installs it)"
PG_ROOT = Path("/usr/lib/postgresql")
SYSTEM_USER = "postgres"
START_ATTEMPTS = 3  # a free port can be taken by someone else before the server binds it


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway server: superuser ``postgres``, trust authentication."""

    port: int
    bindir: Path

    @property
    def url(self) -> str:
        """SQLAlchemy URL for the asyncpg driver."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def dsn(self) -> str:
        """Plain libpq-style DSN, for ``asyncpg.connect()``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


def find_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl, if any."""

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    candidates = [
        path
        for path in PG_ROOT.glob("*/bin")
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file() and version(path)
    ]
    return max(candidates, key=version, default=None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run(prefix: list[str], args: list[str], log: Path, timeout: float) -> None:
    """Run one PostgreSQL binary (bounded in time); fail with its output and the server log."""
    try:
        subprocess.run(
            [*prefix, *args], stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=timeout, text=True
        )
    except subprocess.CalledProcessError as exc:
        server_log = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(
            f"{' '.join(args)} failed with exit code {exc.returncode}:\n{exc.stdout}{exc.stderr}\n{server_log}"
        ) from exc


def _start(prefix: list[str], pg_ctl: str, data: Path, sockets: Path, log: Path) -> int:
    """Start the server on a free port (retried: another process may take it first); return the port."""
    for attempt in range(START_ATTEMPTS):
        port = free_port()
        options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
        try:
            _run(prefix, [pg_ctl, "-w", "-t", "30", "-D", str(data), "-l", str(log), "-o", options, "start"], log, 40)
        except RuntimeError:
            if attempt == START_ATTEMPTS - 1:
                raise
        else:
            return port
    raise AssertionError("unreachable")  # pragma: no cover


def _stop(prefix: list[str], pg_ctl: str, data: Path, log: Path) -> None:
    """``pg_ctl -m immediate stop``; if that fails, SIGKILL the postmaster this cluster runs."""
    pid_file = data / "postmaster.pid"
    if not pid_file.exists():
        return  # never started, or already gone
    try:
        _run(prefix, [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "-t", "15", "stop"], log, 20)
    except (RuntimeError, subprocess.TimeoutExpired):
        # Our own postmaster only: its pid comes from this cluster's postmaster.pid.
        with contextlib.suppress(OSError, ValueError, IndexError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Run a throwaway PostgreSQL server for the duration of the block."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip(MISSING)
    as_root = os.geteuid() == 0
    if as_root and shutil.which("runuser") is None:
        pytest.skip(f"running as root needs runuser to start PostgreSQL as {SYSTEM_USER!r}")
    prefix = ["runuser", "-u", SYSTEM_USER, "--"] if as_root else []
    initdb, pg_ctl = str(bindir / "initdb"), str(bindir / "pg_ctl")
    # A short path: the Unix socket path must stay under 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="asgi-disconnect-pg-"))
    data, sockets, log = base / "data", base / "sock", base / "server.log"
    try:
        sockets.mkdir()
        if as_root:
            for path in (base, sockets):
                shutil.chown(path, SYSTEM_USER, SYSTEM_USER)
        # -N (no fsync of the new cluster) only speeds initdb up: the cluster is thrown away.
        _run(prefix, [initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-N"], log, timeout=60)
        try:
            port = _start(prefix, pg_ctl, data, sockets, log)
            yield PostgresServer(port=port, bindir=bindir)
        finally:
            _stop(prefix, pg_ctl, data, log)
    finally:
        shutil.rmtree(base, ignore_errors=True)
