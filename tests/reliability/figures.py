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

# Figure name -> how the README table groups it: attempted / handled for each kind of case.
COLUMNS = {
    "votes_attempted": "votes attempted",
    "votes_acknowledged": "votes acknowledged",
    "votes_stored": "votes stored",
    "faults_injected": "faults injected",
    "faults_survived": "faults survived",
    "inputs_tried": "inputs tried",
    "inputs_rejected_cleanly": "rejected cleanly",
    "inputs_round_tripped": "round-tripped exactly",
    "inputs_rendered_inert": "rendered inert",
}


def record(name: str, **figures) -> dict:
    figures = {"size": "full" if FULL else "ci", "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               **figures}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(figures, indent=2, ensure_ascii=False) + "\n")
    print(f"\nRELIABILITY {name} " + json.dumps(figures, ensure_ascii=False))
    return figures


def table(directory: Path = OUT) -> str:
    """One Markdown row per recorded test: its headline figures and the rest as notes."""
    lines = ["| case | size | figures | other checks |", "|---|---|---|---|"]
    for path in sorted(directory.glob("*.json")):
        figures = json.loads(path.read_text())
        main = "; ".join(f"{label} {figures[key]:,}" for key, label in COLUMNS.items() if key in figures)
        rest = "; ".join(
            f"{key.replace('_', ' ')} {value}"
            for key, value in figures.items()
            if key not in COLUMNS and key not in ("size", "recorded_at")
        )
        lines.append(f"| {path.stem} | {figures['size']} | {main} | {rest} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
