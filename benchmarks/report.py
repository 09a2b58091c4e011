"""The summary of a benchmark run: ``results/summary.md`` and ``results/benchmarks.png``.

Run from the repository root after the benchmarks (``scripts/bench`` does)::

    .venv/bin/python benchmarks/report.py

It reads ``results/{overhead,latency,throughput,memory}.json``, whichever exist, and
lists every budget of DESIGN.md with where it stands, then this package next to its
peers. Both show the ``passthrough (floor)`` row, right after bare: what any correct pure
ASGI middleware pays (``apps.PassthroughMiddleware``), a reference with no budget. The
chart shows the in-process time per request (one loop iteration per request) and the
server throughput loss per variant, and the detection p99 per variant and handler, with
the budget lines.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import apps
from common import RESULTS_DIR, environment_line, table
from memory import flat
from overhead import INPROCESS_BUDGET, INSTRUCTIONS_BUDGET, SERVER_BUDGET_LOSS

OURS = ("observe", "cancel", "guard_stream")
ORDER = ("bare2", "passthrough", "observe", "cancel", "guard_stream", "basehttp", "fastapi-disconnect", "aiofence")
Json = dict[str, Any]


def load(name: str) -> Json | None:
    path = RESULTS_DIR / f"{name}.json"
    if not path.exists():
        return None
    data: Json = json.loads(path.read_text())
    return data


def dig(data: Any, *keys: str) -> Any:
    """``data[k1][k2]...``, or None as soon as a key is missing."""
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def status(ok: bool | None) -> str:
    return "n/a" if ok is None else "OK" if ok else "OVER"


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


# -- what the budgets read -----------------------------------------------------------


def inprocess_ratio(overhead: Json | None, variant: str, key: str = "in_process_yield_each") -> float | None:
    """The median per-round ratio to bare in process: by default with one loop iteration
    per request (the table the budget judges); ``key="in_process"``: a round per iteration."""
    ratio: float | None = dig(overhead, key, "variants", variant, "summary", "ratio_median")
    return ratio


def server_loss(overhead: Json | None, variant: str, method: str, by_cpu: bool) -> float | None:
    loss: float | None = dig(overhead, "server", method, "variants", variant, "loss_by_cpu" if by_cpu else "loss")
    return loss


def latency_rows(latency: Json | None, variant: str, case: str | None = None) -> list[Json]:
    rows: list[Json] = [] if latency is None else latency["rows"]
    return [r for r in rows if r["variant"] == variant and (case is None or r["case"].startswith(case))]


def worst_p99(rows: Sequence[Json]) -> float | None:
    """The worst p99 over FIN and RST; infinity when a handler never heard."""
    if not rows:
        return None
    if any(r["never"] or r["lost"] or r["p99_ms"] is None for r in rows):
        return float("inf")
    return max(float(r["p99_ms"]) for r in rows)


def stream_ratio(throughput: Json | None, variant: str, by_cpu: bool) -> float | None:
    if by_cpu:
        cpu: float | None = dig(
            throughput, "concurrent", "variants", variant, "server_cpu_ms_per_mb", "summary", "ratio_median"
        )
        return cpu
    rate: float | None = dig(throughput, "concurrent", "variants", variant, "mb_per_s", "summary", "ratio_median")
    return rate


def instruction_ratio(instructions: Json | None, part: str, variant: str) -> float | None:
    """Instructions per request of ``variant`` over bare's (instructions.py), or None."""
    value = dig(instructions, "instructions_per_request", part, variant)
    bare = dig(instructions, "instructions_per_request", part, "bare")
    return value / bare if value is not None and bare else None


