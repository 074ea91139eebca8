"""`prefloop db upgrade`, `prefloop prompts import` and `prefloop prompts split`."""

from __future__ import annotations

import argparse

from feedback_store.db import current_revision, upgrade
from feedback_store.settings import Settings
from labeling.cli.common import CliError, open_store


def register(subparsers, common: argparse.ArgumentParser) -> None:
    db = subparsers.add_parser("db", help="database schema management")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    up = db_sub.add_parser("upgrade", parents=[common], help="create or migrate the schema (Alembic)")
    up.add_argument("--revision", default="head", help="target revision (default: head)")
    up.set_defaults(handler=run_db_upgrade)

    prompts = subparsers.add_parser("prompts", help="prompt collection")
    prompts_sub = prompts.add_subparsers(dest="prompts_command", required=True, metavar="ACTION")
    imp = prompts_sub.add_parser(
        "import",
        parents=[common],
        help="import prompts (and chosen/rejected preference pairs) from .jsonl, .csv or .parquet",
        description="Rows carry `prompt` (string or chat list) or `messages` (chat list), optional `tags`; "
        "rows with `chosen`/`rejected` (TRL preference format) become comparisons voted by the `import` "
        "rater. All or nothing: a bad row imports nothing. Re-importing a file adds nothing.",
    )
    imp.add_argument("file", metavar="FILE", help="a .jsonl, .csv or .parquet file")
    imp.add_argument("--source", default=None, help="label stored with the new prompts (default: the file name)")
    imp.add_argument("--split", choices=("train", "eval"), default=None,
                     help="split of new prompts whose row has no `split` (default: 10%% to eval by content hash)")
    imp.set_defaults(handler=run_prompts_import)

    split = prompts_sub.add_parser(
        "split",
        parents=[common],
        help="move prompts to the train or eval split (eval prompts never reach training exports)",
        description="Move prompts to a split: `prefloop prompts split eval 3 7 10-20`. Without ids, print how "
        "many prompts each split holds.",
    )
    split.add_argument("to", metavar="train|eval", nargs="?", choices=("train", "eval"), help="the split to move to")
    split.add_argument("ids", metavar="ID", nargs="*", help="prompt ids or ranges (10-20)")
    split.set_defaults(handler=run_prompts_split)


def run_db_upgrade(args: argparse.Namespace) -> int:
    url = Settings.from_env(args.db).db_url
    upgrade(url, args.revision)
    print(f"database {url} at revision {current_revision(url)}")
    return 0


def run_prompts_import(args: argparse.Namespace) -> int:
    from rich.console import Console

    from feedback_store.db import session_scope
    from feedback_store.importing import ImportFileError, import_prompts

    engine = open_store(args)
    try:
        with Console(stderr=True).status(f"importing {args.file}"), session_scope(engine) as session:
            report = import_prompts(args.file, session=session, source=args.source, split=args.split)
    except ImportFileError as error:
        raise CliError(f"{error} (nothing imported)") from None
    print(f"imported {report.summary()}")
    return 0


def run_prompts_split(args: argparse.Namespace) -> int:
    from feedback_store.db import session_scope
    from feedback_store.splits import parse_id_ranges, set_prompt_split, split_counts

    engine = open_store(args)
    if args.to is None and args.ids:
        raise CliError("name the split first: prefloop prompts split train|eval ID...")
    with session_scope(engine) as session:
        if args.to is not None:
            try:
                ids = parse_id_ranges(" ".join(args.ids))
            except ValueError as error:
                raise CliError(str(error)) from None
            if not ids:
                raise CliError("no prompt ids given")
            try:
                changed = set_prompt_split(ids, args.to, session=session)
            except ValueError as error:
                raise CliError(f"{error} (nothing moved)") from None
            print(f"moved {changed} prompts to {args.to} ({len(ids) - changed} were there already)")
        counts = split_counts(session=session)
    print(f"train {counts['train']}, eval {counts['eval']}")
    return 0
