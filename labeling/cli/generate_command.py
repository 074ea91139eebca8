"""`prefloop generate`: sample responses from policy versions for stored prompts, and pair them.

    prefloop generate --policy default --prompts 20 --samples 2
    prefloop generate --policy default,dpo-3 --max-new-tokens 128 --seed 1
    prefloop generate --backend openai --base-url http://127.0.0.1:8000/v1 --model Qwen/Qwen2.5-7B-Instruct
    prefloop generate --best-of 8 --reward-run 4          # keep the best of 8 under reward run 4 (SFT examples)
    prefloop generate --best-of 4 --reward-rubric shorter # ... under rubric rules; then `prefloop train sft`

Rerunning the same command resumes: prompts every policy has answered are skipped. An empty
store first receives the bundled default prompt set.

With --best-of N and one reward flag (the fields of online_rewards.RewardSource, as for
`prefloop train grpo`), each prompt gets N samples in one batched pass and only the best under the
reward is stored, as an SFT example with its score (rejection sampling; alignment/generation.py):
`prefloop train sft` trains on them (`--sft-source best-of-n` for those alone).

The flags are the fields of GenerationJob, SamplingConfig, BestOfN and RewardSource, help and
defaults included (labeling/cli/dataclass_flags.py); they are added when `generate` is used,
since those classes import torch.
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
    """The flags: fields of GenerationJob, SamplingConfig and BestOfN (alignment/generation.py,
    sampling.py) and the reward's RewardSource (alignment/training/online_rewards.py)."""
    from alignment.generation import BestOfN, GenerationJob, SamplingConfig
    from alignment.models.spec import DTYPES, QUANTIZE_MODES
    from alignment.training.online_rewards import RewardSource

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
        Flag("dtype", choices=("auto", *DTYPES)),
    ])
    add_flags(parser, SamplingConfig, [Flag("batch_size")])
    add_flags(parser, BestOfN, [Flag("n", flag="--best-of", metavar="N", unset=True)])
    add_flags(parser, RewardSource, [
        Flag("reward_run", metavar="RUN_ID"),
        Flag("reward_model", metavar="DIR"),
        Flag("reward_rubric", metavar="RULES"),
        Flag("reward_function", metavar="MODULE:FUNCTION"),
    ])


def run_generate(args: argparse.Namespace) -> int:
    engine = open_store(args)

    from alignment.generation import (
        BEST_OF_REWARDS,
        BestOfN,
        GenerationJob,
        SamplingConfig,
        check_best_of,
        run_generation,
    )
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
    rewards = [name for name in BEST_OF_REWARDS if getattr(args, name) is not None]
    if args.best_of is None and rewards:
        raise CliError(f"--{rewards[0].replace('_', '-')} is the reward of --best-of N: give --best-of too")
    if args.best_of is not None and args.samples is not None:
        raise CliError("--best-of N samples N answers per prompt: drop --samples")
    samples = args.samples if args.samples is not None else (2 if len(policies) == 1 else 1)
    try:
        best_of = None
        if args.best_of is not None:
            from alignment.training.online_rewards import RewardSource

            best_of = BestOfN(n=args.best_of, reward=RewardSource(**{name: getattr(args, name) for name in rewards}))
        sampling = SamplingConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, samples=samples,
            seed=args.seed, batch_size=args.batch_size,
        )
        job = GenerationJob(
            policies=policies, prompts=args.prompts, split=None if args.split == "all" else args.split,
            sampling=sampling, backend=args.backend,
            model=args.model, base_url=args.base_url, quantize=args.quantize, dtype=args.dtype,
            best_of=best_of,
        )
        if best_of is not None:
            check_best_of(engine, job)  # a bad reward fails before anything is written
        with session_scope(engine) as session:
            added = ensure_default_prompts(session)
        if added:
            print(f"the store had no prompts: imported the {added} bundled default prompts")
        report = run_generation(engine, job)
    except ModelError as error:
        raise CliError(str(error)) from None
    print(report.summary())
    return 0
