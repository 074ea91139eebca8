"""`prefloop loop`: sample, label, train, evaluate, promote; round after round, resumable.

    prefloop loop --rounds 2 --method dpo --pairs 32 --backend rubric --rubric shorter --max-steps 20
    prefloop loop --rounds 3 --labels human --backend openai --base-url http://127.0.0.1:8000/v1 --model judge

A rerun of the same command continues a killed loop where it stopped; `--rounds` higher than
before adds rounds to a finished one.
"""

from __future__ import annotations

import argparse

from labeling.cli.common import CliError, open_store
from labeling.cli.dataclass_flags import deferred
from labeling.cli.eval_command import add_generation_options, eval_config
from labeling.cli.judge_command import add_judge_options, build_backend, check_backend_options


def register(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("loop", parents=[common], help="turn the loop: sample, label, train, evaluate, promote",
                              description=__doc__.split("\n\n")[0])
    p.set_defaults(handler=run_loop_command)
    deferred(subparsers, p, add_loop_options)  # labeling.loop imports torch: only when loop is used


def add_loop_options(p: argparse.ArgumentParser) -> None:
    from labeling.loop import LABEL_SOURCES, LOOP_METHODS

    p.add_argument("--rounds", type=int, default=2, help="run until this many rounds are done (default: 2)")
    p.add_argument("--method", choices=LOOP_METHODS, default="dpo", help="training method of each round")
    p.add_argument("--pairs", type=int, default=32, help="new train prompts per round, 2 responses each (default: 32)")
    p.add_argument("--labels", choices=LABEL_SOURCES, default="judge",
                   help="judge: the judge labels the pairs; human: wait for annotators (default: judge)")
    p.add_argument("--name", default="loop", help="the loop's name; policies are NAME-r1, NAME-r2 ... (default: loop)")
    p.add_argument("--from-policy", default="default", metavar="NAME", help="the policy round 1 starts from")
    p.add_argument("--eval-prompts", type=int, default=None, metavar="N", help="evaluate on the first N eval prompts")
    p.add_argument("--runs-dir", default="runs", help="each round trains into RUNS_DIR/NAME-rK (default: runs)")
    p.add_argument("--poll", type=float, default=15.0, help="--labels human: seconds between checks")
    train = p.add_argument_group("training of each round (as `prefloop train`)")
    train.add_argument("--preset", default=None, help="a training preset (default: auto)")
    train.add_argument("--max-steps", type=int, default=None, help="optimizer steps per round")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="any training setting, e.g. trainer.learning_rate=5e-5 (repeatable)")
    add_generation_options(p, samples_temperature=0.8)
    judge = p.add_argument_group("the judge, for labels and evaluations (as `prefloop judge`)")
    add_judge_options(judge)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def loop_config(args: argparse.Namespace):
    from dataclasses import replace

    from alignment.generation import SamplingConfig
    from alignment.training.presets import PresetError, parse_assignment
    from labeling.loop import LoopConfig

    args.against, args.prompts = None, args.eval_prompts
    evaluation = eval_config(args)
    layers = []
    if args.max_steps is not None:
        layers.append({"trainer": {"max_steps": args.max_steps}})
    try:
        layers += [parse_assignment(text) for text in args.set]
        return LoopConfig(
            name=args.name, rounds=args.rounds, method=args.method, pairs=args.pairs, labels=args.labels,
            start_policy=args.from_policy, preset=args.preset, runs_dir=args.runs_dir, poll_s=args.poll,
            sampling=SamplingConfig(samples=2, max_new_tokens=args.gen_max_new_tokens,
                                    temperature=args.sample_temperature, batch_size=args.gen_batch_size,
                                    seed=args.seed),
            train_overrides=tuple(layers), evaluation=evaluation,
            judge=replace(evaluation.judge, progress=not args.no_progress), show_progress=not args.no_progress,
        )
    except (PresetError, ValueError) as error:
        raise CliError(str(error)) from None


def run_loop_command(args: argparse.Namespace) -> int:
    from labeling.loop import LoopError, loop_console, rounds_table, run_loop

    config = loop_config(args)
    check_backend_options(args)
    engine = open_store(args)
    backend = build_backend(args)
    console = loop_console()
    try:
        reports = run_loop(engine, config, backend, console=console)
    except LoopError as error:
        raise CliError(str(error)) from None
    console.print(rounds_table(reports, title=f"prefloop loop {config.name}"))
    return 0
