"""``asgi-disconnect doctor``: the real command against the servers installed here.

The command runs once as a user runs it (``python -m asgi_disconnect doctor``, as JSON
and as text); its figures are checked against the servers' own source. What no
installed server does (raise from ``send()``, never deliver the disconnect, block) is
shown with a uvicorn that serves the probe through a simulated ASGI 2.4 server, and
with the probe app driven by hand.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from asgi_disconnect import ClientDisconnected
from asgi_disconnect._tools import doctor
from asgi_disconnect._types import ASGIApp, Message, Receive, Scope, Send

ROOT = Path(__file__).resolve().parent.parent
CLIENT_DISCONNECTED = f"{ClientDisconnected.__module__}.{ClientDisconnected.__qualname__}"

# What the issue asks the doctor to cover, and what each row needs importable: written
# out here, not taken from the doctor, so that a server it forgets fails the test.
EXPECTED_ROWS = {
    "uvicorn-h11": ("uvicorn (h11)", "uvicorn", ("uvicorn", "h11")),
    "uvicorn-httptools": ("uvicorn (httptools)", "uvicorn", ("uvicorn", "httptools")),
    "hypercorn-asyncio": ("hypercorn (asyncio)", "hypercorn", ("hypercorn",)),
    "hypercorn-trio": ("hypercorn (trio)", "hypercorn", ("hypercorn", "trio")),
    "granian": ("granian", "granian", ("granian",)),
    "daphne": ("daphne", "daphne", ("daphne",)),
}
# Where each server builds its HTTP scope, with the spec version it advertises.
SCOPE_SOURCES = {
    "uvicorn-h11": "uvicorn.protocols.http.h11_impl",
    "uvicorn-httptools": "uvicorn.protocols.http.httptools_impl",
    "hypercorn-asyncio": "hypercorn.protocol.http_stream",
    "hypercorn-trio": "hypercorn.protocol.http_stream",
}


def installed(modules: tuple[str, ...]) -> bool:
    return all(importlib.util.find_spec(module) is not None for module in modules)


def advertised_spec_version(module: str) -> str:
    """The ``spec_version`` literal in a server's own scope-building code."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    found: set[str] = set(re.findall(r'"spec_version":\s*"([0-9.]+)"', Path(spec.origin).read_text()))
    assert len(found) == 1, f"{module} advertises {found}"
    return found.pop()


def run_cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "asgi_disconnect", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    """``asgi-disconnect doctor --json`` as a user runs it."""
    document: dict[str, Any] = json.loads(run_cli("--json"))
    return document


@pytest.fixture(scope="module")
def text() -> str:
    """``asgi-disconnect doctor`` as a user runs it."""
    return run_cli()


def rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["key"]: row for row in report["servers"]}


def probes(row: dict[str, Any], app: str) -> list[dict[str, Any]]:
    found = [probe for probe in row["probes"] if probe["app"] == app]
    assert {probe["close"] for probe in found} == {"fin", "rst"}, row
    return found


# --------------------------------------------------------------------------- the real command
@pytest.mark.server
def test_every_server_has_a_row(report: dict[str, Any]) -> None:
    by_key = rows(report)
    for key, (name, package, modules) in EXPECTED_ROWS.items():
        row = by_key[key]
        assert row["name"] == name
        if not installed(modules):
            assert row["status"] == "not installed", row
            continue
        assert row["status"] == "ok", row
        assert row["version"] == importlib.metadata.version(package)
        assert row["asgi_version"] == "3.0", row
    for row in report["servers"]:
        assert row["status"] in ("ok", "not installed"), row  # no server failed to start here


@pytest.mark.server
@pytest.mark.parametrize("key", sorted(SCOPE_SOURCES))
def test_spec_version_is_what_the_server_advertises(report: dict[str, Any], key: str) -> None:
    if not installed(EXPECTED_ROWS[key][2]):
        pytest.skip(f"{key} is not installed")
    assert rows(report)[key]["spec_version"] == advertised_spec_version(SCOPE_SOURCES[key])


@pytest.mark.server
def test_disconnect_reaches_the_app_within_a_second(report: dict[str, Any]) -> None:
    for key, row in rows(report).items():
        if row["status"] != "ok":
            continue
        for probe in probes(row, "bare"):
            delay = probe["disconnect_ms"]
            if key.startswith(("uvicorn", "hypercorn")):
                assert delay is not None and 0 < delay < 1000, (key, probe)
                assert len(probe["samples_ms"]) == doctor._REPEAT
                assert delay == statistics.median(probe["samples_ms"])
            else:  # measured after the client's close on one clock: never negative
                assert delay is None or delay > 0, (key, probe)
            assert probe["send_after_disconnect"] in ("raised", "dropped", "blocked"), (key, probe)
            assert (probe["send_error"] is not None) == (probe["send_after_disconnect"] == "raised"), probe


