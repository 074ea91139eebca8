"""The figures each reliability test measures, written where the README table is made from.

    record("load-sqlite", votes_attempted=1000, votes_stored=1000, ...)

writes test-output/reliability/load-sqlite.json (gitignored) and prints the figures, so they
show with `pytest -s` and in the log of a failed test. `python -m tests.reliability.figures`
prints the README's table from the files of the last run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.reliability.sizes import FULL

OUT = Path(__file__).resolve().parents[2] / "test-output" / "reliability"

# The README table's columns: (header, figures shown as "a / b / ...").
COLUMNS = [
    ("votes attempted / acknowledged / stored", ("votes_attempted", "votes_acknowledged", "votes_stored")),
    ("faults injected / survived", ("faults_injected", "faults_survived")),
    ("inputs tried / handled", ("inputs_tried", "inputs_rejected_cleanly", "inputs_round_tripped",
                                "inputs_rendered_inert")),
]
HANDLED = {"inputs_rejected_cleanly": "rejected cleanly", "inputs_round_tripped": "round-tripped",
           "inputs_rendered_inert": "rendered inert"}


def record(name: str, **figures) -> dict:
    figures = {"size": "full" if FULL else "ci", "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               **figures}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(figures, indent=2, ensure_ascii=False) + "\n")
    print(f"\nRELIABILITY {name} " + json.dumps(figures, ensure_ascii=False))
    return figures


def _cell(figures: dict, keys: tuple) -> str:
    shown = [f"{figures[key]:,}" + (f" {HANDLED[key]}" if key in HANDLED else "") for key in keys if key in figures]
    return " / ".join(shown) if shown else "—"


def table(directory: Path = OUT) -> str:
    """One Markdown row per recorded test: the headline figures, then the rest as notes."""
    headline = {key for _, keys in COLUMNS for key in keys}
    lines = ["| case | size | " + " | ".join(header for header, _ in COLUMNS) + " | other figures |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|"]
    for path in sorted(directory.glob("*.json")):
        figures = json.loads(path.read_text())
        rest = "; ".join(f"{key.replace('_', ' ')} {value}" for key, value in figures.items()
                         if key not in headline and key not in ("size", "recorded_at"))
        cells = " | ".join(_cell(figures, keys) for _, keys in COLUMNS)
        lines.append(f"| {path.stem} | {figures['size']} | {cells} | {rest} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
