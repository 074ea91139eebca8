"""Prompt import and TRL export speed.

Import: a 20,000-row JSONL file (half plain prompts, half chosen/rejected pairs) through
`import_prompts` (validate everything, bulk lookups by content hash, bulk INSERT ... RETURNING),
against the obvious per-row path through the catalog API (add_prompt / add_response /
add_comparison / record_vote: a few SELECTs and INSERTs per row), timed on the first
`--naive-rows` rows. Then the same file again (everything is a duplicate).

Export: the four exports and `snapshot` on a store with 100,000 votes (~33,000 comparisons,
~3 votes each), built the way bench/stats.py builds it.

    .venv/bin/python bench/import_export.py [--rows 20000] [--naive-rows 4000] [--votes 100000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.stats import build  # noqa: E402
from feedback_store.catalog import IMPORTED_POLICY, add_comparison, add_prompt, add_response, get_or_create_policy  # noqa: E402
from feedback_store.db import engine_for, read_scope, session_scope, upgrade  # noqa: E402
from feedback_store.export import EXPORTERS, Selection, snapshot  # noqa: E402
from feedback_store.importing import import_prompts, parse_file  # noqa: E402
from feedback_store.raters import get_or_create_import_rater  # noqa: E402
from feedback_store.votes import record_vote  # noqa: E402


def write_rows(path: Path, n: int) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            if i % 2:
                row = {"prompt": f"Question {i}: " + "why is the sky blue? " * 4,
                       "chosen": f"Answer {i}: Rayleigh scattering. " * 8,
                       "rejected": f"Answer {i}: because it reflects the sea. " * 8, "margin": i % 3}
            else:
                row = {"prompt": f"Prompt {i}: " + "write a haiku about the sea. " * 4, "tags": ["bench"]}
            handle.write(json.dumps(row) + "\n")
    return path


def fresh_sqlite(folder: Path, name: str) -> str:
    url = f"sqlite:///{folder / name}"
    upgrade(url)
    return url


def naive_import(path: Path, url: str, limit: int) -> float:
    """Row by row through the catalog API, in one transaction: the path import_prompts replaces."""
    rows = parse_file(path)[:limit]
    started = time.perf_counter()
    with session_scope(engine_for(url)) as session:
        policy = get_or_create_policy(IMPORTED_POLICY, session=session)
        rater = get_or_create_import_rater(session=session)
        for row in rows:
            prompt, _ = add_prompt(row.messages, session=session, tags=row.tags)
            if row.pair is None:
                continue
            chosen, _ = add_response(prompt.id, policy.id, row.pair.chosen, session=session)
            rejected, _ = add_response(prompt.id, policy.id, row.pair.rejected, session=session)
            comparison, _ = add_comparison(chosen, rejected, session=session)
            record_vote(comparison.id, rater.id, "a" if comparison.response_a_id == chosen.id else "b",
                        strength=row.pair.strength, session=session)
    return time.perf_counter() - started


def timed(fn, repeat: int = 1):
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--naive-rows", type=int, default=4_000)
    parser.add_argument("--votes", type=int, default=100_000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-import-export-"))
    source = write_rows(folder / "rows.jsonl", args.rows)

    url = fresh_sqlite(folder, "bulk.db")
    bulk_s, report = timed(lambda: _import(source, url))
    reimport_s, again = timed(lambda: _import(source, url))
    assert again.prompts_created == again.votes_created == 0
    naive_s = naive_import(source, fresh_sqlite(folder, "naive.db"), args.naive_rows)
    bulk_rate, naive_rate = args.rows / bulk_s, args.naive_rows / naive_s
    print(f"import of {args.rows} rows ({report.votes_created} pairs) into SQLite:")
    print(f"{'':28}{'per-row API':>14}{'import_prompts':>16}")
    print(f"{'rows/s':28}{naive_rate:>14.0f}{bulk_rate:>16.0f}")
    print(f"{'seconds for all rows':28}{args.rows / naive_rate:>14.1f}{bulk_s:>16.1f}   (per-row: extrapolated)")
    print(f"{'re-import (all duplicates) s':28}{'':>14}{reimport_s:>16.1f}")

    store = fresh_sqlite(folder, "votes.db")
    build(store, args.votes)
    print(f"\nexport from a store with {args.votes} votes (SQLite):")
    print(f"{'':28}{'rows':>10}{'seconds':>10}")
    export_s = {}
    for kind, exporter in EXPORTERS.items():
        def run(exporter=exporter):
            with read_scope(engine_for(store)) as session:
                return exporter(session=session, selection=Selection())
        export_s[kind], dataset = timed(run, repeat=2)
        print(f"{'export_' + kind:28}{len(dataset):>10}{export_s[kind]:>10.2f}")
    snapshot_s, _ = timed(lambda: snapshot(dataset))
    print(f"{'snapshot (sft rows)':28}{len(dataset):>10}{snapshot_s:>10.2f}")

    print(f"RESULT import_export ratio={bulk_rate / naive_rate:.1f} import_rows_per_s={bulk_rate:.0f} "
          f"naive_rows_per_s={naive_rate:.0f} import_20k_s={bulk_s * 20_000 / args.rows:.2f} "
          f"reimport_s={reimport_s:.2f} "
          + " ".join(f"export_{k}_s={v:.2f}" for k, v in export_s.items())
          + f" votes={args.votes}")


def _import(source: Path, url: str):
    with session_scope(engine_for(url)) as session:
        return import_prompts(source, session=session)


if __name__ == "__main__":
    main()
