"""Stream a child process's output; when the client leaves, the child must not outlive it.

Run: ``python examples/subprocess_stream.py``. It serves a Starlette app with uvicorn on
a free loopback port. ``GET /tail`` starts a child process (``python -c``: a loop that
prints a line every 10 ms, for up to 1000 s) and streams its stdout, one line per chunk.
The generator's ``finally`` stops the child: SIGTERM, a bounded wait, SIGKILL if it is
still there, and reaps it (``wait()``), so that it leaves neither an orphan nor a zombie.
That cleanup runs inside ``shield()``: whatever interrupted the generator (the client
leaving) would otherwise cancel each of its awaits as well.
A raw-socket client (``asgi_disconnect.testing``'s ``live.request()``) reads a few lines
and aborts (TCP RST). The run is done twice:

- **asgi-disconnect**: ``DisconnectMiddleware`` and ``guard_stream``. Checked: the
  ``finally`` runs within 1 s of the abort, the child's PID is gone within 2 s (not
  running, not a zombie), and the stream passed on at most one line after the
  middleware detected the abort.
- **bare Starlette**: the same generator in a plain ``StreamingResponse``. Measured and
  printed, not checked. On servers that advertise ASGI spec < 2.4 (uvicorn, hypercorn)
  Starlette's ``StreamingResponse`` runs its own disconnect listener and cancels the
  stream task, so the child is stopped here too (thanks to the shielded cleanup).

Exits 0 when every check passes, 1 otherwise. Needs asgi-disconnect, starlette and uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from _measure import Serve, at_most, left_at, report, seconds, wait_until
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from asgi_disconnect import DisconnectMiddleware, DisconnectState, disconnect_state, guard_stream, shield
from asgi_disconnect.testing import leave, serve

CHILD = "import time\nfor i in range(100_000):\n    print(f'line {i}', flush=True)\n    time.sleep(0.01)\n"
MAX_LINES = 100_000
READ_LINES = 5  # the client leaves after reading this many
FINALLY_WITHIN = 1.0  # seconds from the abort to the generator's finally
GONE_WITHIN = 2.0  # seconds from the abort to the child's PID being gone
STOP_TIMEOUT = 2.0  # seconds the finally waits after SIGTERM, then after SIGKILL


@dataclass
class Trace:
    pid: int | None = None
    lines_at: list[float] = field(default_factory=list)  # time.monotonic() of each line passed on
    finally_at: float | None = None
    returncode: int | None = None  # set once the finally has reaped the child
    state: DisconnectState | None = None  # with the middleware only


async def stop_child(proc: asyncio.subprocess.Process) -> int:
    """Terminate the child, wait a bounded time, kill it if need be; reap it. Return its code."""
    for signal_it in (proc.terminate, proc.kill):
        if proc.returncode is not None:
            break
        with contextlib.suppress(ProcessLookupError):  # it exited by itself meanwhile
            signal_it()
        with contextlib.suppress(TimeoutError):
            # communicate(): drain its stdout (so the pipe reaches end of file and asyncio
            # closes its transport) and wait for it, i.e. reap it.
            await asyncio.wait_for(proc.communicate(), STOP_TIMEOUT)
    return await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)


async def child_output(trace: Trace, *, shielded: bool = True) -> AsyncIterator[bytes]:
    """The child's stdout, a line a chunk; its ``finally`` stops and reaps the child.

    ``shielded=False`` drops the shield: tests/test_scenarios.py uses it to show that, with
    no framework listener involved, ``guard_stream`` alone lets the cleanup complete.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-u", "-c", CHILD, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
    )
    trace.pid = proc.pid
    try:
        assert proc.stdout is not None
        for _ in range(MAX_LINES):
            line = await proc.stdout.readline()
            if not line:
                break
            trace.lines_at.append(time.monotonic())
            yield line
    finally:
        trace.finally_at = time.monotonic()
        # shield(): the interruption that ended the loop above (guard_stream's, or
        # Starlette's own disconnect listener) lands at every await until the generator
        # is done, cleanup awaits included. Unshielded, the bounded wait below would be
        # cut short, SIGKILL never sent, and a child that ignores SIGTERM would live on.
        with shield() if shielded else contextlib.nullcontext():
            trace.returncode = await stop_child(proc)


