"""What the benchmark scripts share: statistics, tables, uvicorn subprocesses, CPU pinning."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from asgi_disconnect import _loopback as loopback
from asgi_disconnect._loopback import free_port as free_port  # the benchmarks import it from here

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
# BENCH_RESULTS redirects the output: `scripts/bench --quick` writes to results-quick/
# (ignored by git), so a smoke run never overwrites the committed figures.
RESULTS_DIR = Path(os.environ["BENCH_RESULTS"]).resolve() if os.environ.get("BENCH_RESULTS") else BENCH_DIR / "results"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import apps  # noqa: E402  (needs BENCH_DIR on sys.path when not run as a script)

# -- statistics ----------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (0 <= q <= 1) of a non-empty sequence."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass
class Series:
    """One variant's per-round measurements and its per-round ratios to bare."""

    values: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    deltas: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        out = {
            "median": statistics.median(self.values),
            "min": min(self.values),
            "max": max(self.values),
            "p25": quantile(self.values, 0.25),
            "p75": quantile(self.values, 0.75),
        }
        if self.ratios:
            out |= {
                "ratio_median": statistics.median(self.ratios),
                "ratio_p25": quantile(self.ratios, 0.25),
                "ratio_p75": quantile(self.ratios, 0.75),
            }
        if self.deltas:
            out["delta_median"] = statistics.median(self.deltas)
        return out


def rotated(items: Sequence[str], offset: int) -> list[str]:
    k = offset % len(items)
    return [*items[k:], *items[:k]]


def ratio_cell(summary: dict[str, float]) -> str:
    if "ratio_median" not in summary:
        return "1.000"
    return f"{summary['ratio_median']:.3f} [{summary['ratio_p25']:.3f}-{summary['ratio_p75']:.3f}]"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> tuple[str, str]:
    """The same table as aligned text and as Markdown."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    text = "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])
    md_rows = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    md_rows += ["| " + " | ".join(r) + " |" for r in rows]
    return text, "\n".join(md_rows)


def skipped_rows(notes: dict[str, str], columns: int) -> list[list[str]]:
    """Table rows for variants that could not run: the name, then the reason."""
    return [[name, reason, *([""] * (columns - 2))] for name, reason in notes.items()]


# -- processes -----------------------------------------------------------------------


def http_get(port: int, timeout: float = 1.0) -> tuple[int, bytes]:
    """One blocking ``GET /`` on a fresh connection: (status, body)."""
    response = loopback.get(port, timeout=timeout)
    return response.status, response.body


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads), from /proc; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_kib(pid: int) -> int | None:
    """Resident set size of a process in KiB, from /proc; None elsewhere."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def cpu_delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def uvicorn_command(port: int) -> list[str]:
    """uvicorn (httptools, one worker) serving ``apps:from_env`` on 127.0.0.1:``port``."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(BENCH_DIR),
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--http",
        "httptools",
        "--no-access-log",
        "--workers",
        "1",
        "--lifespan",
        "off",
        "--log-level",
        "warning",
        "apps:from_env",
    ]


def http_scope(
    path: str = "/", headers: Sequence[tuple[bytes, bytes]] = ((b"host", b"127.0.0.1:8000"),)
) -> dict[str, Any]:
    """A uvicorn-like HTTP scope for a GET of ``path``, for apps driven in process."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 54321),
        "scheme": "http",
        "root_path": "",
        "headers": list(headers),
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
    }


