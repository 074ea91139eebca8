"""`prefloop generate`: sample responses from policy versions for stored prompts, and pair them.

    prefloop generate --policy default --prompts 20 --samples 2
    prefloop generate --policy default,dpo-3 --max-new-tokens 128 --seed 1
    prefloop generate --backend openai --base-url http://127.0.0.1:8000/v1 --model Qwen/Qwen2.5-7B-Instruct

Rerunning the same command resumes: prompts every policy has answered are skipped. An empty
store first receives the bundled default prompt set.
"""

from __future__ import annotations

import argparse

from labeling.cli.common import CliError, open_store


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
    parser.add_argument(
        "--policy", type=_policies, default=None, metavar="NAME[,NAME...]",
        help="stored policy versions, 'default' (the embedded model), 'base' (--model) or model ids "
             "(default: 'default'; with --backend openai: the --model name)",
    )
    parser.add_argument("--prompts", type=_prompt_count, default=None, metavar="N|all",
                        help="the first N prompts of the split (default: all)")
    parser.add_argument("--split", choices=("train", "eval", "all"), default="train",
                        help="which prompts: train (default; eval prompts are held out for `prefloop eval`), "
                             "eval or all")
    parser.add_argument("--samples", type=int, default=None, metavar="K",
                        help="responses per prompt and policy (default: 2 for one policy, 1 for several)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per response (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: 0.7)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--backend", choices=("local", "openai"), default="local",
                        help="local: in-process model; openai: an OpenAI-compatible server (vLLM, TGI, ...)")
    parser.add_argument("--base-url", default=None, help="openai backend: API root, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None,
                        help="openai backend: the served model; local: the model the policy name 'base' stands for")
    parser.add_argument("--quantize", choices=("auto", "none", "8bit", "4bit"), default="auto",
                        help="local backend (default: auto = 4bit on CUDA, none on CPU)")
    parser.add_argument("--batch-size", type=int, default=16, help="local backend: sequences per batch (default: 16)")
    parser.set_defaults(handler=run_generate)


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
