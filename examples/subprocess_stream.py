"""Stream a child process's output; when the client leaves, the child must not outlive it.

Run: ``python examples/subprocess_stream.py``. It serves a Starlette app with uvicorn on
a free loopback port. ``GET /tail`` starts a child process (``python -c``: a loop that
prints a line every 10 ms, for up to 1000 s) and streams its stdout, one line per chunk.
The generator's ``finally`` stops the child: SIGTERM, a bounded wait, SIGKILL if it is
still there, and reaps it (``wait()``), so that it leaves neither an orphan nor a zombie.
That cleanup runs inside ``shield()``: whatever interrupted the generator (the client
leaving) would otherwise cancel each of its awaits as well.
A raw-socket client reads a few lines and aborts (TCP RST). The run is done twice:

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

from _support import read_then_abort, serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from asgi_disconnect import DisconnectMiddleware, DisconnectState, disconnect_state, guard_stream, shield

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


async def child_output(trace: Trace) -> AsyncIterator[bytes]:
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
        with shield():
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


@dataclass
class Result:
    pid: int
    finally_after: float | None  # seconds from the abort to the generator's finally
    gone_after: float | None  # seconds from the abort to the PID being gone
    last_seen: str  # the child's state at the end of the wait
    returncode: int | None  # as reaped by the finally, if it got that far
    lines_after_detection: int | None


async def run(guarded: bool) -> Result:
    traces: list[Trace] = []
    async with serve(build_app(traces, guarded)) as port:
        left_at = await asyncio.to_thread(read_then_abort, port, "/tail", f"line {READ_LINES - 1}\n".encode())
        trace = traces[0]
        assert trace.pid is not None
        for _ in range(100):  # at most ~1 s for the finally
            if trace.finally_at is not None:
                break
            await asyncio.sleep(0.01)
        gone_at = None
        state = pid_state(trace.pid)
        for _ in range(200):  # at most ~2 s for the child to be gone
            state = pid_state(trace.pid)
            if state == "gone":
                gone_at = time.monotonic()
                break
            await asyncio.sleep(0.01)
        if state == "running":  # a leaked child: report it, then do not leave it behind
            kill_leftover(trace.pid)
        after_detection = None
        if trace.state is not None and trace.state.detected_at is not None:
            detected_at = trace.state.detected_at
            after_detection = sum(1 for t in trace.lines_at if t > detected_at)
    return Result(
        pid=trace.pid,
        finally_after=None if trace.finally_at is None else trace.finally_at - left_at,
        gone_after=None if gone_at is None else gone_at - left_at,
        last_seen=state,
        returncode=trace.returncode,
        lines_after_detection=after_detection,
    )


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value * 1000:.1f} ms"


async def main() -> int:
    guarded = await run(guarded=True)
    bare = await run(guarded=False)
    print(f"the client reads {READ_LINES} lines of the child's output (one every 10 ms), then aborts (RST)")
    print(f"{'':34}{'asgi-disconnect':>18}{'bare Starlette':>18}")
    rows = [
        ("generator finally after the abort", seconds(guarded.finally_after), seconds(bare.finally_after)),
        ("child PID gone after", seconds(guarded.gone_after), seconds(bare.gone_after)),
        ("child state at the end", guarded.last_seen, bare.last_seen),
        ("exit code seen by the finally", str(guarded.returncode), str(bare.returncode)),
        ("lines after detection", str(guarded.lines_after_detection), "n/a"),
    ]
    for label, left, right in rows:
        print(f"{label:34}{left:>18}{right:>18}")
    failures = []
    if guarded.finally_after is None or guarded.finally_after > FINALLY_WITHIN:
        failures.append(f"the generator's finally did not run within {FINALLY_WITHIN} s")
    if guarded.gone_after is None or guarded.gone_after > GONE_WITHIN:
        failures.append(f"child {guarded.pid} is still {guarded.last_seen} {GONE_WITHIN} s after the abort")
    if guarded.returncode is None:
        failures.append("the finally did not reap the child")
    if guarded.lines_after_detection is None or guarded.lines_after_detection > 1:
        failures.append(f"{guarded.lines_after_detection} lines passed on after detection")
    for failure in failures:
        print(f"FAILED: {failure}")
    if not failures:
        print("OK: with asgi-disconnect the child was terminated and reaped at once")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
