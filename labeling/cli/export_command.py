"""`prefloop export {dpo,kto,reward,sft} --out PATH`: a TRL-ready dataset file from the store."""

from __future__ import annotations

import argparse

from labeling.cli.common import CliError, open_store

FORMATS = ("dpo", "kto", "reward", "sft")  # mirrors feedback_store.export.FORMATS without importing numpy here


def register(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "export",
        parents=[common],
        help="write a DPO / KTO / reward / SFT dataset (.jsonl or .parquet) in TRL's format",
        description="Aggregate the votes per comparison and write one dataset in TRL's conversational "
        "format, with provenance columns (comparison_id, n_votes, agreement, rater_kinds, policies).",
    )
    parser.add_argument("kind", choices=FORMATS, help="which trainer's format")
    parser.add_argument("--out", required=True, help="output file, .jsonl or .parquet")
    parser.add_argument("--raters", choices=("human", "judge", "both"), default="both",
                        help="whose votes count (default: both)")
    parser.add_argument("--import-as", choices=("human", "judge", "exclude"), default="human",
                        help="how votes from imported datasets count (default: human)")
    parser.add_argument("--min-votes", type=int, default=1,
                        help="drop comparisons with fewer counted votes (default: 1)")
    parser.add_argument("--min-agreement", type=float, default=0.0,
                        help="drop comparisons whose majority has a smaller share of the votes, 0-1 (default: 0)")
    parser.add_argument("--tie-policy", choices=("drop", "half"), default="drop",
                        help="reward export: drop ties, or emit both orders with margin 0 (default: drop)")
    parser.add_argument("--both-bad", choices=("kto_negatives", "drop"), default="kto_negatives",
                        help="KTO export: 'both bad' pairs give two undesirable rows, or are dropped")
    parser.add_argument("--weighted", action="store_true", help="weight votes by each rater's weight")
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from feedback_store.db import read_scope
    from feedback_store.export import Selection, check_output_path, export, write_dataset

    try:
        out = check_output_path(args.out)
        selection = Selection(
            rater_kinds=args.raters,
            import_as=args.import_as,
            min_votes=args.min_votes,
            min_agreement=args.min_agreement,
            tie_policy=args.tie_policy,
            both_bad_policy=args.both_bad,
            weighted=args.weighted,
        )
    except ValueError as error:
        raise CliError(str(error)) from None
    engine = open_store(args)
    with read_scope(engine) as session:  # a reader: annotators keep voting while it runs
        dataset = export(args.kind, session=session, selection=selection)
    write_dataset(dataset, out)
    print(f"wrote {len(dataset)} {args.kind} rows to {out}")
    return 0