@dataclass
class Server:
    """One uvicorn subprocess serving one variant's app on 127.0.0.1 (``apps.from_env``)."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]

    def cpu_seconds(self) -> float | None:
        return process_cpu_seconds(self.proc.pid)

    def rss_kib(self) -> int | None:
        return process_rss_kib(self.proc.pid)


def start_server(
    stack: contextlib.ExitStack, name: str, variant: str, app: str, log_dir: Path, cpus: set[int] | None
) -> Server:
    """Start uvicorn for ``name``, stopped by PID when ``stack`` closes; check that it answers."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "BENCH_VARIANT": variant,
        "BENCH_APP": app,
    }
    env.pop("WEB_CONCURRENCY", None)
    log_path = log_dir / f"uvicorn-{app}-{name}.log"
    failure: loopback.ServerStartError | None = None
    for _attempt in range(3):  # the port may be taken between free_port() and uvicorn's bind
        port = free_port()
        try:
            proc = stack.enter_context(
                loopback.run_process(uvicorn_command(port), port, output=log_path, env=env, cpus=cpus, start_timeout=20)
            )
        except loopback.ServerStartError as exc:
            failure = exc
            continue
        status, body = http_get(port)
        if status != 200 or body != apps.BODY:
            raise RuntimeError(f"{name}: server answered {status} {body[:80]!r}")
        return Server(name, port, proc)
    assert failure is not None
    raise RuntimeError(f"uvicorn for {name!r} did not start ({failure}); log {log_path}:\n{failure.output}")


@contextlib.contextmanager
def servers(
    names: Sequence[str], app: str, cpus: set[int] | None, variant_of: dict[str, str]
) -> Iterator[dict[str, Server]]:
    """Start one server per name (``variant_of`` maps a name such as ``bare2`` to its
    variant), all up front; stop every one on the way out."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{app}-") as log_dir, contextlib.ExitStack() as stack:
        yield {name: start_server(stack, name, variant_of.get(name, name), app, Path(log_dir), cpus) for name in names}


@contextlib.contextmanager
def pinned(pin: bool, notes: list[str]) -> Iterator[set[int] | None]:
    """With two or more CPUs, give the servers one CPU and this process (and the load
    generators it starts) another, so that client and server never compete; yield the
    servers' CPU set (None when not pinned) and restore this process's mask afterwards."""
    original = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if not pin or len(original) < 2:
        if pin:
            notes.append("not pinned: fewer than 2 CPUs available")
        yield None
        return
    server_cpus = {max(original)}
    os.sched_setaffinity(0, {min(original)})
    notes.append(f"servers pinned to CPU {max(original)}, load generator to CPU {min(original)}")
    try:
        yield server_cpus
    finally:
        os.sched_setaffinity(0, original)


# -- reporting -----------------------------------------------------------------------


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    names = ("asgi-disconnect", "starlette", "uvicorn", "httptools", "anyio", "fastapi-disconnect", "aiofence")
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": commit or None,
        "versions": {name: package_version(name) for name in names},
        "wrk": shutil.which("wrk"),
    }


def environment_line(env: dict[str, Any]) -> str:
    return (
        f"Python {env['python']} on {env['platform']}, {env['cpus']} CPUs, load average at start "
        f"{', '.join(f'{x:.2f}' for x in env['loadavg_at_start'] or [])}; git {env['git_commit']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    )


def begin_report(variants: Sequence[str], quick: bool) -> tuple[list[str], dict[str, str], dict[str, Any], str]:
    """What every benchmark starts with: the variants that can run here, the skipped ones
    with why, the report's environment, and its header line (printed, with the notes)."""
    names, skipped = apps.available(variants)
    report: dict[str, Any] = {"environment": environment(), "quick": quick, "skipped": skipped}
    header = environment_line(report["environment"])
    print(header, flush=True)
    for name, reason in skipped.items():
        print(f"note: {name} {reason}", flush=True)
    return names, skipped, report, header


def command_line(script: str) -> str:
    """How this script was run, for the results' header."""
    executable = Path(sys.executable)
    with contextlib.suppress(ValueError):
        executable = executable.relative_to(ROOT)
    return " ".join([executable.as_posix(), script, *sys.argv[1:]])


def write_results(name: str, report: dict[str, Any], markdown: Sequence[str]) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS_DIR / f"{name}.md").write_text("\n".join(markdown).rstrip("\n") + "\n")
    print(f"wrote {RESULTS_DIR / f'{name}.json'} and {RESULTS_DIR / f'{name}.md'}", flush=True)


def quiet_logs() -> None:
    """Only warnings and errors: the middleware's abort events are noise in a benchmark.
    (The script decides what is printed; the library never configures structlog.)"""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.getLogger("aiofence").setLevel(logging.ERROR)