def floor_row(overhead: Json | None, instructions: Json | None) -> list[str]:
    """The reference row: what ``passthrough``, the floor that any correct pure ASGI
    middleware pays, costs where the budgets are measured."""
    floor = apps.FLOOR
    wall = [inprocess_ratio(overhead, floor, key) for key in ("in_process_yield_each", "in_process")]
    instr = [instruction_ratio(instructions, part, floor) for part in ("iteration", "round")]
    server = instruction_ratio(instructions, "server", floor)
    measured = (
        f"in process {fmt(instr[0], '.3f', 'x')} by instructions, {fmt(wall[0], '.3f', 'x')} by wall clock "
        f"(a round per iteration: {fmt(instr[1], '.3f', 'x')}, {fmt(wall[1], '.3f', 'x')}); server B1 "
        f"req/s {fmt(server_loss(overhead, floor, 'concurrent', False), '+.1%')}, CPU "
        f"{fmt(server_loss(overhead, floor, 'concurrent', True), '+.1%')}"
    )
    if server is not None:
        measured += f", instructions {server - 1:+.1%}"
    return [
        "passthrough (floor): what any correct pure ASGI middleware pays (copy the scope, add a key, wrap send "
        "with a flag check, a byte count and end detection; DESIGN.md measured 1.08x by instructions)",
        measured,
        "(reference, no budget)",
    ]


def budget_rows(
    overhead: Json | None, latency: Json | None, memory: Json | None, instructions: Json | None = None
) -> list[list[str]]:
    rows: list[list[str]] = [floor_row(overhead, instructions)]
    for mode in ("observe", "cancel"):
        losses = {
            (method, by_cpu): server_loss(overhead, mode, method, by_cpu)
            for method in ("concurrent", "alternate")
            for by_cpu in (False, True)
        }
        measured = "; ".join(
            f"{'B1' if method == 'concurrent' else 'B2'} {'CPU' if by_cpu else 'req/s'} {fmt(value, '+.1%')}"
            for (method, by_cpu), value in losses.items()
        )
        known = [v for v in losses.values() if v is not None]
        server_instr = instruction_ratio(instructions, "server", mode)
        if server_instr is not None:
            measured += f"; server instructions {server_instr - 1:+.1%} (callgrind)"
        rows.append(
            [
                f"uvicorn + Starlette hello world, {mode} mode: at most {SERVER_BUDGET_LOSS:.0%} fewer requests/s "
                "than bare (both methods)",
                measured,
                status(None if not known else max(known) <= SERVER_BUDGET_LOSS),
            ]
        )
    for mode in ("observe", "cancel"):
        wall = [inprocess_ratio(overhead, mode, key) for key in ("in_process_yield_each", "in_process")]
        instr = [instruction_ratio(instructions, part, mode) for part in ("iteration", "round")]
        measured = (
            f"{fmt(instr[0], '.3f', 'x')} by instructions, {fmt(wall[0], '.3f', 'x')} by wall clock "
            f"(a round per iteration, no budget: {fmt(instr[1], '.3f', 'x')}, {fmt(wall[1], '.3f', 'x')})"
        )
        checks = [
            value <= budget
            for value, budget in ((instr[0], INSTRUCTIONS_BUDGET), (wall[0], INPROCESS_BUDGET))
            if value is not None
        ]
        rows.append(
            [
                f"in process, {mode} mode, one loop iteration per request: at most {INSTRUCTIONS_BUDGET:.2f}x bare "
                f"by instructions, {INPROCESS_BUDGET:.2f}x by wall clock",
                measured,
                status(None if not checks else all(checks)),
            ]
        )
    p99_budget = dig(latency, "budgets", "p99_ms_max") or 5.0
    for case, variants in (("non-streaming", ("observe", "cancel")), ("stream", OURS)):
        parts = []
        worst: list[float] = []
        for variant in variants:
            p99 = worst_p99(latency_rows(latency, variant, case))
            if p99 is not None:
                worst.append(p99)
                parts.append(f"{variant} {p99:.2f} ms")
        rows.append(
            [
                f"detection p99 under {p99_budget:g} ms, {case} (FIN and RST)",
                ", ".join(parts) or "n/a",
                status(None if not worst else max(worst) < p99_budget),
            ]
        )
    chunk_budget = dig(latency, "budgets", "chunks_after_detection_max") or 1
    chunks = [
        int(r["max_chunks_after_detection"])
        for variant in OURS
        for r in latency_rows(latency, variant, "stream")
        if r["max_chunks_after_detection"] is not None
    ]
    rows.append(
        [
            f"at most {chunk_budget} chunk produced after the detection (5 ms tokens and a busy producer)",
            f"at most {max(chunks)}" if chunks else "n/a",
            status(None if not chunks else max(chunks) <= chunk_budget),
        ]
    )
    inflight = {
        v: dig(memory, "in_process", v, "inflight", "per_request", "traced_bytes")
        for v in ("bare", apps.FLOOR, "observe", "cancel")
    }
    rows.append(
        [
            "memory bounded per in-flight request",
            ", ".join(f"{apps.label(v)} {fmt(b, ',.0f', ' B')}" for v, b in inflight.items()),
            status(None if inflight["observe"] is None else True),
        ]
    )
    requests = dig(memory, "aborted_requests") or 0
    bare = dig(memory, "in_process", "bare", "aborted", "growth")
    parts = []
    verdicts: list[bool] = []
    for variant in ("bare", apps.FLOOR, *OURS):
        grown = dig(memory, "in_process", variant, "aborted", "growth")
        if grown is None:
            continue
        parts.append(f"{apps.label(variant)} {grown['traced_bytes'] / 1024:+.1f} KiB, {grown['gc_objects']:+d} objects")
        if variant in OURS and bare is not None:
            verdicts.append(flat(grown, bare, requests))
    rows.append(
        [
            f"memory after {requests:,} aborted requests: no more growth than bare",
            "; ".join(parts) or "n/a",
            status(None if not verdicts else all(verdicts)),
        ]
    )
    return rows


