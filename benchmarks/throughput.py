"""Streaming throughput: MB/s of a 64 KiB-chunk stream through each variant, on a real uvicorn.

Run from the repository root (``scripts/bench`` runs it with the other benchmarks)::

    .venv/bin/python benchmarks/throughput.py            # full run, about 2.5 minutes
    .venv/bin/python benchmarks/throughput.py --quick    # smoke run

One uvicorn subprocess per variant (httptools, 1 worker, ``apps.stream_app``: Starlette's
``StreamingResponse`` over a generator yielding the same 64 KiB ``bytes`` and letting the
loop run once per chunk, until the client leaves; the ``guard_stream`` variant wraps it
in ``guard_stream`` behind ``DisconnectMiddleware``), all started up front on 127.0.0.1
and killed by PID at the end. The servers share one CPU and this process, the client,
gets another. Each stream is one connection, ``GET /stream``, read with ``recv_into`` a
1 MiB buffer for ``--duration`` seconds, then closed. Two methods, as in overhead.py:

- concurrent: every variant streams at once, the servers sharing their CPU, so that a
  slowdown of the machine hits them all alike (the steadier method);
- alternating: one stream at a time, variants in rotated order each round.

Reported per variant: the median MB/s (10^6 bytes), the median per-round ratio to bare,
and the server's CPU time per MB (from ``/proc``) with its ratio to bare. ``bare2``, a
second bare server, is the A/A control: its ratio is the noise of the run.
``passthrough`` (``apps.PassthroughMiddleware``, shown as ``passthrough (floor)`` right
after them) is the floor that any correct pure ASGI middleware pays: it copies the
scope, adds a key and wraps ``send`` with a flag check, a byte count and end detection,
so its row shows how much of a variant's cost per chunk no pure ASGI middleware avoids.

DESIGN.md has no budget for streams; its 5% line for the hello world over uvicorn
(``overhead.py``) is quoted for reference.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import apps
from common import (
    Series,
    begin_report,
    command_line,
    cpu_delta,
    pinned,
    ratio_cell,
    rotated,
    servers,
    skipped_rows,
    table,
    write_results,
)

from asgi_disconnect import _loopback as loopback

# "bare2" is a second, identical bare app: an A/A control whose ratio to bare is the noise;
# "passthrough" the floor that any correct pure ASGI middleware pays.
VARIANTS = ("bare", "bare2", "passthrough", "observe", "cancel", "guard_stream", "fastapi-disconnect", "aiofence")
VARIANT_OF = {"bare2": "bare"}
REFERENCE_LOSS = 0.05


@dataclass
class Transfer:
    bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


def open_stream(port: int) -> socket.socket:
    """Connect, send ``GET /stream``, read past the response head; return the socket."""
    sock = loopback.connect(port)
    try:
        sock.sendall(loopback.request_bytes("GET", "/stream"))
        head = loopback.read_until(sock, b"\r\n\r\n", limit=1 << 16)
        if not head.startswith(b"HTTP/1.1 200 "):
            raise OSError(f"server answered {head[:200]!r}")
    except BaseException:
        sock.close()
        raise
    return sock


def stream_from(ports: Sequence[int], duration: float) -> list[Transfer]:
    """Read ``GET /stream`` from every port at once for ``duration`` seconds (timed from
    when every stream has started), one connection each; return the bytes per port."""
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    socks = []
    try:
        for port in ports:
            socks.append(open_stream(port))
        totals = [0] * len(socks)
        with selectors.DefaultSelector() as selector:
            for index, sock in enumerate(socks):
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ, index)
            start = time.perf_counter()
            deadline = start + duration
            while (now := time.perf_counter()) < deadline:
                for key, _ in selector.select(timeout=deadline - now):
                    n = key.fileobj.recv_into(view)  # type: ignore[union-attr]
                    if n == 0:
                        raise OSError("server closed the stream")
                    totals[key.data] += n
        return [Transfer(total, now - start) for total in totals]
    finally:
        for sock in socks:
            sock.close()


@dataclass
class Results:
    """One method's per-round MB/s and server CPU ms per MB, per variant."""

    rates: dict[str, Series]
    cpu: dict[str, Series]

    def record(self, transfers: dict[str, Transfer], cpu_s: dict[str, float | None]) -> None:
        cpu_ms = {
            name: None if spent is None or not transfers[name].bytes else spent * 1000 / (transfers[name].bytes / 1e6)
            for name, spent in cpu_s.items()
        }
        for name, transfer in transfers.items():
            self.rates[name].values.append(transfer.mb_per_s)
            spent_ms = cpu_ms[name]
            if spent_ms is not None:
                self.cpu[name].values.append(spent_ms)
            if name == "bare":
                continue
            self.rates[name].ratios.append(transfer.mb_per_s / transfers["bare"].mb_per_s)
            bare_ms = cpu_ms["bare"]
            if spent_ms is not None and bare_ms:
                self.cpu[name].ratios.append(spent_ms / bare_ms)


