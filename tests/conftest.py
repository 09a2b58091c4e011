"""Every unit test runs three times: asyncio (the fast path), asyncio on the reference path
(the plain anyio task group that the fast path must match), and trio."""

from __future__ import annotations

import json
import pathlib

import pytest

from asgi_disconnect import _fastpath, _middleware


@pytest.fixture(params=["asyncio", "asyncio-reference", "trio"])
def anyio_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Unit tests run on both anyio backends and both paths; real-server tests pin asyncio."""
    if request.param == "asyncio-reference":
        # No request finds a task to take the fast path in: each one runs in a task group.
        monkeypatch.setattr(_middleware, "fast_task", _fastpath._no_task)
        return "asyncio"
    return str(request.param)


# ---------------------------------------------------------------- the compatibility table
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--compat-report", metavar="FILE", help="write the outcomes of compat-marked tests here (JSON)")


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--compat-report")
    if path:
        config.pluginmanager.register(CompatReport(pathlib.Path(path)), "compat-report")


def pytest_itemcollected(item: pytest.Item) -> None:
    # Carried by the test's reports, which pytest-xdist's workers send to the controller.
    marks = [dict(mark.kwargs) for mark in item.iter_markers("compat")]
    if marks:
        item.user_properties.append(("compat", marks))


class CompatReport:
    """Writes the outcome of each test marked ``compat(...)`` (tests/compat.py) and the
    cells it proves, for scripts/compat-table."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.cells: dict[str, object] = {}
        self.outcomes: dict[str, str] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        cells = dict(report.user_properties).get("compat")
        if cells is None:
            return
        self.cells[report.nodeid] = cells
        if report.failed:
            self.outcomes[report.nodeid] = "failed"
        elif report.skipped and report.nodeid not in self.outcomes:
            self.outcomes[report.nodeid] = "skipped"
        elif report.when == "call" and report.passed:
            self.outcomes[report.nodeid] = "passed"

    def pytest_sessionfinish(self) -> None:
        tests = [
            {"test": nodeid, "outcome": self.outcomes.get(nodeid, "not run"), "cells": cells}
            for nodeid, cells in sorted(self.cells.items())
        ]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"tests": tests}, indent=1) + "\n")
