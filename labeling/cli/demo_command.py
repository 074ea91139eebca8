"""`prefloop demo`: the README's main command — store, prompts, pairs, then the app.

Every step is idempotent, so a second run goes straight to the app with the pairs left.
"""

from __future__ import annotations

import argparse

from labeling.cli.common import CliError, open_store


def register(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "demo",
        parents=[common],
        help="set up the embedded default (SQLite, bundled prompts, default model) and open the app",
        description="Migrate the database, import the bundled prompts on first run, sample response "
        "pairs from the embedded default model for prompts that have none, then serve the labeling "
        "app in local single-user mode.",
    )
    parser.add_argument("--prompts", type=int, default=16, help="prompts to sample pairs for (default: 16)")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="tokens per response (default: 160)")
    parser.add_argument("--user", default="demo", help="the local admin account (default: demo)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    parser.add_argument("--no-serve", action="store_true", help="prepare the pairs and stop")
    parser.set_defaults(handler=run_demo, single_user=None, job_dir=None)


def run_demo(args: argparse.Namespace) -> int:
    from alignment.generation import GenerationJob, SamplingConfig, run_generation
    from alignment.models.errors import ModelError
    from feedback_store.db import session_scope
    from labeling.cli.serve_command import run_serve
    from labeling.data import ensure_default_prompts

    engine = open_store(args, migrate=True)
    with session_scope(engine) as session:
        added = ensure_default_prompts(session)
    if added:
        print(f"imported {added} bundled prompts")
    job = GenerationJob(
        policies=("default",),
        prompts=args.prompts,
        sampling=SamplingConfig(samples=2, max_new_tokens=args.max_new_tokens, temperature=0.8, seed=0),
    )
    try:
        print(run_generation(engine, job).summary())
    except ModelError as error:
        raise CliError(str(error)) from error
    if args.no_serve:
        return 0
    args.single_user = args.user
    return run_serve(args)
