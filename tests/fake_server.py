"""A scripted, spec-exact ASGI HTTP server side for one request (tests/test_properties.py).

Unlike ``tests.peer.Peer`` it records everything a protocol property needs: each
``receive()`` call with what the app had consumed at that moment, every message
delivered and every message sent, and whether the client had left. The app side of a
scenario updates ``app_in_receive``, ``app_received`` and ``state`` as it runs.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import anyio
import anyio.abc
import anyio.lowlevel

from asgi_disconnect import DisconnectState
from asgi_disconnect._types import Message

SendMode = Literal["2.3", "2.4"]


class ServerSendError(ConnectionResetError):
    """What the fake ASGI 2.4 server's ``send()`` raises once the client has gone."""


def is_disconnect(message: Message) -> bool:
    """True for an ``http.disconnect`` message."""
    return bool(message["type"] == "http.disconnect")


def body_bytes(message: Message) -> int:
    """Body bytes an ``http.request`` or ``http.response.body`` message carries."""
    if message["type"] in ("http.request", "http.response.body"):
        return len(message.get("body", b""))
    return 0


@dataclass(frozen=True)
class ReceiveCall:
    """What the world looked like when someone called the server's ``receive()``."""

    index: int
    app_in_receive: bool  # the app is inside receive(): the call is on its behalf
    app_has_received: bool  # the app called receive() before (it consumes the body itself)
    response_complete: bool  # the app sent its final message and it was not refused
    body_complete: bool  # the final http.request was delivered
    unread_bytes: int  # body bytes delivered to the middleware and not yet to the app
    unread_messages: int  # messages delivered to the middleware and not yet to the app
    gone: bool
    in_flight: int  # other receive() calls in progress (the single-reader rule: 0)
    after_return: bool  # the middleware had already returned


@dataclass(frozen=True)
class SendCall:
    """One call of the server's ``send()``."""

    message: Message
    state_disconnected: bool  # the middleware already knew: the message must not get here
    outcome: Literal["accepted", "dropped", "raised"]
    after_return: bool


