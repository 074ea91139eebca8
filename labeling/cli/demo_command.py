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
    parser.add_argument("--no-serve", action="store_true", help="prepare the pairs (and run the loop) and stop")
    loop = parser.add_argument_group("the loop (--loop): DPO rounds judged by a rubric a 135M model learns in minutes")
    loop.add_argument("--loop", action="store_true",
                      help="before serving, turn the loop: sample, judge (rubric 'shorter'), train DPO, evaluate, promote")
    loop.add_argument("--rounds", type=int, default=2, help="loop rounds (default: 2)")
    loop.add_argument("--pairs", type=int, default=32, help="new train prompts per round (default: 32)")
    loop.add_argument("--max-steps", type=int, default=20, help="DPO steps per round (default: 20)")
    loop.add_argument("--loop-max-new-tokens", type=int, default=64,
                      help="tokens per response in the loop's samples and evaluations (default: 64)")
    loop.add_argument("--eval-prompts", type=int, default=24, help="eval prompts judged per round (default: 24)")
    loop.add_argument("--runs-dir", default="runs", help="where each round's run is saved (default: runs)")
    parser.set_defaults(handler=run_demo, single_user=None, job_dir=None)


def run_demo(args: argparse.Namespace) -> int:
    from alignment.generation import GenerationJob, SamplingConfig, run_generation
    from alignment.models.errors import ModelError
    from feedback_store.db import session_scope
    from labeling.cli.serve_command import run_serve, serve_defaults
    from labeling.data import ensure_default_prompts, ensure_loop_prompts

    engine = open_store(args, migrate=True)
    with session_scope(engine) as session:
        # The loop's own short prompts first: the bundled set then stays out of a new store.
        loop_added = ensure_loop_prompts(session) if args.loop else 0
        added = ensure_default_prompts(session)
    if loop_added:
        print(f"imported {loop_added} loop prompts (a third held out for evaluation)")
    if added:
        print(f"imported {added} bundled prompts")
    arena = ("default",)
    if args.loop:
        arena = ("default", run_demo_loop(engine, args))  # the new policy into the arena beside the base
        if args.no_serve:
            return 0
    job = GenerationJob(
        policies=arena,
        prompts=args.prompts,
        sampling=SamplingConfig(samples=2, max_new_tokens=args.max_new_tokens, temperature=0.8, seed=0),
    )
    try:
        print(run_generation(engine, job).summary())
    except ModelError as error:
        raise CliError(str(error)) from error
    if args.no_serve:
        return 0
    for name, value in serve_defaults().items():  # serve's settings this command does not take
        if not hasattr(args, name):
            setattr(args, name, value)
    args.single_user = args.user
    return run_serve(args)


DEMO_RUBRIC = "shorter"  # a preference a 135M model picks up in a few DPO steps


def run_demo_loop(engine, args: argparse.Namespace) -> str:
    """Turn the loop on the embedded default; returns the policy it ends on."""
    from alignment.generation import SamplingConfig
    from labeling.judge.evaluation import EvalConfig
    from labeling.judge.rubric import RubricJudge
    from labeling.judge.runner import JudgeRunConfig
    from labeling.loop import LoopConfig, LoopError, loop_console, rounds_table, run_loop

    tokens = min(args.max_new_tokens, args.loop_max_new_tokens)  # keeps each round to minutes on a CPU
    config = LoopConfig(
        name="demo", rounds=args.rounds, method="dpo", pairs=args.pairs, start_policy="default",
        runs_dir=args.runs_dir,
        sampling=SamplingConfig(samples=2, max_new_tokens=tokens, temperature=0.8, seed=0),
        train_overrides=({"trainer": {"max_steps": args.max_steps}},),
        evaluation=EvalConfig(max_new_tokens=tokens, prompts=args.eval_prompts), judge=JudgeRunConfig(progress=True),
    )
    console = loop_console()
    try:
        reports = run_loop(engine, config, RubricJudge(DEMO_RUBRIC), console=console)
    except LoopError as error:
        raise CliError(str(error)) from None
    console.print(rounds_table(reports, title=f"prefloop demo --loop (judge: rubric '{DEMO_RUBRIC}')"))
    promoted = [r.candidate for r in reports if r.promoted]
    return promoted[-1] if promoted else reports[-1].candidate
