"""Run Starlette's and FastAPI's own test suites bare and behind DisconnectMiddleware, and compare.

Called by ``scripts/peer-suites`` (see ``--help``). Each suite's sdist is downloaded once
through pip (pinned version and sha256), each suite gets its own virtual environment in
the cache, and the suite runs bare, then once per mode with every test client's app
wrapped (``wrap_plugin.py``). A test that passes bare and fails wrapped is run again, bare
and wrapped, to tell a consistent deviation from a flaky test. The exit status is 1 when
there is a consistent deviation, 2 when the harness itself could not do its job.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent.parent
PLUGIN = "wrap_plugin"
WRAPPED_MODES = ("observe", "cancel")
FAILING = frozenset({"failed", "error", "missing"})
KEEP_RUNS = 5  # run directories kept in the cache (logs and raw results)
STAMP = ".peer-suites-complete"

STARLETTE_VERSION = "1.10.0"
FASTAPI_VERSION = "0.165.0"

# Linters, type checkers, docs and release tools: no test uses them. (coverage stays: FastAPI's
# test_fastapi_cli runs ``python -m coverage``.)
TOOLING = frozenset(
    {
        "mypy",
        "playwright",
        "prek",
        "pytest-codspeed",  # benchmarks only; both suites skip them without --codspeed
        "pytest-cov",
        "pytest-sugar",  # output cosmetics
        "ruff",
        "twine",
        "ty",
        "zizmor",
    }
)


class HarnessError(Exception):
    """The harness could not do its job (download, install, a bare run that crashed)."""


@dataclass(frozen=True)
class Suite:
    """One peer suite: which sdist, what its tests need, how pytest runs it."""

    name: str
    version: str
    sha256: str
    groups: tuple[str, ...]  # PEP 735 dependency groups that hold the test requirements
    extras: tuple[str, ...] = ()  # the framework's own extras the tests need
    additions: tuple[str, ...] = ()  # requirements the harness adds
    constraints: tuple[str, ...] = ()
    optional: frozenset[str] = frozenset()  # dropped, and reported, if the full install fails
    paths: tuple[str, ...] = ("tests",)
    pytest_args: tuple[str, ...] = ()  # every run
    parallel_args: tuple[str, ...] = ()  # full runs only (not the re-runs of a few tests)
    pythonpath: tuple[str, ...] = ()  # relative to the unpacked sdist
    timeout: float = 1200.0  # seconds for one pytest process


SUITES: dict[str, Suite] = {
    "starlette": Suite(
        name="starlette",
        version=STARLETTE_VERSION,
        sha256="b8399098d4c1e3522734f7235dc79b1fc967f96cf139c81e0fa30479e0685f9b",
        groups=("dev",),
        extras=("full",),
        # Starlette's suite has no per-test timeout: a request the middleware hung would
        # stop the whole run. pytest-timeout turns it into that one test's failure.
        additions=("pytest-timeout>=2.3",),
        pytest_args=("--timeout=60",),
    ),
    "fastapi": Suite(
        name="fastapi",
        version=FASTAPI_VERSION,
        sha256="dd94d4128319c1e1d50535ab023ab698f850a4d2822f0e181747b46f4ff3c0ab",
        groups=("tests",),
        extras=("all",),
        # FastAPI's suite runs against the Starlette this project supports and tests with.
        constraints=(f"starlette=={STARLETTE_VERSION}",),
        optional=frozenset(
            {
                "logfire",
                "sentry-sdk",
                "opentelemetry-instrumentation-fastapi",
                "strawberry-graphql",
                "sqlmodel",
                "pwdlib",
                "flask",
                "a2wsgi",
            }
        ),
        # Upstream's scripts/test.sh: ``-n auto --dist loadgroup`` and docs_src importable.
        parallel_args=("-n", "2", "--dist", "loadgroup"),
        pythonpath=("docs_src",),
    ),
}


@dataclass
class Node:
    """One test's outcome in one pytest process."""

    outcome: str  # passed, failed, error, skipped, xfailed, xpassed, missing
    message: str = ""
    detail: str = ""