class FakeServer:
    """The server for one HTTP request, driven by a script.

    ``receive()`` delivers ``incoming`` in order (each after ``receive_delays[i]``
    checkpoints), then blocks until the client leaves. Once the client has left it
    returns ``http.disconnect`` at once, every time, whatever was left unread (the ASGI
    spec: "sent if receive is called after the HTTP connection has been closed"); with
    ``disconnect_after_response`` also once the response is complete (what uvicorn does).

    The client leaves when ``leave()`` is called, on the ``leave_at_receive``-th call of
    ``receive()`` (that call returns the disconnect), or during the ``leave_at_send``-th
    call of ``send()`` (that message is the first one the client never gets). After it
    left, ``send()`` drops messages silently (``send_mode="2.3"``) or raises
    ``ServerSendError``, an ``OSError`` (``"2.4"``).
    """

    def __init__(
        self,
        incoming: Iterable[Message],
        *,
        send_mode: SendMode = "2.3",
        leave_at_receive: int | None = None,
        leave_at_send: int | None = None,
        receive_delays: Iterable[int] = (),
        send_delay: int = 0,
        disconnect_after_response: bool = False,
    ) -> None:
        self.queue: deque[Message] = deque(incoming)
        self.send_mode = send_mode
        self.leave_at_receive = leave_at_receive
        self.leave_at_send = leave_at_send
        self.receive_delays = tuple(receive_delays)
        self.send_delay = send_delay
        self.disconnect_after_response = disconnect_after_response
        # the client
        self.gone = False
        self.left_at: float | None = None
        self.leaving_soon = 0  # helper tasks that will call leave() within a few checkpoints
        self._wake = anyio.Event()
        # what happened
        self.receive_calls: list[ReceiveCall] = []
        self.unread_after: dict[int, int] = {}  # call index: unread body bytes once it returned
        self.delivered: list[Message] = []
        self.delivered_body_bytes = 0
        self.body_complete = False
        self.send_calls: list[SendCall] = []
        self.response_complete = False
        self.trailers_announced = False
        self.in_flight = 0
        self.returned = False  # set by the scenario once the middleware returned
        # the app side, kept up to date by the scenario's app
        self.app_in_receive = False
        self.app_receive_calls = 0
        self.app_received: list[Message] = []
        self.app_received_body_bytes = 0
        self.state: DisconnectState | None = None

    # -- the client ------------------------------------------------------------------

    def leave(self) -> None:
        """The client closes the connection."""
        if not self.gone:
            self.gone = True
            self.left_at = time.monotonic()
            self._wake.set()

    def leave_soon(self, tg: anyio.abc.TaskGroup, checkpoints: int) -> None:
        """The client closes the connection after ``checkpoints`` scheduling rounds."""

        async def later() -> None:
            try:
                for _ in range(checkpoints):
                    await anyio.lowlevel.checkpoint()
                self.leave()
            finally:
                self.leaving_soon -= 1

        self.leaving_soon += 1
        tg.start_soon(later)

    # -- what the app may expect -------------------------------------------------------

    def next_receive_blocks(self) -> bool:
        """Would a ``receive()`` called now block until the client leaves?"""
        if self.gone or self.leaving_soon or self.queue:
            return False
        if self.disconnect_after_response and self.response_complete:
            return False
        if self.in_flight:
            return True  # that call waits for the client: a receive() now waits on it
        return self.leave_at_receive is None or len(self.receive_calls) < self.leave_at_receive

    # -- the ASGI callables ------------------------------------------------------------

    def unread(self) -> tuple[int, int]:
        """(body bytes, messages) delivered by the server and not yet received by the app."""
        delivered = [m for m in self.delivered if not is_disconnect(m)]
        received = [m for m in self.app_received if not is_disconnect(m)]
        return self.delivered_body_bytes - self.app_received_body_bytes, len(delivered) - len(received)

    async def receive(self) -> Message:
        index = len(self.receive_calls)
        unread_bytes, unread_messages = self.unread()
        self.receive_calls.append(
            ReceiveCall(
                index=index,
                app_in_receive=self.app_in_receive,
                app_has_received=self.app_receive_calls > 0,
                response_complete=self.response_complete,
                body_complete=self.body_complete,
                unread_bytes=unread_bytes,
                unread_messages=unread_messages,
                gone=self.gone,
                in_flight=self.in_flight,
                after_return=self.returned,
            )
        )
        if self.leave_at_receive is not None and index >= self.leave_at_receive:
            self.leave()
        self.in_flight += 1
        try:
            for _ in range(self.receive_delays[index] if index < len(self.receive_delays) else 0):
                await anyio.lowlevel.checkpoint()
            while not self.closed and not self.queue:
                await self._wake.wait()
            message: Message
            if self.closed:
                message = {"type": "http.disconnect"}
            else:
                message = self.queue.popleft()
                if message["type"] == "http.request":
                    self.delivered_body_bytes += body_bytes(message)
                    if not message.get("more_body", False):
                        self.body_complete = True
            self.delivered.append(message)
            self.unread_after[index] = self.unread()[0]
            return message
        finally:
            self.in_flight -= 1

    @property
    def closed(self) -> bool:
        """receive() answers http.disconnect now: the client left, or the response is over."""
        return self.gone or (self.disconnect_after_response and self.response_complete)

    async def send(self, message: Message) -> None:
        index = len(self.send_calls)
        disconnected = self.state is not None and self.state.disconnected
        if self.leave_at_send is not None and index == self.leave_at_send:
            self.leave()  # the client goes while this message is being written
        if self.gone and self.send_mode == "2.4":
            self.send_calls.append(SendCall(message, disconnected, "raised", self.returned))
            raise ServerSendError("the client closed the connection")
        self.send_calls.append(SendCall(message, disconnected, "dropped" if self.gone else "accepted", self.returned))
        if self._completes(message):
            self.response_complete = True
            if self.disconnect_after_response:
                self._wake.set()
        for _ in range(self.send_delay):
            await anyio.lowlevel.checkpoint()  # flow control: drain() after the write

    def _completes(self, message: Message) -> bool:
        kind = message["type"]
        if kind == "http.response.start":
            self.trailers_announced = bool(message.get("trailers", False))
            return False
        if kind == "http.response.body":
            return not message.get("more_body", False) and not self.trailers_announced
        if kind == "http.response.trailers":
            return not message.get("more_trailers", False)
        if kind == "http.response.zerocopysend":
            return not message.get("more_body", False)
        return bool(kind == "http.response.pathsend")

    def record_app_received(self, message: Message) -> None:
        """The app got ``message`` from its ``receive()``."""
        self.app_received.append(message)
        self.app_received_body_bytes += body_bytes(message)
