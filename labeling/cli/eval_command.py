"""`prefloop eval POLICY`: judge a policy against its parent on the held-out eval prompts.

    prefloop eval dpo-4 --backend rubric --rubric shorter
    prefloop eval dpo-4 --against default --prompts 50 --backend openai --base-url http://127.0.0.1:8000/v1 --model judge
    prefloop eval dpo-4 --backend local --json

Both policies answer each eval prompt (greedy by default), the judge decides each pair in
both orders (the same judge options as `prefloop judge`), and the win rate with its 95 %
interval (ties count half), ties, mean response lengths and the judge's cost are printed
and stored on the policy's training run. `prefloop train ... --eval` runs it after training.
"""

from __future__ import annotations

import argparse
import json
import shlex

from labeling.cli.common import CliError, open_store
from labeling.cli.judge_command import (
    add_judge_options,
    build_backend,
    check_backend_options,
    judge_run_config,
)


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--against", default=None, metavar="NAME",
                   help="the opponent policy (default: POLICY's parent, else 'default', the embedded base model)")
    p.add_argument("--prompts", type=_positive, default=None, metavar="N", help="the first N eval prompts (default: all)")
    add_generation_options(p)
    judge = p.add_argument_group("the judge (as `prefloop judge`)")
    add_judge_options(judge)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def add_generation_options(p: argparse.ArgumentParser, *, samples_temperature: float | None = None) -> None:
    """How the policies answer eval prompts (and, for `prefloop loop`, sample pairs to label)."""
    gen = p.add_argument_group("generation of the policies' responses (in-process)")
    gen.add_argument("--gen-max-new-tokens", type=int, default=256, help="most tokens per response")
    gen.add_argument("--gen-temperature", type=float, default=0.0, help="eval responses: 0 = greedy (the default)")
    if samples_temperature is not None:
        gen.add_argument("--sample-temperature", type=float, default=samples_temperature,
                         help="temperature of the two responses sampled per prompt for labelling")
    gen.add_argument("--gen-batch-size", type=int, default=16, help="sequences per forward pass")
    gen.add_argument("--quantize", choices=("auto", "none", "8bit", "4bit"), default="auto",
                     help="policies' precision (auto: 4bit on CUDA, none on CPU)")
    gen.add_argument("--gen-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="float32",
                     help="policies' weights dtype for the evaluated responses (float32: a small policy change is "
                          "not rounded away; auto: bfloat16 where the hardware computes it natively, faster)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")


def register(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "eval", parents=[common], help="judge a policy against its parent on the eval prompts (win rate, 95%% CI)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("policy", metavar="POLICY", help="a stored policy version")
    add_eval_options(p)
    p.set_defaults(handler=run_eval)


def parse_eval_options(text: str) -> argparse.Namespace:
    """`prefloop train --eval="OPTIONS"`: the eval options in one string, checked before training."""
    parser = argparse.ArgumentParser(prog="prefloop train --eval", add_help=False, exit_on_error=False)
    add_eval_options(parser)
    try:
        args, unknown = parser.parse_known_args(shlex.split(text))
    except (argparse.ArgumentError, ValueError) as error:
        raise CliError(f"--eval: {error}") from None
    if unknown:
        raise CliError(f"--eval: unrecognized options {' '.join(unknown)}")
    check_backend_options(args)
    eval_config(args)  # refuse bad values now, not after hours of training
    return args


def eval_config(args: argparse.Namespace):
    from alignment.generation import SamplingConfig
    from alignment.models.errors import ModelError
    from labeling.judge.evaluation import EvalConfig

    progress = not args.no_progress
    try:
        SamplingConfig(max_new_tokens=args.gen_max_new_tokens, temperature=args.gen_temperature,
                       batch_size=args.gen_batch_size)
        return EvalConfig(
            against=args.against, prompts=args.prompts, max_new_tokens=args.gen_max_new_tokens,
            temperature=args.gen_temperature, seed=args.seed, batch_size=args.gen_batch_size, quantize=args.quantize,
            dtype=args.gen_dtype,
            judge=judge_run_config(args, progress=progress), show_progress=progress,
        )
    except (ModelError, ValueError) as error:
        raise CliError(str(error)) from None


def evaluate(engine, policy: str, args: argparse.Namespace) -> int:
    """Run one evaluation with parsed eval options and print it; the exit status."""
    from labeling.judge.evaluation import EvaluationError, check_evaluable, evaluate_policy

    config = eval_config(args)
    try:
        check_evaluable(engine, policy, config)  # before a local judge model is loaded
    except EvaluationError as error:
        raise CliError(str(error)) from None
    check_backend_options(args)
    backend = build_backend(args)
    try:
        result = evaluate_policy(engine, policy, backend, config)
    except EvaluationError as error:
        raise CliError(str(error)) from None
    print(json.dumps(result.as_dict()) if args.json else result.summary())
    return 0


def run_eval(args: argparse.Namespace) -> int:
    return evaluate(open_store(args), args.policy, args)