@dataclass
class Run:
    """One pytest process."""

    suite: str
    mode: str
    seconds: float
    exitstatus: int | None  # None: killed at the timeout
    log: Path
    nodes: dict[str, Node] = field(default_factory=dict)
    wraps: dict[str, int] = field(default_factory=dict)
    import_warnings: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Outcomes counted."""
        counts: dict[str, int] = {}
        for node in self.nodes.values():
            counts[node.outcome] = counts.get(node.outcome, 0) + 1
        return counts


@dataclass
class Verdict:
    """A test that passed bare and failed wrapped in the full run, after its re-runs."""

    suite: str
    mode: str
    nodeid: str
    bare: str  # the bare outcome in the full run: passed, xfailed, skipped or xpassed
    first: Node  # the wrapped outcome in the full run
    bare_reruns: list[str]
    wrapped_reruns: list[str]
    rerun_message: str = ""

    @property
    def consistent(self) -> bool:
        """The bare outcome every time, a failure wrapped every time."""
        return all(o == self.bare for o in self.bare_reruns) and all(o in FAILING for o in self.wrapped_reruns)

    @property
    def where(self) -> str:
        """The innermost asgi_disconnect frame of the failure's traceback, if there is one."""
        frames = re.findall(r"asgi_disconnect/([\w/]+\.py):(\d+)", self.first.detail)
        return f"{frames[-1][0]}:{frames[-1][1]}" if frames else ""


@dataclass
class Prepared:
    """A suite ready to run: its source tree, its environment and what its install left out."""

    suite: Suite
    venv: Path
    sdist: Path
    skipped_requirements: list[str]
    freeze: Path


class Clock:
    """Wall-clock time per phase, in the order the phases ran."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.started = time.monotonic()

    def add(self, phase: str, since: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + time.monotonic() - since


def log(message: str) -> None:
    """Progress on stderr; the summary goes to stdout."""
    print(f"[peer-suites] {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/asgi-disconnect/peer-suites``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "asgi-disconnect" / "peer-suites"


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def normalise(name: str) -> str:
    """PEP 503 name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """The project name at the start of a PEP 508 requirement."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise HarnessError(f"cannot read the requirement {requirement!r}")
    return normalise(match.group(1))


def check(cmd: Sequence[str | Path], what: str, **kwargs: Any) -> None:
    """Run a command; a failure is a HarnessError that shows the command's output."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-40:])
        raise HarnessError(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")


def fetch_sdist(suite: Suite, cache: Path) -> Path:
    """The suite's sdist from the cache, or downloaded by pip; its sha256 is checked either way."""
    target = cache / "sdists" / f"{suite.name}-{suite.version}.tar.gz"
    if target.exists() and sha256(target) == suite.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".download-{suite.name}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        log(f"downloading {suite.name}=={suite.version} (sdist)")
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "download", "--quiet"]
        check([*pip, "--no-deps", "--no-binary", ":all:", "-d", scratch, f"{suite.name}=={suite.version}"], "download")
        found = sorted(scratch.glob("*.tar.gz"))
        if len(found) != 1:
            raise HarnessError(f"expected one sdist for {suite.name}=={suite.version}, pip saved {found}")
        digest = sha256(found[0])
        if digest != suite.sha256:
            raise HarnessError(
                f"sha256 mismatch for {found[0].name}: expected {suite.sha256}, got {digest}. "
                "Not running a suite whose source is not the one pinned in scripts/peer_suites/run.py."
            )
        found[0].replace(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def unpack(sdist: Path, dest: Path) -> Path:
    """A fresh copy of the sdist's tree under ``dest``; returns its root."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")
    roots = [p for p in dest.iterdir() if p.is_dir()]
    if len(roots) != 1:
        raise HarnessError(f"{sdist.name}: expected one top-level directory, found {roots}")
    return roots[0]


def group_requirements(groups: dict[str, list[Any]], name: str, seen: frozenset[str] = frozenset()) -> list[str]:
    """A PEP 735 dependency group's requirements, included groups resolved."""
    if name in seen or len(seen) > 20:
        raise HarnessError(f"dependency group {name!r} includes itself")
    out: list[str] = []
    for entry in groups.get(name, []):
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict) and "include-group" in entry:
            out.extend(group_requirements(groups, str(entry["include-group"]), seen | {name}))
    return out


