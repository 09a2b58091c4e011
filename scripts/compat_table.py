"""README's compatibility table, rendered from the outcomes of the tests that prove its cells.

    scripts/compat-table                  run the compat-marked tests, rewrite the table
    scripts/compat-table --check          run them, fail if README's table differs
    scripts/compat-table --check --from build/compat.json
                                          judge the outcomes of a run already made
                                          (scripts/test writes them there)

A cell (framework, server, feature; tests/compat.py) shows "✓" when every test marked with
it passed. Versions are major.minor, read from this environment: a new minor release of a
component makes the table stale until it is tested and rendered again.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.compat import FEATURES, FRAMEWORKS, SERVERS  # noqa: E402

README = ROOT / "README.md"
REPORT = ROOT / "build" / "compat.json"
START = "<!-- compat-table: start (scripts/compat-table writes this part) -->"
END = "<!-- compat-table: end -->"

# The components behind each key, as the versions line names them.
PACKAGES = {
    "starlette": ["starlette"],
    "fastapi": ["fastapi", "starlette"],
    "litestar": ["litestar"],
    "django": ["django"],
    "quart": ["quart"],
    "uvicorn-h11": ["uvicorn", "h11"],
    "uvicorn-httptools": ["uvicorn", "httptools"],
    "hypercorn-asyncio": ["hypercorn"],
    "hypercorn-trio": ["hypercorn", "trio"],
    "hypercorn-h2c": ["hypercorn", "h2"],
    "hypercorn-h2-tls": ["hypercorn", "h2"],
    "granian": ["granian"],
    "daphne": ["daphne"],
    "gunicorn-uvicorn": ["gunicorn", "uvicorn"],
    "nginx-buffered": ["nginx", "uvicorn"],
    "nginx-unbuffered": ["nginx", "uvicorn"],
    "nginx-keepalive": ["nginx", "uvicorn"],
    "chromium": ["chromium", "uvicorn"],
}
NAMES = {
    "django": "Django",
    "quart": "Quart",
    "fastapi": "FastAPI",
    "starlette": "Starlette",
    "litestar": "Litestar",
    "chromium": "Chromium",
}
BINARIES = {"nginx": ["nginx", "-v"], "chromium": ["chromium", "--version"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if README's table is not what the outcomes give")
    parser.add_argument("--from", dest="source", type=Path, help="the outcomes of a run already made (JSON)")
    args = parser.parse_args()
    source: Path = args.source or REPORT
    if args.source is None:
        run = [sys.executable, "-m", "pytest", "-q", "-m", "compat", "-p", "no:cacheprovider"]
        ran = subprocess.run([*run, f"--compat-report={source}"], cwd=ROOT, check=False)
        if ran.returncode not in (0, 1):  # 1: some tests failed, which the table shows
            print(f"compat-table: pytest exited with {ran.returncode}", file=sys.stderr)
            return 2
    if not source.is_file():
        print(f"compat-table: no outcomes at {source}: run the suite (scripts/test) first", file=sys.stderr)
        return 2
    table = render(json.loads(source.read_text()))
    text = README.read_text()
    before, start, rest = text.partition(START)
    current, end, after = rest.partition(END)
    if not start or not end:
        print(f"compat-table: README.md lacks the markers {START!r} ... {END!r}", file=sys.stderr)
        return 2
    if current.strip("\n") == table:
        print("compat-table: README's table is current")
        return 0
    if args.check:
        diff = difflib.unified_diff(
            current.strip("\n").splitlines(), table.splitlines(), "README.md", "outcomes", lineterm=""
        )
        print("\n".join(diff))
        print("compat-table: README's table is stale: run scripts/compat-table and commit README.md", file=sys.stderr)
        return 1
    README.write_text(f"{before}{START}\n{table}\n{END}{after}")
    print(f"compat-table: README.md rewritten from {source}")
    return 0


def render(report: dict[str, list[dict[str, object]]]) -> str:
    """The table: a row per server and framework, a column per feature, then the versions."""
    outcomes: dict[tuple[str, str, str], list[str]] = {}
    for test in report["tests"]:
        for cell in test["cells"]:  # type: ignore[attr-defined]
            key = (cell["server"], cell["framework"], cell["feature"])
            outcomes.setdefault(key, []).append(str(test["outcome"]))
    features = [f for f in FEATURES if any(key[2] == f for key in outcomes)]
    rows = sorted(
        {(server, framework) for server, framework, _ in outcomes},
        key=lambda row: (list(SERVERS).index(row[0]), list(FRAMEWORKS).index(row[1])),
    )
    lines = [
        "| server | framework | " + " | ".join(FEATURES[f] for f in features) + " |",
        "|---|---|" + "---|" * len(features),
    ]
    for server, framework in rows:
        cells = [_mark(outcomes.get((server, framework, feature))) for feature in features]
        lines.append(f"| {SERVERS[server]} | {FRAMEWORKS[framework]} | " + " | ".join(cells) + " |")
    used = {key for row in rows for key in row}
    components = sorted({name for key in used for name in PACKAGES.get(key, [])}, key=str.lower)
    versions = ", ".join(f"{NAMES.get(name, name)} {_version(name)}" for name in components)
    count = sum(1 for test in report["tests"] if test["cells"])
    lines += [
        "",
        "✓: every test of the cell passed; ✗: one failed; skipped: not run here; –: not tested.",
        f"{count} tests, on Python {platform.python_version_tuple()[0]}.{platform.python_version_tuple()[1]}"
        f" with {versions}.",
    ]
    return "\n".join(lines)


def _mark(outcomes: list[str] | None) -> str:
    if not outcomes:
        return "–"
    if "failed" in outcomes:
        return "✗"
    if all(outcome == "passed" for outcome in outcomes):
        return "✓"
    return "skipped"


def _version(name: str) -> str:
    """major.minor of a distribution or a binary; "?" when it is not here."""
    if name in BINARIES:
        command = BINARIES[name]
        if shutil.which(command[0]) is None:
            return "?"
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)
        found = re.search(r"(\d+)\.(\d+)", done.stdout + done.stderr)
    else:
        try:
            found = re.match(r"(\d+)\.(\d+)", importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            return "?"
    return f"{found[1]}.{found[2]}" if found else "?"


if __name__ == "__main__":
    sys.exit(main())