def build_app(traces: list[Trace], guarded: bool) -> ASGIApp:
    async def tail(request: Request) -> StreamingResponse:
        trace = Trace()
        traces.append(trace)
        if not guarded:
            return StreamingResponse(child_output(trace), media_type="text/plain")
        trace.state = disconnect_state(request.scope)
        return StreamingResponse(guard_stream(child_output(trace), request.scope), media_type="text/plain")

    app = Starlette(routes=[Route("/tail", tail)])
    return DisconnectMiddleware(app) if guarded else app


def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, ...), if any."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def pid_state(pid: int) -> str:
    """``"gone"``, ``"zombie"`` (exited, not reaped) or ``"running"``."""
    try:
        os.kill(pid, 0)  # signal 0: only checks that the PID exists
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        return "running"  # not ours any more: the PID was reused
    fields = proc_stat(pid)
    return "zombie" if fields is not None and fields[0] == "Z" else "running"


def kill_leftover(pid: int) -> None:
    """SIGKILL ``pid`` only if it is still a live child of this very process."""
    fields = proc_stat(pid)
    if fields is not None and fields[0] != "Z" and int(fields[1]) == os.getpid():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def wait_gone(pid: int) -> tuple[str, float | None]:
    """Wait (bounded) for ``pid`` to be gone; kill a leftover; return its last state and when it was gone."""
    gone_at = await wait_until(lambda: pid_state(pid) == "gone", GONE_WITHIN)
    state = pid_state(pid)
    if state == "running":  # a leaked child: report it, then do not leave it behind
        kill_leftover(pid)
    return state, gone_at


@dataclass
class Result:
    finally_after: float | None  # seconds from the abort to the generator's finally
    gone_after: float | None  # seconds from the abort to the PID being gone
    last_seen: str  # the child's state at the end of the wait
    lines_after_detection: int | None
    trace: Trace  # what the generator recorded: the PID, and the exit code if it reaped the child


async def run(guarded: bool, server: Serve = serve) -> Result:
    """Serve the app on ``server``; a client reads a few lines and aborts; measure what follows."""
    traces: list[Trace] = []
    async with server(build_app(traces, guarded)) as live:
        outcome = await live.request(path="/tail", leave=leave.after_chunks(READ_LINES, how="rst"))
        abort = left_at(outcome)
        trace = traces[0]
        assert trace.pid is not None
        await wait_until(lambda: trace.finally_at is not None, FINALLY_WITHIN)
        state, gone_at = await wait_gone(trace.pid)
        await wait_until(lambda: trace.returncode is not None, FINALLY_WITHIN)
        after_detection = None
        if trace.state is not None and trace.state.detected_at is not None:
            detected_at = trace.state.detected_at
            after_detection = sum(1 for t in trace.lines_at if t > detected_at)
    return Result(
        finally_after=None if trace.finally_at is None else trace.finally_at - abort,
        gone_after=None if gone_at is None else gone_at - abort,
        last_seen=state,
        lines_after_detection=after_detection,
        trace=trace,
    )


async def main() -> int:
    guarded = await run(guarded=True)
    bare = await run(guarded=False)
    rows = [
        ("generator finally after the abort", seconds(guarded.finally_after), seconds(bare.finally_after)),
        ("child PID gone after", seconds(guarded.gone_after), seconds(bare.gone_after)),
        ("child state at the end", guarded.last_seen, bare.last_seen),
        ("exit code seen by the finally", str(guarded.trace.returncode), str(bare.trace.returncode)),
        ("lines after detection", str(guarded.lines_after_detection), "n/a"),
    ]
    checks = [
        (
            at_most(guarded.finally_after, FINALLY_WITHIN),
            f"the generator's finally did not run within {FINALLY_WITHIN} s",
        ),
        (
            at_most(guarded.gone_after, GONE_WITHIN),
            f"child {guarded.trace.pid} is still {guarded.last_seen} {GONE_WITHIN} s after the abort",
        ),
        (guarded.trace.returncode is not None, "the finally did not reap the child"),
        (at_most(guarded.lines_after_detection, 1), f"{guarded.lines_after_detection} lines passed on after detection"),
    ]
    title = f"the client reads {READ_LINES} lines of the child's output (one every 10 ms), then aborts (RST)"
    return report(title, rows, checks, "with asgi-disconnect the child was terminated and reaped at once")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