def test_requirements(suite: Suite, sdist: Path) -> tuple[list[str], list[str], list[str]]:
    """(requirements to install, extras of the framework itself, tooling left out)."""
    with tarfile.open(sdist) as tar:
        member = tar.extractfile(f"{suite.name}-{suite.version}/pyproject.toml")
        if member is None:
            raise HarnessError(f"{sdist.name} has no pyproject.toml")
        pyproject = tomllib.loads(member.read().decode())
    groups: dict[str, list[Any]] = pyproject.get("dependency-groups", {})
    requirements: list[str] = []
    extras = list(suite.extras)
    left_out: list[str] = []
    for group in suite.groups:
        if group not in groups:
            raise HarnessError(f"{sdist.name}: no dependency group {group!r}")
        for requirement in group_requirements(groups, group):
            name = requirement_name(requirement)
            if name == suite.name:
                # The framework itself (``starlette[full]``): installed from the sdist, with its extras.
                extras.extend(re.findall(r"[A-Za-z0-9_.-]+", requirement.partition("[")[2].partition("]")[0]))
            elif name in TOOLING or name.startswith("types-"):
                left_out.append(requirement)
            elif requirement not in requirements:
                requirements.append(requirement)
    requirements.extend(suite.additions)
    return requirements, sorted(set(extras)), left_out


def own_requirements() -> list[str]:
    """This project's runtime dependencies (installed with the suite, so they key its environment)."""
    pyproject = tomllib.loads((PROJECT / "pyproject.toml").read_text(encoding="utf-8"))
    return [str(r) for r in pyproject["project"].get("dependencies", [])]


def interpreter_version(python: str) -> str:
    """``sys.version`` of the interpreter the environments are made with."""
    try:
        out = subprocess.run([python, "-c", "import sys; print(sys.version)"], capture_output=True, text=True)
    except FileNotFoundError:
        raise HarnessError(f"no interpreter {python!r} (choose one with --python)") from None
    if out.returncode != 0:
        raise HarnessError(f"{python} does not run: {out.stderr.strip()}")
    return out.stdout.strip()


