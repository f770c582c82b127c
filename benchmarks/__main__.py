"""Run the benchmarks side by side and write the table to BENCHMARKS.md.

    python -m benchmarks                 # all of them
    python -m benchmarks extraction      # a group: extraction, heads, store, ..., tail, accuracy
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

from .common import Row, machine

#: Benchmark groups: each module's run() returns its rows.
GROUPS = ("extraction", "heads", "store", "finetune", "distributed", "startup", "precision", "tail", "intervals",
          "export", "sources", "accuracy")

OUT = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
MARK = "<!-- results: {} -->"


def _table(rows: list[Row]) -> str:
    lines = ["| benchmark | ratio | target | met | measured |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.ratio:.2f} | {r.target} | {'yes' if r.met else 'NO'} | {r.detail} |")
    return "\n".join(lines)


def write_section(group: str, rows: list[Row], seconds: float, command: str) -> None:
    text = OUT.read_text() if OUT.exists() else "# Benchmarks\n"
    start, end = MARK.format(group + " start"), MARK.format(group + " end")
    body = (f"{start}\n### {group}\n\nCommand: `{command}` — {time.strftime('%Y-%m-%d')}, {machine()}; "
            f"took {seconds:.0f} s.\n\n{_table(rows)}\n{end}")
    if start in text and end in text:
        text = text[:text.index(start)] + body + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    OUT.write_text(text)


def main(argv: list[str]) -> None:
    groups = argv or list(GROUPS)
    for g in groups:
        if g not in GROUPS:
            raise SystemExit(f"Unknown benchmark group '{g}'. Groups: {', '.join(GROUPS)}.")
    for g in groups:
        t = time.perf_counter()
        rows = importlib.import_module(f"benchmarks.{g}").run()
        seconds = time.perf_counter() - t
        print(_table(rows), flush=True)
        write_section(g, rows, seconds, "python -m benchmarks " + g)


if __name__ == "__main__":
    main(sys.argv[1:])
