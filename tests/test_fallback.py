"""Promise 9: when the private internals the fast path reads are not what it expects, the
middleware falls back to the public anyio path, decided once, and stays correct.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio._backends._asyncio as anyio_asyncio
import pytest

from asgi_disconnect import _fastpath

ROOT = Path(__file__).resolve().parent.parent


class NoScope:
    def __init__(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("target", "name", "value"),
    [
        (anyio_asyncio, "_task_states", None),  # the table renamed
        (anyio_asyncio, "TaskState", NoScope),  # its entries without cancel_scope
        (anyio_asyncio, "CancelScope", NoScope),  # scopes without _parent_scope or shield
    ],
)
def test_the_probe_turns_the_fast_path_off_when_anyio_changed(
    monkeypatch: pytest.MonkeyPatch, target: Any, name: str, value: Any
) -> None:
    """Each private anyio name the fast path reads, missing or changed, makes _probe() say no."""
    monkeypatch.setattr(_fastpath, "fast_task", _fastpath.fast_task)
    monkeypatch.setattr(_fastpath, "_task_states", _fastpath._task_states)
    if value is None:
        monkeypatch.delattr(target, name)
    else:
        monkeypatch.setattr(target, name, value)
    assert _fastpath._probe() is False


def test_the_probe_accepts_the_installed_anyio(monkeypatch: pytest.MonkeyPatch) -> None:
    """With anyio and asyncio as they are here, the fast path is on."""
    monkeypatch.setattr(_fastpath, "fast_task", _fastpath.fast_task)
    monkeypatch.setattr(_fastpath, "_task_states", _fastpath._task_states)
    assert _fastpath._probe() is True
    assert _fastpath.ENABLED is True
    assert hasattr(asyncio.Task, "_fut_waiter")


def test_cancel_shield_and_stream_suites_pass_on_the_public_anyio_path() -> None:
    """The cancellation, shield(), guard_stream and transparency tests pass with anyio's internals hidden."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("COVERAGE_PROCESS_START", None)
    tests = ["tests/test_cancel.py", "tests/test_stream.py"]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.fallback_plugin", *tests],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, f"on the fallback path: {summary}\n{run.stdout[-4000:]}"
    assert " passed" in summary and "failed" not in summary, summary