def peer_rows(
    overhead: Json | None,
    latency: Json | None,
    throughput: Json | None,
    memory: Json | None,
    instructions: Json | None = None,
) -> list[list[str]]:
    skipped: dict[str, str] = {}
    for data in (overhead, latency, throughput, memory, instructions):
        skipped |= dig(data, "skipped") or {}
    rows = []
    for variant in ("bare", *(v for v in ORDER if v != "bare2")):
        if variant in skipped:
            rows.append([apps.label(variant), skipped[variant], "", "", "", "", "", "", ""])
            continue
        grown = dig(memory, "in_process", variant, "aborted", "growth")
        inflight = dig(memory, "in_process", variant, "inflight", "per_request", "traced_bytes")
        baseline = variant == "bare"
        rows.append(
            [
                apps.label(variant),
                "1 (baseline)" if baseline else fmt(inprocess_ratio(overhead, variant), ".2f", "x"),
                "1 (baseline)" if baseline else fmt(instruction_ratio(instructions, "iteration", variant), ".3f", "x"),
                "0 (baseline)"
                if baseline
                else fmt(server_loss(overhead, variant, "concurrent", False), "+.1%")
                + " / "
                + fmt(server_loss(overhead, variant, "concurrent", True), "+.1%"),
                _p99_cell(latency_rows(latency, variant, "non-streaming")),
                _p99_cell(latency_rows(latency, variant, "stream")),
                "1 (baseline)" if baseline else fmt(stream_ratio(throughput, variant, False), ".2f"),
                fmt(inflight, ",.0f"),
                "n/a" if grown is None else f"{grown['traced_bytes'] / 1024:+.1f} KiB / {grown['gc_objects']:+d}",
            ]
        )
    return rows


def _p99_cell(rows: Sequence[Json]) -> str:
    worst = worst_p99(rows)
    if worst is None:
        return "-"
    return "never" if worst == float("inf") else f"{worst:.2f}"


# -- the chart -----------------------------------------------------------------------


