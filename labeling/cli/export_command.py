"""`prefloop export {dpo,kto,reward,sft} --out PATH`: a TRL-ready dataset file from the store;
`prefloop export model NAME --out DIR [--merge]`: a stored policy as a peft adapter or one merged
model, with a model card of its lineage (alignment.model_export)."""

from __future__ import annotations

import argparse

from labeling.cli.common import CliError, open_store

FORMATS = ("dpo", "kto", "reward", "sft")  # mirrors feedback_store.export.FORMATS without importing numpy here
MODEL = "model"  # `export model NAME`: a policy, not a dataset


def register(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "export",
        parents=[common],
        help="write a DPO / KTO / reward / SFT dataset (.jsonl or .parquet) in TRL's format, or a policy (model)",
        description="Aggregate the votes per comparison and write one dataset in TRL's conversational "
        "format, with provenance columns (comparison_id, n_votes, agreement, rater_kinds, policies). "
        "`export model NAME --out DIR` writes a stored policy instead: its peft adapter naming its base "
        "model, or with --merge one standalone model, plus the tokenizer and a model card of its lineage.",
    )
    parser.add_argument("kind", choices=(*FORMATS, MODEL), help="which trainer's format, or model")
    parser.add_argument("name", nargs="?", default=None, metavar="NAME",
                        help="model only: the policy to export (a stored policy name, or 'latest')")
    parser.add_argument("--out", required=True,
                        help="output file, .jsonl or .parquet; for model, a new (or empty) directory")
    parser.add_argument("--merge", action="store_true",
                        help="model only: merge the adapter into the full-precision base and write a "
                             "standalone model (default: the peft adapter)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="model --merge only: dtype of the saved weights (auto: the base's stored dtype)")
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
    parser.add_argument("--include-simulated", action="store_true",
                        help="also count votes of simulated raters (`prefloop simulate`); left out by default")
    parser.add_argument("--sft-source", choices=("all", "labels", "best-of-n"), default="all",
                        help="SFT export: examples from labels (human edits, clear comparison winners), best-of-n "
                             "(answers `prefloop generate --best-of` kept under a reward), or all (default: all)")
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    if args.kind == MODEL:
        return run_model_export(args)
    if args.name is not None:
        raise CliError(f"unexpected argument {args.name!r}: only `export model NAME` takes a name")
    if args.merge or args.dtype != "auto":
        raise CliError("--merge and --dtype apply to `export model` only")
    if args.sft_source != "all" and args.kind != "sft":
        raise CliError("--sft-source applies to `export sft` only")
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
            include_simulated=args.include_simulated,
            sft_source=args.sft_source,
        )
    except ValueError as error:
        raise CliError(str(error)) from None
    engine = open_store(args)
    with read_scope(engine) as session:  # a reader: annotators keep voting while it runs
        dataset = export(args.kind, session=session, selection=selection)
    write_dataset(dataset, out)
    print(f"wrote {len(dataset)} {args.kind} rows to {out}")
    return 0


def run_model_export(args: argparse.Namespace) -> int:
    from alignment.models.errors import ModelError

    if args.name is None:
        raise CliError("export model: name the policy to export (a stored policy name, or 'latest')")
    engine = open_store(args)
    try:
        from alignment.model_export import export_policy

        result = export_policy(engine, args.name, args.out, merge=args.merge, dtype=args.dtype)
    except ModelError as error:
        raise CliError(str(error)) from None
    what = "a merged model" if result.kind == "merged" else f"an adapter (base model: {result.base_model})"
    print(f"wrote policy {result.policy} as {what} to {result.out}: {', '.join(result.files)}")
    return 0