@pytest.mark.server
def test_behind_the_middleware_send_raises_client_disconnected(report: dict[str, Any]) -> None:
    checked = 0
    for key, row in rows(report).items():
        if row["status"] != "ok":
            continue
        for probe in probes(row, "wrapped"):
            assert 0 < probe["disconnect_ms"] < 1000, (key, probe)
            assert probe["send_after_disconnect"] == "raised", (key, probe)
            assert probe["send_error"] == CLIENT_DISCONNECTED, (key, probe)
            assert probe["send_error_is_oserror"] is True
        assert row["tracebacks"]["wrapped"] == 0, (key, row["logged_exceptions"])
        checked += 1
    assert checked >= 2  # uvicorn and hypercorn at least (the dev extra installs them)


@pytest.mark.server
def test_summary_follows_the_results(report: dict[str, Any]) -> None:
    ok = [row for row in report["servers"] if row["status"] == "ok"]
    raising = [row["name"] for row in ok if any(probe["send_error_is_oserror"] for probe in probes(row, "bare"))]
    first = report["summary"][0]
    if raising:
        assert first.startswith("send() raises an OSError after a disconnect"), first
        assert all(name in first for name in raising)
    else:
        assert first.startswith("No server here raises an OSError from send()"), first
        assert "DisconnectMiddleware" in first


@pytest.mark.server
def test_servers_are_stopped_afterwards(report: dict[str, Any]) -> None:
    ports = [row["port"] for row in report["servers"] if row["status"] == "ok"]
    assert ports
    for port in ports:
        with pytest.raises(ConnectionRefusedError):  # granian's worker too: the whole group is gone
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


@pytest.mark.server
def test_text_output_is_a_table(text: str) -> None:
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("server "))
    assert header.split() == [
        "server",
        "version",
        "ASGI/spec",
        "disconnect",
        "send()",
        "after",
        "traceback",
        "detected",
        "send()",
        "after",
        "traceback",
    ]
    for key, (name, package, modules) in EXPECTED_ROWS.items():
        row = next(line for line in lines if line.startswith(name + "  "))
        if not installed(modules):
            assert "not installed" in row
            continue
        cells = re.split(r"\s{2,}", row)
        assert cells[1] == importlib.metadata.version(package), row
        if key in SCOPE_SOURCES:
            assert cells[2] == f"3.0/{advertised_spec_version(SCOPE_SOURCES[key])}", row
        assert re.fullmatch(r"\d+\.\d/\d+\.\d ms", cells[6]), row  # detected by the middleware, FIN/RST
        assert cells[7] == "raises ClientDisconnected", row
        assert cells[8] == "no", row
    # the columns line up
    table = lines[lines.index(header) : lines.index("", lines.index(header))]
    assert len({line.index("raises ClientDisconnected") for line in table if "ms" in line}) == 1
    assert any("DisconnectMiddleware" in line for line in lines[lines.index(header) + 1 :])