def chart(overhead: Json | None, latency: Json | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.6), gridspec_kw={"width_ratios": [1, 1, 1.35]})
    ours_color, peer_color, other_color, floor_color = "#2b6cb0", "#c05621", "#718096", "#2f855a"

    def color(variant: str) -> str:
        if variant == apps.FLOOR:
            return floor_color
        return ours_color if variant in OURS else peer_color if variant in apps.PEERS else other_color

    # 1. in process, one loop iteration per request (the table the budget judges)
    ax = axes[0]
    names = [v for v in ORDER if inprocess_ratio(overhead, v) is not None]
    values = [inprocess_ratio(overhead, v) or 0.0 for v in names]
    ax.barh([apps.label(v) for v in names], values, color=[color(v) for v in names])
    ax.set_xscale("log")
    ticks = [1, 2, 5, 10, 20]
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.minorticks_off()
    ax.axvline(INPROCESS_BUDGET, color="#c53030", linestyle="--", label=f"budget {INPROCESS_BUDGET:.2f}x")
    ax.axvline(1.0, color="black", linewidth=0.8)
    for y, value in enumerate(values):
        ax.text(value * 1.04, y, f"{value:.2f}x", va="center", fontsize=9)
    ax.set_xlim(0.8, max([*values, 2.0]) * 1.6)
    ax.invert_yaxis()
    ax.set_title("In process: time per request / bare\n(Starlette hello world, a loop iteration per request)")
    ax.set_xlabel("ratio to bare (log scale)")
    ax.legend(loc="upper right", fontsize=9)

    # 2. real server
    ax = axes[1]
    names = [v for v in ORDER if server_loss(overhead, v, "concurrent", False) is not None]
    ys = list(range(len(names)))
    rps = [100 * (server_loss(overhead, v, "concurrent", False) or 0.0) for v in names]
    cpu = [100 * (server_loss(overhead, v, "concurrent", True) or 0.0) for v in names]
    ax.barh([y - 0.2 for y in ys], rps, height=0.4, color=[color(v) for v in names])
    ax.barh([y + 0.2 for y in ys], cpu, height=0.4, color=[color(v) for v in names], alpha=0.45)
    ax.set_yticks(ys, [apps.label(v) for v in names])
    ax.axvline(100 * SERVER_BUDGET_LOSS, color="#c53030", linestyle="--")
    ax.axvline(0, color="black", linewidth=0.8)
    for y, (a, b) in enumerate(zip(rps, cpu, strict=True)):
        ax.text(max(a, 0) + 1, y - 0.2, f"{a:+.1f}%", va="center", fontsize=8)
        ax.text(max(b, 0) + 1, y + 0.2, f"{b:+.1f}%", va="center", fontsize=8)
    ax.set_xlim(min([*rps, *cpu, 0.0]) - 3, max([*rps, *cpu, 10.0]) * 1.2)
    ax.invert_yaxis()
    ax.set_title("uvicorn + Starlette hello world:\nthroughput loss vs bare (concurrent rounds)")
    ax.set_xlabel("loss, % (lower is better)")
    ax.legend(
        handles=[
            Patch(color=other_color, label="requests/s"),
            Patch(color=other_color, alpha=0.45, label="by server CPU per request"),
            Line2D([], [], color="#c53030", linestyle="--", label=f"budget {SERVER_BUDGET_LOSS:.0%}"),
        ],
        loc="upper right",
        fontsize=9,
    )

    # 3. detection p99
    ax = axes[2]
    cases = (
        ("non-streaming", "non-streaming"),
        ("stream, tokens", "stream, 5 ms tokens"),
        ("stream, busy", "stream, busy"),
    )
    variants = [v for v in ("bare", *OURS, "fastapi-disconnect", "aiofence") if latency_rows(latency, v)]
    width = 0.8 / len(cases)
    top = 6.0
    for i, (prefix, label) in enumerate(cases):
        xs, heights, texts = [], [], []
        for x, variant in enumerate(variants):
            p99 = worst_p99(latency_rows(latency, variant, prefix))
            if p99 is None:
                continue
            xs.append(x + (i - 1) * width)
            heights.append(min(p99, top))
            texts.append("never" if p99 == float("inf") else f"{p99:.1f}")
        bars = ax.bar(xs, heights, width=width, label=label, color=("#2c5282", "#63b3ed", "#90cdf4")[i])
        for bar, text in zip(bars, texts, strict=True):
            if text == "never":
                bar.set_hatch("//")
                bar.set_facecolor("#e2e8f0")
            ax.text(
                bar.get_x() + bar.get_width() / 2,
                bar.get_height() + 0.08,
                text,
                ha="center",
                fontsize=7.5,
                rotation=90 if text == "never" else 0,
            )
    ax.axhline(5, color="#c53030", linestyle="--")
    ax.set_xticks(range(len(variants)), variants, rotation=20, ha="right")
    ax.set_ylim(0, top + 1.2)
    ax.set_ylabel("p99, ms (worst of FIN and RST)")
    ax.set_title("Detection: client close to handler heard, p99\n(real uvicorn, loopback)")
    colors = ("#2c5282", "#63b3ed", "#90cdf4")
    handles: list[Any] = [Patch(color=c, label=label) for c, (_, label) in zip(colors, cases, strict=True)]
    handles += [
        Patch(facecolor="#e2e8f0", hatch="//", label="never (ran to its end)"),
        Line2D([], [], color="#c53030", linestyle="--", label="budget 5 ms"),
    ]
    ax.legend(handles=handles, loc="upper right", fontsize=8, ncol=2)

    fig.suptitle(
        "asgi-disconnect: blue this package, orange its peers (fastapi-disconnect, aiofence), green the floor "
        "(passthrough: any pure ASGI middleware), grey for scale",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    overhead, latency, throughput, memory = (load(n) for n in ("overhead", "latency", "throughput", "memory"))
    instructions = load("instructions")
    env = next((d["environment"] for d in (overhead, latency, throughput, memory) if d), None)
    md = ["# Benchmark summary", ""]
    if env is not None:
        md += [environment_line(env), ""]
    quick = any(dig(d, "quick") for d in (overhead, latency, throughput, memory, instructions))
    if quick:
        md += ["**A smoke run (`--quick`): too few rounds for the figures to mean much.**", ""]
    md += [
        "Run with `scripts/bench`; details in overhead.md, latency.md, throughput.md, memory.md and "
        "instructions.md (callgrind: a noise-free floor under the wall-clock cost). The in-process budget is "
        "judged by both instructions and wall clock; the server budget by wall clock (requests/s and server CPU "
        "per request), the server's instructions shown for reference.",
        "",
    ]
    rows = budget_rows(overhead, latency, memory, instructions)
    _, budgets_md = table(["budget (DESIGN.md)", "measured", "status"], rows)
    md += ["## Budgets", "", budgets_md, ""]
    md += [
        "Server loss: B1 concurrent rounds (all servers loaded at once), B2 alternating; req/s and server CPU per "
        "request (the steadier). The A/A row (bare2) in overhead.md is the noise floor of the run; the "
        "passthrough (floor) row is the cost no pure ASGI middleware avoids, to read the budgets' rows against.",
        "",
    ]
    headers = [
        "variant",
        "in process vs bare (wall clock)",
        "in process vs bare (instructions)",
        "server loss req/s / CPU",
        "detection p99 ms, non-streaming",
        "detection p99 ms, streams",
        "stream MB/s vs bare",
        "bytes per in-flight request",
        "growth after aborts",
    ]
    _, peers_md = table(headers, peer_rows(overhead, latency, throughput, memory, instructions))
    md += ["## This package and its peers", "", peers_md, ""]
    md += [
        "In process: one loop iteration per request. "
        "Detection p99: the worst over FIN and RST and, for streams, over 5 ms tokens and a busy producer; "
        '"never": the handler ran to its end. Stream MB/s: 64 KiB chunks, concurrent rounds.',
        "",
        "![benchmarks](benchmarks.png)",
    ]
    (RESULTS_DIR / "summary.md").write_text("\n".join(md) + "\n")
    chart(overhead, latency, RESULTS_DIR / "benchmarks.png")
    print("\n".join(md))
    print(f"wrote {RESULTS_DIR / 'summary.md'} and {RESULTS_DIR / 'benchmarks.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