def prepare(suite: Suite, cache: Path, python: str, python_version: str, clock: Clock) -> Prepared:
    """Download the sdist and make (or reuse) the suite's virtual environment."""
    started = time.monotonic()
    sdist = fetch_sdist(suite, cache)
    clock.add("download sdists", started)
    started = time.monotonic()
    requirements, extras, _ = test_requirements(suite, sdist)
    framework = f"{suite.name}[{','.join(extras)}] @ {sdist.as_uri()}" if extras else f"{suite.name} @ {sdist.as_uri()}"
    own = own_requirements()
    key_material = {
        "python": python_version,
        "sdist": suite.sha256,
        "requirements": requirements,
        "framework": framework,
        "constraints": list(suite.constraints),
        "own": own,
        "optional": sorted(suite.optional),
    }
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:12]
    prefix = f"{suite.name}-{suite.version}-py{python_version.split()[0]}-"
    venv = cache / "venvs" / f"{prefix}{key}"
    for stale in venv.parent.glob(f"{prefix}*") if venv.parent.is_dir() else ():
        if stale != venv:  # the same suite and interpreter with requirements that have changed since
            log(f"removing the outdated environment {stale}")
            shutil.rmtree(stale, ignore_errors=True)
    stamp = venv / STAMP
    freeze = venv / "pip-freeze.txt"
    if stamp.exists():
        done = json.loads(stamp.read_text(encoding="utf-8"))
        clock.add(f"environment {suite.name}", started)
        return Prepared(suite, venv, sdist, [str(r) for r in done.get("skipped", [])], freeze)
    log(f"creating {venv} (first run for these requirements: a few minutes)")
    shutil.rmtree(venv, ignore_errors=True)
    check([python, "-m", "venv", venv], "venv")
    vpy = venv / "bin" / "python"
    pip: list[str | Path] = [vpy, "-m", "pip", "--disable-pip-version-check", "install", "--quiet"]
    check([*pip, "--upgrade", "pip"], "upgrading pip")
    constraints = venv / "constraints.txt"
    constraints.write_text("".join(f"{c}\n" for c in suite.constraints), encoding="utf-8")
    skipped: list[str] = []
    try:
        check([*pip, "-c", constraints, *requirements, framework, *own], f"installing {suite.name}'s test requirements")
    except HarnessError as exc:
        # One retry without the heavy optional integrations, in case one of them is not installable here.
        skipped = [r for r in requirements if requirement_name(r) in suite.optional]
        if not skipped:
            raise
        log(f"full install failed; retrying without {', '.join(skipped)}:\n{exc}")
        kept = [r for r in requirements if r not in skipped]
        check([*pip, "-c", constraints, *kept, framework, *own], f"installing {suite.name}'s test requirements")
    frozen = subprocess.run([vpy, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True)
    freeze.write_text(frozen.stdout, encoding="utf-8")
    stamp.write_text(json.dumps({"key": key_material, "skipped": skipped}, indent=2), encoding="utf-8")
    clock.add(f"environment {suite.name}", started)
    return Prepared(suite, venv, sdist, skipped, freeze)


def build_own_wheel(dest: Path) -> Path:
    """This project as a wheel: one snapshot of the sources for every run of this invocation."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "--quiet", "--no-deps"]
    check([*pip, "-w", dest, PROJECT], "building the asgi-disconnect wheel")
    wheels = sorted(dest.glob("asgi_disconnect-*.whl"))
    if len(wheels) != 1:
        raise HarnessError(f"expected one asgi_disconnect wheel in {dest}, found {wheels}")
    return wheels[0]


def install_own(prepared: Prepared, wheel: Path) -> None:
    """Replace the environment's asgi-disconnect by this invocation's snapshot (its dependencies are there)."""
    vpy = prepared.venv / "bin" / "python"
    pip: list[str | Path] = [vpy, "-m", "pip", "--disable-pip-version-check", "install", "--quiet"]
    check([*pip, "--no-deps", "--force-reinstall", wheel], f"installing asgi-disconnect into {prepared.venv.name}")


def pytest_env(suite: Suite, root: Path, mode: str, results: Path, select: Path | None) -> dict[str, str]:
    """The environment of one pytest process: the caller's, minus what would change the runs."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ASGI_DISCONNECT_", "PYTEST_", "PYTHON", "VIRTUAL_ENV", "COV_"))
    }
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *(str(root / p) for p in suite.pythonpath)])
    env["ASGI_DISCONNECT_WRAP"] = mode
    env["ASGI_DISCONNECT_PEER_RESULTS"] = str(results)
    if select is not None:
        env["ASGI_DISCONNECT_PEER_SELECT"] = str(select)
    return env