def test_the_doctor_imports_no_server() -> None:
    code = (
        "import sys, asgi_disconnect._tools.doctor; "
        "print([m for m in ('uvicorn', 'hypercorn', 'granian', 'daphne', 'h11', 'httptools', 'trio') "
        "if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


# --------------------------------------------------------------------------- missing and broken servers
def test_missing_and_broken_servers_get_a_row(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = doctor.ServerSpec(
        "nowhere", "nowhere server", "nowhere-server", ("asgi_disconnect_no_such_server",), lambda port: ["nowhere"]
    )
    broken = doctor.ServerSpec(
        "broken", "broken server", "asgi-disconnect", ("json",), lambda port: ["asgi_disconnect_no_such_module"]
    )
    monkeypatch.setattr(doctor, "SERVERS", (missing, broken))

    assert doctor.run_doctor(as_json=True) == 0
    by_key = rows(json.loads(capsys.readouterr().out))
    assert by_key["nowhere"]["status"] == "not installed"
    assert by_key["nowhere"]["missing"] == ["asgi_disconnect_no_such_server"]
    assert by_key["broken"]["status"] == "error"
    assert "exited with status 1 at start" in by_key["broken"]["error"]
    assert "No module named asgi_disconnect_no_such_module" in by_key["broken"]["error"]

    assert doctor.run_doctor(as_json=False) == 0
    out = capsys.readouterr().out
    assert re.search(r"^nowhere server\s+-\s+not installed \(needs asgi_disconnect_no_such_server\)$", out, re.M)
    assert re.search(r"^broken server\s+\S+\s+error: exited with status 1 at start", out, re.M)
    assert "Not probed, see the error: broken server" in out


def test_nothing_installed(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    assert doctor.run_doctor(as_json=False) == 0
    out = capsys.readouterr().out
    for name, _, _ in EXPECTED_ROWS.values():
        assert re.search(rf"^{re.escape(name)}\s+-\s+not installed \(needs \w+\)$", out, re.M), name
    assert "No ASGI server is installed here" in out


# --------------------------------------------------------------------------- a server that raises
class ClosedByClient(OSError):
    """What an ASGI 2.4 server raises from ``send()`` once the client has gone."""


def server_that_raises(error: type[Exception]) -> ASGIApp:
    """The probe app as a server that raises ``error`` from ``send()`` after a disconnect runs it."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        gone = False

        async def receive_() -> Message:
            nonlocal gone
            message = await receive()
            gone = gone or message["type"] == "http.disconnect"
            return message

        async def send_(message: Message) -> None:
            if gone and message["type"] == "http.response.body":
                raise error("the client closed the connection")
            await send(message)

        await doctor.probe_app(scope, receive_, send_)

    return app


spec_2_4_app = server_that_raises(ClosedByClient)
runtime_error_app = server_that_raises(RuntimeError)


@pytest.mark.server
@pytest.mark.parametrize(
    ("target", "error", "is_oserror"),
    [
        ("spec_2_4_app", "tests.test_doctor.ClosedByClient", True),
        ("runtime_error_app", "builtins.RuntimeError", False),
    ],
)
def test_a_server_that_raises_from_send(
    monkeypatch: pytest.MonkeyPatch, target: str, error: str, is_oserror: bool
) -> None:
    if not installed(("uvicorn", "h11")):
        pytest.skip("uvicorn is not installed")
    monkeypatch.chdir(ROOT)  # the server imports tests.test_doctor from its working directory
    spec = doctor.ServerSpec(
        "raising",
        "raising uvicorn",
        "uvicorn",
        ("uvicorn",),
        lambda port: [
            "uvicorn",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--http",
            "h11",
            f"tests.test_doctor:{target}",
        ],
    )
    result = doctor.probe_server(spec)
    assert result.status == "ok", result.error

    for close in ("fin", "rst"):
        plain = result.probe("bare", close)
        assert plain is not None
        assert (plain.send_after_disconnect, plain.send_error, plain.send_error_is_oserror) == (
            "raised",
            error,
            is_oserror,
        )
        wrapped = result.probe("wrapped", close)
        assert wrapped is not None and wrapped.send_error == CLIENT_DISCONNECTED
    # The error escaped the plain app: uvicorn logged it, once per probe. Behind the
    # middleware it was absorbed: nothing logged.
    probes_per_app = 2 * doctor._REPEAT  # FIN and RST, each repeated
    assert result.tracebacks == {"bare": probes_per_app, "wrapped": 0}, result.logged_exceptions
    logged = f"{error.removeprefix('builtins.')}: the client closed the connection"
    assert result.logged_exceptions == [logged] * probes_per_app

    table = doctor.format_report([result])
    row = next(line for line in table.splitlines() if line.startswith("raising uvicorn"))
    short = error.rpartition(".")[2]
    assert re.search(rf"raises {short}\s+yes \({probes_per_app}\)\s+.*raises ClientDisconnected\s+no$", row), row
    summary = " ".join(doctor.interpret([result]))
    if is_oserror:
        assert "send() raises an OSError after a disconnect (ASGI 2.4) on raising uvicorn." in summary
    else:
        assert "No server here raises an OSError" in summary
        assert "On raising uvicorn, send() raises something other than an OSError" in summary
    assert (
        "A traceback in the log of raising uvicorn for a client that simply left; behind DisconnectMiddleware, none."
        in summary
    )


# --------------------------------------------------------------------------- the probe app by hand
def http_scope(path: str, probe_id: str) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": f"id={probe_id}".encode(),
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }


async def results(probe_id: str) -> dict[str, Any]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    await doctor.probe_app(http_scope("/results", probe_id), receive, send)
    assert sent[0]["status"] == 200
    record: dict[str, Any] = json.loads(sent[1]["body"])
    return record


@pytest.mark.anyio
@pytest.mark.parametrize("server", ["silent", "blocking", "raising"])
async def test_probe_app_reports_what_send_did(monkeypatch: pytest.MonkeyPatch, server: str) -> None:
    """A server that never delivers the disconnect, one whose send() hangs, one that raises."""
    monkeypatch.setattr(doctor, "DISCONNECT_WAIT", 0.05)
    monkeypatch.setattr(doctor, "_SEND_TIMEOUT", 0.05)
    messages: list[Message] = [{"type": "http.request", "body": b"", "more_body": False}]
    if server != "silent":
        messages.append({"type": "http.disconnect"})
    sent: list[Message] = []

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        if len(sent) >= 2:  # after the first chunk
            if server == "blocking":
                await anyio.sleep_forever()
            if server == "raising":
                raise ClosedByClient("gone")
        sent.append(message)

    probe_id = f"by-hand-{server}"
    if server == "raising":
        with pytest.raises(ClosedByClient):
            await doctor.probe_app(http_scope("/probe", probe_id), receive, send)
    else:
        await doctor.probe_app(http_scope("/probe", probe_id), receive, send)
    record = await results(probe_id)

    assert record["done"] is True
    assert record["spec_version"] == "2.4"
    assert sent[1]["body"] == doctor.FIRST_CHUNK and sent[1]["more_body"] is True
    if server == "silent":
        assert record["disconnect_at"] is None
        assert record["send_after_disconnect"] == "dropped"
        assert sent[-1]["more_body"] is False  # the body was ended
    elif server == "blocking":
        assert record["disconnect_at"] is not None
        assert record["send_after_disconnect"] == "blocked"
    else:
        assert record["send_after_disconnect"] == "raised"
        assert record["send_error"] == "tests.test_doctor.ClosedByClient"
        assert record["send_error_is_oserror"] is True
    assert await results(probe_id) is None  # fetched once: the record is gone


@pytest.mark.anyio
async def test_wrapped_probe_detects_without_receive(capsys: pytest.CaptureFixture[str]) -> None:
    delivered = anyio.Event()
    messages: list[Message] = [{"type": "http.request", "body": b"", "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await delivered.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message.get("body") == doctor.FIRST_CHUNK:
            delivered.set()  # the client leaves once it has read the first chunk

    await doctor.probe_app(http_scope("/probe-wrapped", "by-hand-wrapped"), receive, send)
    record = await results("by-hand-wrapped")
    assert record["disconnect_at"] is not None
    assert record["send_error"] == CLIENT_DISCONNECTED
    assert [m.get("body") for m in sent] == [None, doctor.FIRST_CHUNK]  # nothing after the disconnect
    assert "request_aborted" in capsys.readouterr().out  # the middleware's one log event


@pytest.mark.anyio
async def test_probe_app_speaks_lifespan() -> None:
    incoming: list[Message] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await doctor.probe_app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


# --------------------------------------------------------------------------- reading and showing
def test_scan_log_counts_a_chained_traceback_once() -> None:
    log = b"""INFO: started
ERROR: Exception in ASGI application
Traceback (most recent call last):
  File "x.py", line 1, in app
    await send(message)
OSError: gone

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "y.py", line 2, in run
ClientDisconnect: gone
INFO: 127.0.0.1 - "GET /results" 200
Traceback (most recent call last):
  File "z.py", line 3, in app
RuntimeError: again
"""
    count, exceptions = doctor._scan_log(log)
    assert count == 2
    assert exceptions == ["OSError: gone", "ClientDisconnect: gone", "RuntimeError: again"]


def test_a_server_without_disconnect_is_shown() -> None:
    silent = doctor.ServerReport(
        key="quiet",
        name="quiet server",
        status="ok",
        package="quiet",
        version="1.0",
        asgi_version="3.0",
        spec_version=None,
        probes=[
            doctor.ProbeResult("bare", "fin", None, "dropped", None, None),
            doctor.ProbeResult("bare", "rst", 0.25, "dropped", None, None),
            doctor.ProbeResult("wrapped", "fin", None, "dropped", None, None),
            doctor.ProbeResult("wrapped", "rst", None, "dropped", None, None),
        ],
        tracebacks={"bare": 0, "wrapped": 0},
    )
    table = doctor.format_report([silent])
    row = next(line for line in table.splitlines() if line.startswith("quiet server"))
    assert re.split(r"\s{2,}", row) == [
        "quiet server",
        "1.0",
        "3.0/none",
        "-/0.2 ms",
        "dropped",
        "no",
        "not in 1 s",
        "dropped",
        "no",
    ]
    summary = doctor.interpret([silent])
    assert "No http.disconnect within 1 s of the close from quiet server." in summary
    assert any(s.startswith("DisconnectMiddleware missed a disconnect on quiet server") for s in summary)
    assert "No spec_version from quiet server: the ASGI spec reads that as 2.0." in summary
