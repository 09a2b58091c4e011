"""``asgi-disconnect demo``: the showcase runs as a user runs it and shows what it claims."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.server


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asgi_disconnect", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def demo() -> dict[str, Any]:
    done = run_cli("demo", "--quick", "--json")
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    assert "retry storm, cancel" in done.stderr  # the progress went to stderr
    return data


def test_token_stream_keeps_generating_only_without_the_middleware(demo: dict[str, Any]) -> None:
    tokens = demo["scenarios"]["tokens"]
    assert tokens["bare"]["work_after"] >= 20  # uvicorn drops the tokens without telling the app
    assert tokens["bare"]["returned_after_ms"] > 300
    assert tokens["observe"]["work_after"] <= 1  # send() raised ClientDisconnected at the next token
    assert tokens["cancel"]["work_after"] == 0
    assert tokens["cancel"]["returned_after_ms"] < 100


def test_starlette_stream_stops_in_every_mode(demo: dict[str, Any]) -> None:
    # Starlette's own listener stops it bare; the middleware must not make that worse
    for mode, outcome in demo["scenarios"]["sse"].items():
        assert outcome["work_after"] <= 1, mode
        assert outcome["returned_after_ms"] < 100, mode


def test_order_is_committed_for_a_gone_client_only_without_the_middleware(demo: dict[str, Any]) -> None:
    order = demo["scenarios"]["order"]
    assert order["bare"]["committed"] is True
    assert order["bare"]["transaction_open_ms"] > 100
    assert order["bare"]["work_after"] >= 5
    for mode in ("observe", "cancel"):
        assert order[mode]["committed"] is False, mode  # rolled back
        assert order[mode]["transaction_open_ms"] < 100, mode
        assert order[mode]["work_after"] <= 1, mode


def test_only_cancel_mode_stops_a_handler_that_never_checks(demo: dict[str, Any]) -> None:
    slow = demo["scenarios"]["slow"]
    assert slow["bare"]["work_after"] >= 4
    assert slow["observe"]["work_after"] >= 4
    assert slow["cancel"]["work_after"] == 0
    assert slow["cancel"]["returned_after_ms"] < 100


def test_each_abort_is_logged_once_and_nothing_prints_a_traceback(demo: dict[str, Any]) -> None:
    for key, by_mode in demo["scenarios"].items():
        assert by_mode["bare"]["logged"] == 0, key
        assert by_mode["observe"]["logged"] == 1, key
        assert by_mode["cancel"]["logged"] == 1, key
        for mode, outcome in by_mode.items():
            assert outcome["tracebacks"] == 0, (key, mode)


def test_the_scraped_metrics_count_every_abort_by_route_phase_and_cancellation(demo: dict[str, Any]) -> None:
    """The Prometheus text the demo ends with: one sample per scenario and wrapped mode, and the
    storm's aborts in cancel mode; the bare app counts nothing."""
    from prometheus_client.parser import text_string_to_metric_families

    counted = {
        (family.name.split("_")[0], sample.labels["route"], sample.labels["phase"], sample.labels["cancelled"]): (
            sample.value
        )
        for family in text_string_to_metric_families(demo["metrics"])
        for sample in family.samples
    }
    expected = {}
    for mode in ("observe", "cancel"):
        expected[(mode, "/tokens", "mid_body", str(mode == "cancel").lower())] = 1.0
        expected[(mode, "/sse", "mid_body", "false")] = 1.0  # Starlette's stream stops itself: never cancelled
        expected[(mode, "/order", "before_response", str(mode == "cancel").lower())] = 1.0
        expected[(mode, "/slow", "before_response", str(mode == "cancel").lower())] = 1.0
    # Every storm client that gave up left before its response; one whose response was on its
    # way as it gave up may have had it (never more aborts than timeouts).
    storm = counted.pop(("cancel", "/storm", "before_response", "true"))
    assert 0 < storm <= demo["storm"]["cancel"]["timed_out"]
    assert counted == expected


def test_cancel_mode_frees_the_slots_of_a_retry_storm(demo: dict[str, Any]) -> None:
    bare, cancel = demo["storm"]["bare"], demo["storm"]["cancel"]
    assert bare["abandoned_slots_mean"] > 5  # gone clients' handlers hold the concurrency limit
    assert cancel["abandoned_slots_mean"] < 1
    assert cancel["useful_per_second"] > bare["useful_per_second"] * 1.3


def test_the_text_report_is_what_a_newcomer_sees() -> None:
    done = run_cli("demo", "--quick")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("asgi-disconnect demo: what happens when clients leave mid-request\n")
    assert "uvicorn " in out and "on http://127.0.0.1:" in out
    header = next(line for line in out.splitlines() if line.strip().startswith("bare app"))
    assert header.split() == ["bare", "app", "observe", "cancel"]
    for title in ("LLM token stream", "SSE feed", "DB transaction", "slow handler", "Retry storm"):
        assert title in out
    assert "useful responses per second" in out
    assert (
        'cancel_http_requests_aborted_total{cancelled="true",method="GET",phase="mid_body",route="/tokens"} 1.0' in out
    )
    assert "finished in" in out
    assert done.stderr == ""  # no server traceback, no structlog line leaked to the terminal


def test_no_command_prints_the_usage() -> None:
    done = run_cli()
    assert done.returncode == 2
    assert "demo" in done.stdout and "doctor" in done.stdout


def test_demo_without_uvicorn_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['uvicorn'] = None\n"  # as if the [demo] extra were not installed
        "from asgi_disconnect._tools.cli import main; raise SystemExit(main(['demo']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "needs uvicorn" in done.stderr
    assert "pip install 'asgi-disconnect[demo]'" in done.stderr
