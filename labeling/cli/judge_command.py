"""`prefloop judge`: label stored comparisons with an AI judge (OpenAI-compatible, local, or a rule).

    PREFLOOP_JUDGE_API_KEY=... prefloop judge --backend openai --model gpt-4o-mini --concurrency 32
    prefloop judge --backend openai --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-7B-Instruct
    prefloop judge --backend local                      # the embedded default model, batched
    prefloop judge --backend rubric --rubric no-refusal,shorter

The API key is read from an environment variable (--api-key-env, default PREFLOOP_JUDGE_API_KEY
then OPENAI_API_KEY), never from a flag. Rerunning resumes: decided comparisons are skipped.
"""

from __future__ import annotations

import argparse
import json

from labeling.cli.common import CliError, open_store

DEFAULT_RUBRIC = "no-refusal,shorter"
LOCAL_CHOICE_TEMPLATE = "pairwise-verdict-v1"


def register(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "judge",
        parents=[common],
        help="label comparisons with an AI judge (RLAIF)",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_judge_options(p)
    p.add_argument("--list-templates", action="store_true", help="list the prompt templates and exit")
    p.add_argument("--limit", type=int, default=None, help="judge at most this many comparisons")
    p.add_argument("--route-doubts", action="store_true",
                   help="judge first, humans on doubt: inconsistent or low-confidence comparisons go to the front of the human queue")
    p.add_argument("--doubt-confidence", type=float, default=0.75, help="confidence below which a verdict is a doubt")
    p.add_argument("--doubt-priority", type=int, default=10, help="human-queue priority given to doubts")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(handler=run_judge_command)


def add_judge_options(p: argparse.ArgumentParser) -> None:
    """Which judge and how it is asked: shared by `prefloop judge` and `prefloop eval`."""
    p.add_argument("--backend", choices=("openai", "local", "rubric"), default="openai", help="which judge")
    p.add_argument("--model", default=None, help="openai: model name (required); local: 'default', a model id or a path")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (default: OpenAI)")
    p.add_argument("--api-key-env", action="append", default=None, metavar="VAR",
                   help="environment variable holding the API key (repeatable; default: PREFLOOP_JUDGE_API_KEY, OPENAI_API_KEY)")
    p.add_argument("--rubric", default=DEFAULT_RUBRIC, help="rubric backend: rule names chained with commas, or module:function")
    p.add_argument("--template", default=None, help="prompt template id (default: pairwise-v1; local choice mode: pairwise-verdict-v1)")
    p.add_argument("--criteria", default=None, help="criteria / short constitution replacing the template's default")
    p.add_argument("--criteria-file", default=None, help="read --criteria from this file")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (default: openai 16, local 2 x batch size)")
    p.add_argument("--rpm", type=float, default=None, help="at most this many requests per minute")
    p.add_argument("--tpm", type=float, default=None, help="at most this many tokens per minute")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP attempt")
    p.add_argument("--max-attempts", type=int, default=4, help="HTTP attempts per request (retries on 429/5xx/timeouts, honouring Retry-After)")
    p.add_argument("--max-tokens", type=int, default=512, help="openai: completion token limit per request")
    p.add_argument("--temperature", type=float, default=0.0, help="openai: sampling temperature")
    p.add_argument("--logprobs", action="store_true", help="openai: ask for logprobs and record a confidence")
    p.add_argument("--batch-size", type=int, default=16, help="local: requests per forward pass")
    p.add_argument("--local-mode", choices=("choice", "generate"), default="choice",
                   help="local: score [[A]]/[[B]]/[[C]] in one pass, or generate and parse")
    p.add_argument("--max-new-tokens", type=int, default=64, help="local generate mode: tokens per reply")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="local: weights dtype (auto: bfloat16 where the hardware computes it natively, else float32)")
    p.add_argument("--price-prompt", type=float, default=None, help="price per 1M prompt tokens (for the cost ledger)")
    p.add_argument("--price-completion", type=float, default=None, help="price per 1M completion tokens")