def run_pytest(
    prepared: Prepared,
    root: Path,
    mode: str,
    out: Path,
    label: str,
    *,
    keyword: str | None = None,
    select: list[str] | None = None,
) -> Run:
    """One pytest process over the suite (or over ``select``), its outcomes read back."""
    suite = prepared.suite
    out.mkdir(parents=True, exist_ok=True)
    results = out / f"{label}.json"
    logfile = out / f"{label}.log"
    for stale in out.glob(f"{label}.json*"):
        stale.unlink()
    select_file: Path | None = None
    cmd: list[str] = [str(prepared.venv / "bin" / "python"), "-m", "pytest"]
    if select is None:
        cmd += [*suite.paths, *suite.parallel_args]
        if keyword:
            cmd += ["-k", keyword]
    else:
        select_file = out / f"{label}.select"
        select_file.write_text("".join(f"{n}\n" for n in select), encoding="utf-8")
        cmd += sorted({n.split("::", 1)[0] for n in select})
    cmd += ["-p", PLUGIN, "-p", "no:cacheprovider", "-q", "--continue-on-collection-errors", *suite.pytest_args]
    env = pytest_env(suite, root, mode, results, select_file)
    started = time.monotonic()
    with logfile.open("wb") as fh:
        fh.write(f"$ {' '.join(cmd)}\n# cwd {root}, ASGI_DISCONNECT_WRAP={mode}\n".encode())
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        exitstatus: int | None
        try:
            exitstatus = proc.wait(timeout=suite.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: xdist workers too
            proc.wait()
            exitstatus = None
    run = Run(suite.name, mode, time.monotonic() - started, exitstatus, logfile)
    if results.exists():
        data = json.loads(results.read_text(encoding="utf-8"))
        run.nodes = {k: Node(**v) for k, v in data["nodes"].items()}
    for part in sorted(out.glob(f"{label}.json.wraps-*")):
        data = json.loads(part.read_text(encoding="utf-8"))
        for target, count in data["wraps"].items():
            run.wraps[target] = run.wraps.get(target, 0) + int(count)
        run.import_warnings.extend(w for w in data["import_warnings"] if w not in run.import_warnings)
    return run


def describe(run: Run) -> str:
    """One line per run for the progress log."""
    counts = ", ".join(f"{v} {k}" for k, v in sorted(run.counts().items()))
    status = "killed at the timeout" if run.exitstatus is None else f"exit {run.exitstatus}"
    wraps = sum(run.wraps.values())
    return f"{run.suite} {run.mode}: {counts or 'no results'} ({status}, {run.seconds:.0f} s, {wraps} apps wrapped)"


def deviating(bare: Run, wrapped: Run) -> list[str]:
    """Node ids that did not fail bare (passed, xfailed, skipped) and failed, errored or went missing wrapped."""
    out = []
    for nodeid, node in bare.nodes.items():
        if node.outcome in FAILING:
            continue
        other = wrapped.nodes.get(nodeid)
        if other is None or other.outcome in FAILING:
            out.append(nodeid)
    return out


def missing_node(run: Run) -> Node:
    """What a test that a run never reported gets."""
    how = "was killed at the timeout" if run.exitstatus is None else f"ended with exit status {run.exitstatus}"
    return Node("missing", f"not reported: the pytest process {how} (see {run.log})")


def rerun(
    prepared: Prepared, roots: dict[str, Path], out: Path, candidates: dict[str, list[str]], times: int
) -> tuple[dict[str, list[Run]], float]:
    """Run the candidates again, bare (their union) and in their mode, ``times`` rounds; returns runs per mode."""
    started = time.monotonic()
    runs: dict[str, list[Run]] = {mode: [] for mode in ("bare", *candidates)}
    union = sorted({n for nodes in candidates.values() for n in nodes})
    for round_ in range(1, times + 1):
        runs["bare"].append(run_pytest(prepared, roots["bare"], "bare", out, f"rerun{round_}-bare", select=union))
        for mode, nodes in candidates.items():
            label = f"rerun{round_}-{mode}"
            runs[mode].append(run_pytest(prepared, roots[mode], mode, out, label, select=nodes))
    return runs, time.monotonic() - started


def verdicts(
    full: dict[str, Run], mode: str, nodes: list[str], bare_reruns: list[Run], wrapped_reruns: list[Run]
) -> list[Verdict]:
    """Each candidate's full-run outcomes and re-run outcomes."""
    out = []
    for nodeid in nodes:
        first = full[mode].nodes.get(nodeid) or missing_node(full[mode])
        bare_outcomes = [(r.nodes.get(nodeid) or missing_node(r)).outcome for r in bare_reruns]
        wrapped_nodes = [r.nodes.get(nodeid) or missing_node(r) for r in wrapped_reruns]
        message = next((n.message for n in wrapped_nodes if n.outcome in FAILING and n.message), "")
        bare = full["bare"].nodes[nodeid].outcome
        wrapped_outcomes = [n.outcome for n in wrapped_nodes]
        out.append(Verdict(full[mode].suite, mode, nodeid, bare, first, bare_outcomes, wrapped_outcomes, message))
    return out


def other_changes(bare: Run, wrapped: Run) -> list[tuple[str, str, str]]:
    """(node id, bare, wrapped) for outcomes that changed without a failure wrapped (a pass that became a skip)."""
    out = []
    for nodeid, node in bare.nodes.items():
        other = wrapped.nodes.get(nodeid)
        if node.outcome in FAILING or other is None or other.outcome in FAILING or other.outcome == node.outcome:
            continue
        out.append((nodeid, node.outcome, other.outcome))
    return out


def git_state() -> str:
    """The commit the package was taken from, and whether the tree had changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=PROJECT, capture_output=True, text=True)
    except FileNotFoundError:
        return "unknown (no git)"
    changed = [line[3:] for line in dirty.stdout.splitlines()]
    state = head.stdout.strip() or "unknown"
    return f"{state} + uncommitted changes in {', '.join(changed)}" if changed else state


def pinned_versions_warning() -> list[str]:
    """Warnings when the dev venv's Starlette or FastAPI is not the version the suites are pinned to."""
    dev_python = PROJECT / ".venv" / "bin" / "python"
    if not dev_python.exists():
        return []
    code = (
        "import importlib.metadata as m, json; print(json.dumps({n: m.version(n) for n in ('starlette', 'fastapi')}))"
    )
    proc = subprocess.run([dev_python, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return []
    installed: dict[str, str] = json.loads(proc.stdout)
    return [
        f"the dev venv has {name} {installed[name]}, the peer suite is pinned to {suite.version}: "
        "update the pin and its sha256 in scripts/peer_suites/run.py"
        for name, suite in SUITES.items()
        if installed.get(name) != suite.version
    ]


def first_line(node: Node) -> str:
    """The first line of a failure message, for one-line listings."""
    return (node.message or node.outcome).strip().splitlines()[0][:300]


def fence(text: str) -> str:
    """A Markdown code block that the text cannot close."""
    ticks = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return f"{ticks}text\n{text.rstrip()}\n{ticks}"


def write_report(
    path: Path,
    *,
    runs: list[Run],
    found: list[Verdict],
    prepared: dict[str, Prepared],
    clock: Clock,
    notes: list[str],
    python_version: str,
    run_dir: Path,
) -> str:
    """Write report.md and report.json; return the summary printed on stdout."""
    consistent = [v for v in found if v.consistent]
    flaky = [v for v in found if not v.consistent]
    kinds = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
    lines = [
        f"# Peer suites behind DisconnectMiddleware ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"- asgi-disconnect: {git_state()}",
        f"- Python: {python_version.split()[0]}",
        *(
            f"- {p.suite.name} {p.suite.version} (sdist sha256 {p.suite.sha256[:16]}...), environment "
            f"`{p.venv}` (`{p.freeze.name}` there lists every version)"
            for p in prepared.values()
        ),
        f"- logs and raw results: `{run_dir}`",
        *(f"- note: {n}" for n in notes),
        "",
        "## Outcomes",
        "",
        "| suite | mode | " + " | ".join(kinds) + " | apps wrapped | exit | seconds |",
        "|---|---|" + "---:|" * (len(kinds) + 3),
    ]
    summary = ["", "peer suites: outcomes (passed/failed/error/skipped/xfailed/xpassed)"]
    for run in runs:
        counts = run.counts()
        wraps = sum(run.wraps.values())
        status = "timeout" if run.exitstatus is None else str(run.exitstatus)
        cells = " | ".join(str(counts.get(k, 0)) for k in kinds)
        lines.append(f"| {run.suite} | {run.mode} | {cells} | {wraps} | {status} | {run.seconds:.0f} |")
        dev = sum(1 for v in consistent if v.suite == run.suite and v.mode == run.mode)
        fl = sum(1 for v in flaky if v.suite == run.suite and v.mode == run.mode)
        tail = "" if run.mode == "bare" else f"  deviations {dev}, flaky {fl}"
        summary.append(
            f"  {run.suite:9} {run.mode:8} " + "/".join(str(counts.get(k, 0)) for k in kinds) + f"{tail}"
            f"  ({run.seconds:.0f} s)"
        )
    lines += [
        "",
        "`apps wrapped`: TestClient and ASGITransport constructions whose app went behind the middleware, summed "
        "over pytest-xdist workers (each worker imports every test module, so module-level clients count twice).",
        "",
        f"## Deviations: not failing bare, failing wrapped, every time ({len(consistent)})",
        "",
    ]
    if not consistent:
        lines.append("None.")
    causes: dict[str, list[Verdict]] = {}
    for v in consistent:
        causes.setdefault(v.where or first_line(v.first), []).append(v)
    if causes:
        lines += ["By the innermost asgi_disconnect frame of the traceback (or the message, without one):", ""]
        lines += ["| where | tests | suites / modes | first message |", "|---|---:|---|---|"]
        for cause, group in sorted(causes.items(), key=lambda item: -len(item[1])):
            where = sorted({f"{v.suite}/{v.mode}" for v in group})
            message = first_line(group[0].first).replace("|", "\\|")
            lines.append(f"| `{cause}` | {len(group)} | {', '.join(where)} | {message} |")
        lines.append("")
    for v in consistent:
        lines += [
            f"### {v.suite} / {v.mode}: `{v.nodeid}`",
            "",
            f"- bare: {v.bare}; wrapped: {v.first.outcome}: {first_line(v.first)}",
            f"- innermost asgi_disconnect frame: {v.where or 'none in the traceback'}",
            f"- re-runs bare: {', '.join(v.bare_reruns)}; wrapped: {', '.join(v.wrapped_reruns)}",
            "",
            "<details><summary>traceback (tail)</summary>",
            "",
            fence(v.first.detail or v.first.message),
            "",
            "</details>",
            "",
        ]
    lines += ["", f"## Flaky or order-dependent: failed wrapped in the full run, not every time ({len(flaky)})", ""]
    if not flaky:
        lines.append("None.")
    for v in flaky:
        lines.append(
            f"- {v.suite} / {v.mode}: `{v.nodeid}`: bare {v.bare}, wrapped {v.first.outcome} ({first_line(v.first)}); "
            f"re-runs bare {', '.join(v.bare_reruns)}, wrapped {', '.join(v.wrapped_reruns)}"
        )
    changed = [
        (w.suite, w.mode, *change)
        for b in runs
        if b.mode == "bare"
        for w in runs
        if w.suite == b.suite and w.mode != "bare"
        for change in other_changes(b, w)
    ]
    lines += ["", f"## Other outcome changes, no failure wrapped ({len(changed)})", ""]
    lines += [f"- {suite} / {mode}: `{nodeid}`: bare {was}, wrapped {now}" for suite, mode, nodeid, was, now in changed]
    if not changed:
        lines.append("None.")
    lines += ["", "## Failing bare (environment or upstream; not compared)", ""]
    bare_bad = [
        (r, n, node) for r in runs if r.mode == "bare" for n, node in r.nodes.items() if node.outcome in FAILING
    ]
    if not bare_bad:
        lines.append("None.")
    for run, nodeid, node in bare_bad:
        lines.append(f"- {run.suite}: `{nodeid}`: {node.outcome}: {first_line(node)}")
    warned = sorted({w for r in runs for w in r.import_warnings})
    if warned:
        lines += ["", "## Warnings raised while importing asgi_disconnect", "", *(f"- {w}" for w in warned)]
    skipped = [(p.suite.name, r) for p in prepared.values() for r in p.skipped_requirements]
    if skipped:
        lines += ["", "## Test requirements left out (not installable here)", ""]
        lines += [f"- {name}: {r}" for name, r in skipped]
    lines += ["", "## Timings", "", "| phase | seconds |", "|---|---:|"]
    lines += [f"| {phase} | {seconds:.1f} |" for phase, seconds in clock.phases.items()]
    lines.append(f"| total | {time.monotonic() - clock.started:.1f} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    raw = {
        "runs": [
            {
                "suite": r.suite,
                "mode": r.mode,
                "counts": r.counts(),
                "exitstatus": r.exitstatus,
                "seconds": r.seconds,
                "wraps": r.wraps,
                "log": str(r.log),
            }
            for r in runs
        ],
        "verdicts": [dataclasses.asdict(v) | {"consistent": v.consistent} for v in found],
        "timings": clock.phases,
    }
    path.with_suffix(".json").write_text(json.dumps(raw, indent=2, default=str), encoding="utf-8")
    for v in consistent:
        at = f" [at {v.where}]" if v.where else ""
        summary.append(f"  DEVIATION {v.suite}/{v.mode} {v.nodeid}: {first_line(v.first)}{at}")
    for v in flaky:
        summary.append(f"  flaky     {v.suite}/{v.mode} {v.nodeid}: {first_line(v.first)}")
    summary.append("  timings: " + ", ".join(f"{p} {s:.0f} s" for p, s in clock.phases.items()))
    summary.append(f"report: {path}")
    return "\n".join(summary)


def prune_runs(runs_dir: Path) -> None:
    """Keep the newest KEEP_RUNS run directories."""
    if not runs_dir.is_dir():
        return
    old = sorted(p for p in runs_dir.iterdir() if p.is_dir())[:-KEEP_RUNS]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="scripts/peer-suites",
        description="Run Starlette's and FastAPI's own test suites bare and with every test client's app behind "
        "DisconnectMiddleware (observe and cancel mode); report the tests that pass bare and fail wrapped.",
    )
    parser.add_argument("--suite", choices=sorted(SUITES), action="append", help="only this suite (repeatable)")
    parser.add_argument(
        "--mode",
        choices=(*WRAPPED_MODES, "broken"),
        action="append",
        help="only this wrapped mode (repeatable); 'broken' is the harness's self-test: an app that answers 500 "
        "behind the middleware, which must show up as deviations",
    )
    parser.add_argument("-k", dest="keyword", metavar="EXPR", help="pytest -k expression for the full runs")
    parser.add_argument("--reruns", type=int, default=3, help="re-runs of each deviating test, bare and wrapped")
    parser.add_argument(
        "--python", default=os.environ.get("PEER_SUITES_PYTHON", "python3.11"), help="interpreter of the environments"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.reruns <= 10:
        parser.error("--reruns must be between 1 and 10")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the peer suites; 0: no deviation, 1: deviations, 2: the harness failed."""
    args = parse_args(argv)
    suites = [SUITES[name] for name in (args.suite or list(SUITES))]
    modes: list[str] = list(dict.fromkeys(args.mode or WRAPPED_MODES))
    cache = cache_root()
    clock = Clock()
    run_dir = cache / "runs" / datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    notes = pinned_versions_warning()
    for note in notes:
        log(f"warning: {note}")
    if args.keyword:
        notes.append(f"full runs restricted with -k {args.keyword!r}")
    if args.suite or args.mode:
        notes.append(f"a partial run: suites {', '.join(s.name for s in suites)}; modes {', '.join(modes)}")
    try:
        python_version = interpreter_version(args.python)
        prepared = {s.name: prepare(s, cache, args.python, python_version, clock) for s in suites}
        started = time.monotonic()
        wheel = build_own_wheel(run_dir / "wheel")
        for p in prepared.values():
            install_own(p, wheel)
        clock.add("asgi-disconnect wheel", started)
        runs: list[Run] = []
        found: list[Verdict] = []
        for suite in suites:
            p = prepared[suite.name]
            out = run_dir / suite.name
            started = time.monotonic()
            roots = {mode: unpack(p.sdist, out / f"src-{mode}") for mode in ("bare", *modes)}
            clock.add("unpack", started)
            full: dict[str, Run] = {}
            for mode in ("bare", *modes):
                log(f"{suite.name} {mode}: full run")
                full[mode] = run_pytest(p, roots[mode], mode, out, f"full-{mode}", keyword=args.keyword)
                clock.phases[f"{suite.name} {mode}"] = full[mode].seconds
                log(describe(full[mode]))
                runs.append(full[mode])
            bare = full["bare"]
            if bare.exitstatus not in (0, 1) or not bare.nodes:
                raise HarnessError(f"{suite.name}'s bare run did not complete ({describe(bare)}); see {bare.log}")
            candidates = {mode: nodes for mode in modes if (nodes := deviating(bare, full[mode]))}
            if candidates:
                log(f"{suite.name}: re-running " + ", ".join(f"{len(n)} {m}" for m, n in candidates.items()))
                reruns, seconds = rerun(p, roots, out, candidates, args.reruns)
                clock.phases[f"{suite.name} re-runs"] = seconds
                for mode, nodes in candidates.items():
                    found += verdicts(full, mode, nodes, reruns["bare"], reruns[mode])
            for root in roots.values():
                shutil.rmtree(root.parent, ignore_errors=True)  # the logs and results stay; the trees are big
    except HarnessError as exc:
        log(f"error: {exc}")
        return 2
    report = cache / "report.md"
    print(
        write_report(
            report,
            runs=runs,
            found=found,
            prepared=prepared,
            clock=clock,
            notes=notes,
            python_version=python_version,
            run_dir=run_dir,
        )
    )
    prune_runs(cache / "runs")
    return 1 if any(v.consistent for v in found) else 0


if __name__ == "__main__":
    sys.exit(main())
