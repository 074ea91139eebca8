"""`prefloop judge`: label stored comparisons with an AI judge (OpenAI-compatible, local, or a rule).

    PREFLOOP_JUDGE_API_KEY=... prefloop judge --backend openai --model gpt-4o-mini --concurrency 32
    prefloop judge --backend openai --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-7B-Instruct
    prefloop judge --backend local                      # the embedded default model, batched
    prefloop judge --backend rubric --rubric no-refusal,shorter
    prefloop judge --backend openai --model gpt-4o-mini --logprobs --judge-first   # people see only doubts

The API key is read from an environment variable (--api-key-env, default PREFLOOP_JUDGE_API_KEY
then OPENAI_API_KEY), never from a flag. Rerunning resumes: decided comparisons are skipped.

The flags are the fields of the judge's config dataclasses (JudgeRunConfig, OpenAIJudgeConfig,
LocalJudgeConfig): help and defaults come from there (labeling/cli/dataclass_flags.py).
"""

from __future__ import annotations

import argparse
import json

from labeling.cli.common import CliError, open_store
from labeling.cli.dataclass_flags import (
    Flag,
    add_flags,
    cli_only,
    field_default,
    format_default,
    get_field,
)

DEFAULT_RUBRIC = "no-refusal,shorter"
LOCAL_CHOICE_TEMPLATE = "pairwise-verdict-v1"


def register(subparsers, common: argparse.ArgumentParser) -> None:
    from labeling.judge.runner import JudgeRunConfig

    p = subparsers.add_parser(
        "judge",
        parents=[common],
        help="label comparisons with an AI judge (RLAIF)",
        description=__doc__.split("\n\n")[0],
    )
    add_judge_options(p)
    cli_only(p, "--list-templates", action="store_true", help="list the prompt templates and exit")
    add_flags(p, JudgeRunConfig, [Flag("limit")])
    add_flags(p, JudgeRunConfig, [Flag("route_doubts"), Flag("doubt_confidence"), Flag("doubt_priority")])
    add_flags(p, JudgeRunConfig, [Flag("judge_first"), Flag("judge_first_threshold")])
    cli_only(p, "--no-progress", action="store_true", help="no progress bar")
    cli_only(p, "--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(handler=run_judge_command)


def add_judge_options(p: argparse.ArgumentParser) -> None:
    """Which judge and how it is asked: shared by `prefloop judge`, `prefloop eval` and `prefloop
    loop`. Each flag is a field of JudgeRunConfig, OpenAIJudgeConfig or LocalJudgeConfig
    (labeling/judge/), whose metadata holds its help and whose default is the flag's."""
    from labeling.judge.local_backend import LocalJudgeConfig
    from labeling.judge.openai_backend import OpenAIJudgeConfig
    from labeling.judge.runner import JudgeRunConfig

    local_model = format_default(field_default(get_field(LocalJudgeConfig, "model")))
    cli_only(p, "--backend", choices=("openai", "local", "rubric"), default="openai", help="which judge")
    add_flags(p, OpenAIJudgeConfig, [
        Flag("model", help="openai: the model name the endpoint serves (required); local: a model id, a path "
                           "or 'default' (the embedded model)", shown=f"{local_model} with --backend local"),
        Flag("base_url"),
        Flag("api_key_env", action="append", metavar="VAR"),
    ], prefix="")
    cli_only(p, "--rubric", default=DEFAULT_RUBRIC,
             help="rubric backend: rule names chained with commas, or module:function")
    template = format_default(field_default(get_field(JudgeRunConfig, "template")))
    add_flags(p, JudgeRunConfig, [
        Flag("template", unset=True, shown=f"{template}; local choice mode: {LOCAL_CHOICE_TEMPLATE}"),
        Flag("criteria"),
    ])
    cli_only(p, "--criteria-file", default=None, help="read --criteria from this file")
    add_flags(p, JudgeRunConfig, [Flag("concurrency"), Flag("rpm"), Flag("tpm")])
    add_flags(p, OpenAIJudgeConfig, [Flag("timeout"), Flag("max_attempts"), Flag("max_tokens"), Flag("temperature"),
                                     Flag("logprobs")], prefix="openai: ")
    add_flags(p, LocalJudgeConfig, [
        Flag("batch_size"),
        Flag("mode", flag="--local-mode"),
        Flag("max_new_tokens"),
        Flag("dtype", choices=("auto", "float32", "bfloat16", "float16")),
    ], prefix="local: ")
    add_flags(p, JudgeRunConfig, [Flag("price_prompt"), Flag("price_completion")])


def run_judge_command(args: argparse.Namespace) -> int:
    from labeling.judge.runner import run_judge
    from labeling.judge.templates import TEMPLATES

    if args.list_templates:
        for template_id, template in TEMPLATES.items():
            print(f"{template_id:24} {template.description}")
        return 0
    config = judge_run_config(args, limit=args.limit, route_doubts=args.route_doubts,
                              doubt_confidence=args.doubt_confidence, doubt_priority=args.doubt_priority,
                              judge_first=args.judge_first, judge_first_threshold=args.judge_first_threshold,
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
        f"undecided after a failure {s.failed}" + (f", routed to humans {s.doubts}" if s.doubts else "")
        + (f", settled by the judge (out of the human queue) {s.settled}" if s.settled else ""),
        f"  requests {s.requests} ({s.attempts} attempts, retries included)"
        + (", failures: " + ", ".join(f"{k} {v}" for k, v in sorted(s.failures.items())) if s.failures else ""),
        f"  tokens: prompt {s.prompt_tokens}, completion {s.completion_tokens}"
        + (f"; cost {s.cost:.6f}" if s.cost is not None else ""),
    ]
    if s.failed or s.status == "aborted":
        lines.append("  rerun the same command to retry what is undecided (decided comparisons are skipped)")
    return "\n".join(lines)