def run(
    names: Sequence[str], modes: Sequence[str], rounds: dict[str, int], duration: float, pin: bool
) -> tuple[dict[str, Results], list[str]]:
    """Stream from every variant, in each method's rounds; return the results per method."""
    notes: list[str] = []
    results: dict[str, Results] = {}
    with pinned(pin, notes) as cpus, servers(names, "stream", cpus, VARIANT_OF) as running:
        stream_from([running[name].port for name in names], 0.5)  # warm-up
        for mode in modes:
            result = results[mode] = Results({n: Series() for n in names}, {n: Series() for n in names})
            for index in range(rounds[mode]):
                order = rotated(names, index)
                transfers: dict[str, Transfer] = {}
                cpu_s: dict[str, float | None] = {}
                time.sleep(0.2)  # the previous round's servers notice their clients left
                if mode == "alternate":
                    for name in order:
                        before = running[name].cpu_seconds()
                        transfers[name] = stream_from([running[name].port], duration)[0]
                        cpu_s[name] = cpu_delta(before, running[name].cpu_seconds())
                        time.sleep(0.2)
                else:  # concurrent: every variant streams at once, sharing the servers' CPU
                    befores = {name: running[name].cpu_seconds() for name in order}
                    got = stream_from([running[name].port for name in order], duration)
                    transfers = dict(zip(order, got, strict=True))
                    cpu_s = {name: cpu_delta(befores[name], running[name].cpu_seconds()) for name in order}
                result.record(transfers, cpu_s)
                parts = ", ".join(f"{name} {transfers[name].mb_per_s:,.0f}" for name in names)
                print(f"  {mode} round {index + 1}/{rounds[mode]} MB/s: {parts}", flush=True)
    return results, notes


def results_table(result: Results, skipped: dict[str, str]) -> tuple[str, str, dict[str, Any]]:
    rows = []
    data: dict[str, Any] = {}
    for name, rate in result.rates.items():
        cpu = result.cpu[name]
        rs = rate.summary()
        cs = cpu.summary() if cpu.values else None
        loss = 1 - rs.get("ratio_median", 1.0)
        cpu_loss = 1 - 1 / cs["ratio_median"] if cs and "ratio_median" in cs else None
        data[name] = {
            "mb_per_s": {"summary": rs, "per_round": rate.values, "ratios": rate.ratios},
            "server_cpu_ms_per_mb": {"summary": cs, "per_round": cpu.values, "ratios": cpu.ratios} if cs else None,
            "loss": loss if name != "bare" else None,
            "loss_by_cpu": cpu_loss,
        }
        if name in apps.PEERS:
            note = "(peer)"
        elif name == "bare2":
            note = "(A/A control: noise)"
        elif name == apps.FLOOR:
            note = apps.FLOOR_NOTE
        else:
            note = ""
        rows.append(
            [
                apps.label(name),
                f"{rs['median']:,.0f}",
                ratio_cell(rs),
                f"{loss:+.1%}" if name != "bare" else "",
                f"{cs['median']:.3f}" if cs else "n/a",
                ratio_cell(cs) if cs else "n/a",
                f"{cpu_loss:+.1%}" if cpu_loss is not None else "",
                note,
            ]
        )
    data |= {name: {"skipped": reason} for name, reason in skipped.items()}
    headers = [
        "variant",
        "MB/s",
        "ratio [p25-p75]",
        "loss",
        "server CPU ms/MB",
        "CPU ratio [p25-p75]",
        "loss by CPU",
        "",
    ]
    text, md = table(headers, rows + skipped_rows(skipped, len(headers)))
    return text, md, data


METHODS = {
    "concurrent": "Concurrent: every variant streams at once, the servers sharing one CPU",
    "alternate": "Alternating: one stream at a time, variants in rotated order each round",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds: a smoke run")
    parser.add_argument("--concurrent-rounds", type=int, help="concurrent rounds (default 20, quick 3)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 8, quick 2)")
    parser.add_argument("--duration", type=float, help="seconds per stream (default 1.5, quick 0.5)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and client to different CPUs")
    args = parser.parse_args(argv)
    rounds = {
        "concurrent": args.concurrent_rounds or (3 if args.quick else 20),
        "alternate": args.rounds or (2 if args.quick else 8),
    }
    duration = args.duration or (0.5 if args.quick else 1.5)

    names, skipped, report, header = begin_report(VARIANTS, args.quick)
    began = time.perf_counter()
    results, notes = run(names, tuple(METHODS), rounds, duration, not args.no_pin)
    total = time.perf_counter() - began

    heading = (
        f"Streaming throughput: uvicorn (httptools) on 127.0.0.1, {apps.STREAM_CHUNK // 1024} KiB chunks, "
        f"{duration:g} s per stream, {rounds['concurrent']} concurrent and {rounds['alternate']} alternating rounds"
    )
    print(f"\n{heading}")
    md = ["# Streaming throughput", "", header, "", f"Command: `{command_line('benchmarks/throughput.py')}`", ""]
    md += [f"## {heading}", ""]
    report |= {
        "duration_s": duration,
        "chunk_bytes": apps.STREAM_CHUNK,
        "reference_loss_max": REFERENCE_LOSS,
        "notes": notes,
    }
    for mode, title in METHODS.items():
        text, md_table, data = results_table(results[mode], skipped)
        print(f"\n{title}\n{text}")
        report[mode] = {"rounds": rounds[mode], "description": title, "variants": data}
        md += [f"### {title}", "", md_table, ""]
    for note in notes:
        print(f"note: {note}")
    print(f"total time: {total:.1f} s")
    report["total_seconds"] = round(total, 1)
    md += [
        "Ratios are medians of per-round ratios to bare, [p25-p75] their spread; MB is 10^6 bytes. "
        f"DESIGN.md's {REFERENCE_LOSS:.0%} budget is for the hello world (overhead.md); it is not "
        "a budget for streams. The passthrough (floor) row is what any correct pure ASGI middleware pays "
        "(copy the scope, add a key, wrap send with a flag check, a byte count and end detection), not a peer.",
        "",
        *(f"- note: {n}" for n in notes),
        "",
        f"Total time: {total:.1f} s.",
    ]
    write_results("throughput", report, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
