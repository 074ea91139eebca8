"""`prefloop generate`: sample responses from policy versions for stored prompts, and pair them.

    prefloop generate --policy default --prompts 20 --samples 2
    prefloop generate --policy default,dpo-3 --max-new-tokens 128 --seed 1
    prefloop generate --backend openai --base-url http://127.0.0.1:8000/v1 --model Qwen/Qwen2.5-7B-Instruct

Rerunning the same command resumes: prompts every policy has answered are skipped. An empty
store first receives the bundled default prompt set.

The flags are the fields of GenerationJob and SamplingConfig, help and defaults included
(labeling/cli/dataclass_flags.py); they are added when `generate` is used, since those classes
import torch.
"""

from __future__ import annotations

import argparse

from labeling.cli.common import CliError, open_store
from labeling.cli.dataclass_flags import (
    Flag,
    add_flags,
    deferred,
    field_default,
    format_default,
    get_field,
)


def _prompt_count(value: str) -> int | None:
    if value == "all":
        return None
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {value!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return count


def _policies(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected NAME[,NAME...]")
    return names


def register(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "generate",
        parents=[common],
        help="sample responses from policy versions and create comparisons",
        description="Sample responses from policy versions for the stored prompts and pair them for "
                    "comparison. Rerunning resumes: prompts every policy has answered are skipped.",
    )
    parser.set_defaults(handler=run_generate)
    deferred(subparsers, parser, _add_flags)  # the config classes import torch: only when generate runs


def _add_flags(parser: argparse.ArgumentParser) -> None:
    """The flags: fields of GenerationJob and SamplingConfig (alignment/generation.py, sampling.py)."""
    from alignment.generation import GenerationJob, SamplingConfig
    from alignment.models.spec import QUANTIZE_MODES

    policies = format_default(field_default(get_field(GenerationJob, "policies")))
    add_flags(parser, GenerationJob, [
        Flag("policies", flag="--policy", type=_policies, metavar="NAME[,NAME...]", unset=True,
             shown=f"{policies}; with --backend openai: the --model name"),
        Flag("prompts", type=_prompt_count, metavar="N|all"),
        Flag("split", choices=("train", "eval", "all")),
    ])
    add_flags(parser, SamplingConfig, [
        Flag("samples", metavar="K", unset=True, shown="2 for one policy, 1 for several"),
        Flag("max_new_tokens"),
        Flag("temperature"),
        Flag("seed"),
    ])
    add_flags(parser, GenerationJob, [
        Flag("backend"),
        Flag("base_url"),
        Flag("model"),
        Flag("quantize", choices=QUANTIZE_MODES),
    ])
    add_flags(parser, SamplingConfig, [Flag("batch_size")])


def run_generate(args: argparse.Namespace) -> int:
    engine = open_store(args)

    from alignment.generation import GenerationJob, SamplingConfig, run_generation
    from alignment.models import ModelError
    from feedback_store.db import session_scope
    from labeling.data import ensure_default_prompts

    if args.backend == "openai" and not args.base_url:
        raise CliError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
    if args.backend == "local" and args.base_url:
        raise CliError("--base-url only applies to --backend openai")
    policies = args.policy
    if policies is None:
        if args.backend == "openai" and not args.model:
            raise CliError("--backend openai needs --model (the served model) or --policy")
        policies = (args.model,) if args.backend == "openai" else ("default",)
    samples = args.samples if args.samples is not None else (2 if len(policies) == 1 else 1)
    try:
        sampling = SamplingConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, samples=samples,
            seed=args.seed, batch_size=args.batch_size,
        )
        job = GenerationJob(
            policies=policies, prompts=args.prompts, split=None if args.split == "all" else args.split,
            sampling=sampling, backend=args.backend,
            model=args.model, base_url=args.base_url, quantize=args.quantize,
        )
        with session_scope(engine) as session:
            added = ensure_default_prompts(session)
        if added:
            print(f"the store had no prompts: imported the {added} bundled default prompts")
        report = run_generation(engine, job)
    except ModelError as error:
        raise CliError(str(error)) from None
    print(report.summary())
    return 0
