"""A Quart app whose views and lifecycle hooks count what happened to them, for tests/test_quart.py.

- ``/fast``: answers at once.
- ``/slow?t=S``: awaits an upstream for ``S`` seconds (default ``UPSTREAM``, longer than
  any test waits: only a cancellation ends it early), then answers.
- ``/echo`` (POST): answers with the request body.
- ``/stream?n=N``: ``make_response(chunks(N))`` over an async generator, ``N`` chunks
  (default ``STREAM_CHUNKS``), one every ``STREAM_INTERVAL`` seconds. Quart builds the
  response, tears the request context down, and only then iterates the generator.
- ``/stream/context?n=N``: the same generator under ``stream_with_context``: it runs in a
  copy of the request context, which is pushed (and torn down) a second time around it.
- ``/stream/until-gone``: two chunks, then it awaits ``disconnect_state(...).wait()`` and
  sends one last chunk to the departed client (bare, it waits for Quart's cancellation).

The hooks count every step of Quart's lifecycle: the signals ``request_started``,
``request_finished``, ``request_tearing_down``, ``appcontext_pushed`` and
``appcontext_popped``, the ``before_request``, ``after_request``, ``teardown_request``
(one async, one sync: Quart runs that one in a worker thread) and
``teardown_appcontext`` functions, and ``before_serving`` / ``after_serving``.
``before_request`` also keeps the request's ``DisconnectState`` (None when the app runs
bare), read from ``request.scope`` as a user would, and names its route for the
middleware's record (``state.route``: Quart puts no route template in the scope);
``teardown_request`` notes what the state said by then. Every cleanup that awaits counts
whether it completed or met a second cancellation. The sync teardown runs in a thread:
the counts are taken under a lock.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from quart import Quart, Response, has_app_context, has_request_context, make_response, request, stream_with_context
from quart.signals import (
    appcontext_popped,
    appcontext_pushed,
    request_finished,
    request_started,
    request_tearing_down,
)
from quart.typing import ResponseReturnValue

from asgi_disconnect import DisconnectState, disconnect_state
from tests.helpers import Counts

UPSTREAM = 3.0  # seconds the slow view's upstream takes: every test that leaves ends long before
STREAM_CHUNKS = 300  # 3 s of stream at most: a test fails long before, if nothing stops it
STREAM_INTERVAL = 0.01


def chunk(index: int) -> bytes:
    return b"chunk %04d\n" % index


class Probe(Counts):
    """What the views and hooks did: counters, chunk times, the states the requests carried."""

    def __init__(self) -> None:
        super().__init__()
        self.teardown_errors: Counter[str] = Counter()  # the exception each teardown_request was given
        self.teardown_saw: Counter[str] = Counter()  # what disconnect_state() said at teardown_request
        self.produced: list[float] = []  # time.monotonic() of each chunk a stream produced
        self.states: list[DisconnectState | None] = []
        self.upstream_waiting = threading.Event()  # a slow view waits on its upstream

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.teardown_errors.clear()
            self.teardown_saw.clear()
            self.produced.clear()
            self.states.clear()
        self.upstream_waiting.clear()


probe = Probe()
app = Quart(__name__)


@app.route("/fast")
async def fast() -> bytes:
    return b"fast"


@app.route("/slow")
async def slow() -> bytes:
    probe.add("slow.started")
    try:
        probe.upstream_waiting.set()
        await asyncio.sleep(float(request.args.get("t", UPSTREAM)))
    except asyncio.CancelledError:
        probe.add("slow.cancelled")
        await probe.cleanup("slow")
        raise
    probe.add("slow.completed")
    return b"slow"


@app.route("/echo", methods=["POST"])
async def echo() -> bytes:
    return b"echo:" + await request.get_data(cache=True, as_text=False, parse_form_data=False)


async def chunks(count: int) -> AsyncIterator[bytes]:
    probe.add("stream.started")
    try:
        for index in range(count):
            with probe.lock:
                probe.produced.append(time.monotonic())
            yield chunk(index)
            await asyncio.sleep(STREAM_INTERVAL)
        probe.add("stream.completed")
    except BaseException as exc:
        # Cancelled while it sleeps, or closed (GeneratorExit) while Quart's send() is cancelled.
        probe.add(f"stream.stopped.{type(exc).__name__}")
        raise
    finally:
        probe.add("stream.finally")
        await probe.cleanup("stream")


@app.route("/stream")
async def stream() -> ResponseReturnValue:
    return await make_response(chunks(int(request.args.get("n", STREAM_CHUNKS))))


@app.route("/stream/context")
async def stream_in_context() -> ResponseReturnValue:
    count = int(request.args.get("n", STREAM_CHUNKS))

    @stream_with_context
    async def body() -> AsyncIterator[bytes]:
        probe.add("stream.in_context" if has_request_context() else "stream.out_of_context")
        async for data in chunks(count):
            yield data

    return await make_response(body())


async def until_gone(state: DisconnectState | None) -> AsyncIterator[bytes]:
    """Two chunks, then one more once the middleware knows the client left (never, bare)."""
    probe.add("stream.started")
    try:
        yield chunk(0)
        yield chunk(1)
        if state is None:
            await asyncio.sleep(UPSTREAM)  # bare: only Quart's cancellation ends it
        else:
            await state.wait()
        probe.add("stream.last_word")
        with probe.lock:
            probe.produced.append(time.monotonic())
        yield b"bye\n"  # sent to a client that is gone, before Quart's cancellation lands
        await asyncio.sleep(UPSTREAM)
        probe.add("stream.completed")
    except BaseException as exc:
        probe.add(f"stream.stopped.{type(exc).__name__}")
        raise
    finally:
        probe.add("stream.finally")
        await probe.cleanup("stream")


@app.route("/stream/until-gone")
async def stream_until_gone() -> ResponseReturnValue:
    return await make_response(until_gone(state_of_request()))


# -- the lifecycle -------------------------------------------------------------------------


def state_of_request() -> DisconnectState | None:
    try:
        return disconnect_state(request.scope)
    except LookupError:
        return None  # bare: no middleware in front


@app.before_serving
async def before_serving() -> None:
    probe.add("before_serving")


@app.after_serving
async def after_serving() -> None:
    probe.add("after_serving")


@app.before_request
async def before_request() -> None:
    probe.add("before_request")
    state = state_of_request()
    if state is not None and request.url_rule is not None:
        state.route = request.url_rule.rule  # Quart records no route template in the scope
    with probe.lock:
        probe.states.append(state)


@app.after_request
async def after_request(response: Response) -> Response:
    probe.add("after_request")
    return response


@app.teardown_request
async def teardown_async(exc: BaseException | None) -> None:
    probe.add("teardown_request.async")
    state = state_of_request()
    with probe.lock:
        probe.teardown_errors[type(exc).__name__] += 1
        probe.teardown_saw["bare" if state is None else state.phase or "connected"] += 1


@app.teardown_request
def teardown_sync(exc: BaseException | None) -> None:
    probe.add("teardown_request.sync")  # in a worker thread: Quart's ensure_async


@app.teardown_appcontext
async def teardown_appcontext(exc: BaseException | None) -> None:
    probe.add("teardown_appcontext")


async def on_request_started(sender: Quart, **kwargs: Any) -> None:
    probe.add("request_started")


async def on_request_finished(sender: Quart, **kwargs: Any) -> None:
    probe.add("request_finished")


async def on_request_tearing_down(sender: Quart, **kwargs: Any) -> None:
    probe.add("request_tearing_down")


async def on_appcontext_pushed(sender: Quart, **kwargs: Any) -> None:
    probe.add("appcontext_pushed")


async def on_appcontext_popped(sender: Quart, **kwargs: Any) -> None:
    # Sent once the app context is reset: with the request context reset before it, both
    # context variables are back to what the task had before the request.
    probe.add("appcontext_popped")
    if has_app_context() or has_request_context():
        probe.add("context_left_behind")


request_started.connect(on_request_started, app)
request_finished.connect(on_request_finished, app)
request_tearing_down.connect(on_request_tearing_down, app)
appcontext_pushed.connect(on_appcontext_pushed, app)
appcontext_popped.connect(on_appcontext_popped, app)