def run_judge_command(args: argparse.Namespace) -> int:
    from labeling.judge.runner import run_judge
    from labeling.judge.templates import TEMPLATES

    if args.list_templates:
        for template_id, template in TEMPLATES.items():
            print(f"{template_id:24} {template.description}")
        return 0
    config = judge_run_config(args, limit=args.limit, route_doubts=args.route_doubts,
                              doubt_confidence=args.doubt_confidence, doubt_priority=args.doubt_priority,
                              progress=not args.no_progress)
    engine = open_store(args)
    backend = build_backend(args)
    summary = run_judge(engine, backend, config)
    if args.json:
        print(json.dumps(summary.as_dict()))
    else:
        print(format_summary(summary))
    return 130 if summary.status == "aborted" else 0


def judge_run_config(args: argparse.Namespace, **extra):
    """The JudgeRunConfig of the shared judge options (`extra`: the command's own settings)."""
    from labeling.judge.runner import JudgeRunConfig
    from labeling.judge.templates import get_template

    criteria = args.criteria
    if args.criteria_file:
        try:
            with open(args.criteria_file, encoding="utf-8") as handle:
                criteria = handle.read()
        except OSError as error:
            raise CliError(f"--criteria-file {args.criteria_file}: {error.strerror}") from None
    template = args.template
    if template is None:
        local_choice = args.backend == "local" and args.local_mode == "choice"
        template = LOCAL_CHOICE_TEMPLATE if local_choice else "pairwise-v1"
    try:
        get_template(template)
        config = JudgeRunConfig(
            template=template,
            criteria=criteria,
            concurrency=args.concurrency,
            rpm=args.rpm,
            tpm=args.tpm,
            price_prompt=args.price_prompt,
            price_completion=args.price_completion,
            **extra,
        )
    except ValueError as error:
        raise CliError(str(error)) from None
    return config


def check_backend_options(args: argparse.Namespace) -> None:
    """What build_backend would refuse, checked without loading or connecting anything."""
    if args.backend == "openai":
        try:
            _openai_config(args).api_key()  # reads the environment only: no connection
        except ValueError as error:
            raise CliError(str(error)) from None
    if args.backend == "rubric":
        from labeling.judge.rubric import resolve_rule

        try:
            resolve_rule(args.rubric)
        except ValueError as error:
            raise CliError(str(error)) from None


def build_backend(args: argparse.Namespace):
    """The judge backend the shared options name (a local model is loaded here)."""
    try:
        if args.backend == "rubric":
            from labeling.judge.rubric import RubricJudge

            return RubricJudge(args.rubric)
        if args.backend == "local":
            from labeling.judge.local_backend import LocalJudge, LocalJudgeConfig

            config = LocalJudgeConfig(
                model=args.model or "default",
                mode=args.local_mode,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                dtype=args.dtype,
            )
            return LocalJudge.load(config)  # a ModelError is a ValueError: one line, below
        from labeling.judge.openai_backend import OpenAIJudge

        return OpenAIJudge(_openai_config(args))
    except ValueError as error:
        raise CliError(str(error)) from None


def _openai_config(args: argparse.Namespace):
    from labeling.judge.openai_backend import API_KEY_ENVS, OpenAIJudgeConfig

    if not args.model:
        raise CliError("--model is required with --backend openai (the model name the endpoint serves)")
    return OpenAIJudgeConfig(
        model=args.model,
        base_url=args.base_url,
        api_key_env=tuple(args.api_key_env or API_KEY_ENVS),
        timeout=args.timeout,
        max_attempts=args.max_attempts,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        logprobs=args.logprobs,
        max_connections=args.concurrency or 16,
    )


def format_summary(s) -> str:
    lines = [
        f"judge run {s.run_id} ({s.rater}): {s.status} in {s.elapsed_s:.1f} s"
        + (f" ({s.requests / s.elapsed_s:.1f} requests/s)" if s.requests and s.elapsed_s > 0 else ""),
        f"  comparisons {s.comparisons}: decided {s.decided} (inconsistent {s.inconsistent}), "
        f"undecided after a failure {s.failed}" + (f", routed to humans {s.doubts}" if s.doubts else ""),
        f"  requests {s.requests} ({s.attempts} attempts, retries included)"
        + (", failures: " + ", ".join(f"{k} {v}" for k, v in sorted(s.failures.items())) if s.failures else ""),
        f"  tokens: prompt {s.prompt_tokens}, completion {s.completion_tokens}"
        + (f"; cost {s.cost:.6f}" if s.cost is not None else ""),
    ]
    if s.failed or s.status == "aborted":
        lines.append("  rerun the same command to retry what is undecided (decided comparisons are skipped)")
    return "\n".join(lines)
