"""`prefloop train METHOD`: train from exactly the preferences in the store.

METHOD is one of the registry's (alignment/training/methods.py; the list below and
`prefloop train --help` are generated from it):
{methods}

    prefloop train dpo --max-steps 50
    prefloop train reward --model default --eval-fraction 0.2
    prefloop train dpo --preset seed-qlora --loss-type ipo --beta 0.5 --raters human --min-agreement 0.75
    prefloop train sft --data my_sft.parquet
    prefloop train ppo --reward-run 4 --max-steps 100   # RLHF on the stored prompts, scored by run 4's model
    prefloop train grpo --reward-rubric shorter --num-generations 4   # groups of samples per stored prompt
    prefloop train rloo --reward-judge --judge-base-url http://localhost:8000/v1 --judge-model Qwen/Qwen2.5-7B-Instruct
    prefloop train dpo --resume                  # the latest unfinished dpo run, from its last checkpoint
    prefloop train dpo --from-policy sft-3       # start from policy sft-3, which is also the reference
    accelerate launch --config_file configs/accelerate/ddp.yaml -m labeling.cli train dpo

Settings: a preset (alignment/training/presets/*.yaml; default cpu-lora on CPU, seed-qlora on CUDA),
then --config FILE (same YAML shape), then these flags and any --set section.key=value.

Each settings flag is one field of a section's dataclass (COMMON_FLAGS, METHOD_FLAGS): its type,
choices and help come from the field, and its default is written once, from the field or as
"preset's value" when a shipped preset sets it. A flag lands where the same key of a YAML file
would (FLAG_SETTINGS, overrides_from_args). The flags are added when `train METHOD` is used:
their dataclasses import torch and TRL.
"""

from __future__ import annotations

import argparse

from alignment.training.methods import METHOD_NAMES, METHODS

__doc__ = __doc__.format(methods="\n".join(f"    {m.name:<7} {m.summary}" for m in METHODS))
from labeling.cli.common import CliError, open_store
from labeling.cli.dataclass_flags import (
    Flag,
    LazySubParsersAction,
    add_flags,
    cli_only,
    deferred,
    field_default,
    format_default,
    get_field,
)

DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")

def _loss_types(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in DPO_LOSSES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected one or more of {', '.join(DPO_LOSSES)} (comma-separated)")
    return names


def _trackers(value: str) -> list[str]:
    from alignment.training.trackers import TrackerError, parse_report_to

    try:
        return parse_report_to(value)
    except TrackerError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return number


# Each flag names a field of a settings section: "model" ModelSpec, "adapter" AdapterConfig,
# "selection" Selection, "run" RunOptions, "trainer" / "METHOD" the method's TRL config class
# (METHOD: the method's own section of presets and configs). The type, choices and default
# come from that field; `help` is given here only for TRL's fields, whose own help is long.
COMMON_FLAGS: tuple[tuple[str, Flag], ...] = (
    ("trainer", Flag("max_steps", help="stop after N optimizer steps; -1: after --epochs")),
    ("trainer", Flag("num_train_epochs", flag="--epochs", help="passes over the data (when no --max-steps)")),
    ("trainer", Flag("per_device_train_batch_size", flag="--batch-size", help="per-device batch size")),
    ("trainer", Flag("learning_rate", help="peak learning rate of the optimizer")),
    ("trainer", Flag("max_length", help="tokens per prompt + completion")),
    ("run", Flag("resume")),
    ("model", Flag("quantize")),
    ("adapter", Flag("method", flag="--adapter", help="what is trained: lora, dora, full or lm_head")),
    ("selection", Flag("rater_kinds", flag="--raters")),
    ("selection", Flag("min_agreement", type=_fraction)),
    ("selection", Flag("min_votes")),
    ("selection", Flag("tie_policy")),
    ("selection", Flag("weighted")),
    ("trainer", Flag("seed", help="random seed of the run (data order, new weights)")),
    ("run", Flag("output_dir")),
    ("run", Flag("data", metavar="FILE")),
    ("run", Flag("policy_name")),
    ("run", Flag("from_policy", metavar="NAME")),
    ("trainer", Flag("report_to", type=_trackers, metavar="NAME[,NAME]",
                     help="also log the curves to these trackers (transformers' names: tensorboard writes "
                          "under the output directory, offline; wandb, mlflow, ... if installed; all; none)")),
)
METHOD_FLAGS: dict[str, tuple[tuple[str, Flag], ...]] = {
    "sft": (
        ("selection", Flag("sft_source")),
    ),
    "dpo": (
        ("METHOD", Flag("beta", help="how far the policy may move from the reference")),
        ("METHOD", Flag("loss_type", type=_loss_types, metavar="TYPE[,TYPE]",
                        help=f"TRL's DPO losses: {', '.join(DPO_LOSSES)}")),
        ("METHOD", Flag("label_smoothing", help="robust / exo_pair losses")),
    ),
    "kto": (
        ("METHOD", Flag("beta", help="how far the policy may move from the reference")),
        ("METHOD", Flag("desirable_weight", help="loss weight of desirable examples",
                        shown="set from the class counts (auto_class_weights)")),
        ("METHOD", Flag("undesirable_weight", help="loss weight of undesirable examples",
                        shown="set from the class counts (auto_class_weights)")),
    ),
    "orpo": (
        ("METHOD", Flag("beta", help="weight of the odds-ratio term against the chosen's NLL (the paper's lambda)")),
    ),
    "simpo": (
        ("METHOD", Flag("beta", help="scale of the implicit reward, the average log-prob of a completion")),
        ("METHOD", Flag("simpo_gamma", help="target reward margin between chosen and rejected")),
        ("METHOD", Flag("cpo_alpha", help="weight of an NLL term on the chosen (0: pure SimPO, > 0: CPO-SimPO)")),
    ),
    "reward": (
        ("METHOD", Flag("eval_fraction", type=_fraction)),
    ),
    "ppo": (
        ("METHOD", Flag("reward_run", metavar="RUN_ID")),
        ("METHOD", Flag("reward_model", metavar="PATH")),
        ("METHOD", Flag("reward_rubric", metavar="RULES")),
        ("METHOD", Flag("reward_function", metavar="MODULE:FUNCTION")),
        ("METHOD", Flag("reward_judge")),
        ("METHOD", Flag("kl_coef")),
        ("METHOD", Flag("kl_target")),
        ("METHOD", Flag("rollout_batch_size")),
        ("METHOD", Flag("mini_batch_size")),
        ("METHOD", Flag("ppo_epochs")),
        ("METHOD", Flag("max_new_tokens")),
        ("METHOD", Flag("temperature")),
    ),
}
# PPO takes every online reward source too; its --reward-function has PPO's signature (ppo.py)
PPO_REWARD_FLAGS = ("reward_run", "reward_model", "reward_rubric", "reward_function", "reward_judge")
# GRPO and RLOO: any online reward source (alignment/training/online_rewards.py)
ONLINE_REWARD_FLAGS = (
    ("METHOD", Flag("reward_run", metavar="RUN_ID")),
    ("METHOD", Flag("reward_model", metavar="PATH")),
    ("METHOD", Flag("reward_rubric", metavar="RULES")),
    ("METHOD", Flag("reward_function", metavar="MODULE:FUNCTION")),
    ("METHOD", Flag("reward_judge")),
)
ONLINE_FLAGS = (
    ("METHOD", Flag("num_generations", help="completions sampled per prompt (a group)")),
    ("METHOD", Flag("max_completion_length", help="most tokens per completion")),
    ("METHOD", Flag("temperature", help="sampling temperature")),
    ("METHOD", Flag("beta", help="KL coefficient to the reference (the base, or the --from-policy parent)")),
    ("METHOD", Flag("num_iterations", help="optimisation passes over each generated batch")),
)
METHOD_FLAGS["grpo"] = ONLINE_REWARD_FLAGS + ONLINE_FLAGS
METHOD_FLAGS["rloo"] = ONLINE_REWARD_FLAGS + ONLINE_FLAGS
ONLINE_METHODS = ("grpo", "rloo")
REWARD_FLAG_FIELDS = PPO_REWARD_FLAGS


def _settings_of(entries) -> dict[str, tuple[str, str]]:
    return {flag.dest: (section, flag.field) for section, flag in entries}


# flag dest -> (section, key): where a flag's value lands in the settings layers.
FLAG_SETTINGS: dict[str, tuple[str, str]] = {
    **_settings_of(COMMON_FLAGS),
    **{dest: where for entries in METHOD_FLAGS.values() for dest, where in _settings_of(entries).items()},
}


def _command_flags() -> argparse.ArgumentParser:
    """The flags that configure the command itself (which layers, what happens after), not a field."""
    from alignment.training.presets import AUTO_PRESET

    parser = argparse.ArgumentParser(add_help=False)
    cli_only(parser, "--model", default=None,
             help="base model: 'default' (embedded SmolLM2-135M-Instruct, unless the config says "
                  "otherwise), a Hugging Face id or a path")
    cli_only(parser, "--preset", default=AUTO_PRESET,
             help="a preset name (alignment/training/presets/NAME.yaml) or a YAML path; "
                  f"{AUTO_PRESET}: seed-qlora on CUDA, cpu-lora on CPU")
    cli_only(parser, "--config", default=None, metavar="FILE", help="a YAML file over the preset")
    cli_only(parser, "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
             help="any setting, e.g. --set trainer.warmup_steps=10 (repeatable, last wins)")
    return parser


def _after_flags(parser: argparse.ArgumentParser) -> None:
    cli_only(parser, "--no-progress", action="store_true", help="no progress bar")
    cli_only(parser, "--eval", nargs="?", const="", default=None, metavar="OPTIONS",
             help="then judge the new policy against its parent on the eval prompts, with "
                  "`prefloop eval` options in one string, e.g. --eval=\"--backend rubric --prompts 50\"")


def section_classes(method: str) -> dict[str, type]:
    """The dataclass each settings section of `method` is built into (imports torch and TRL)."""
    import importlib

    from alignment.models.adapters import AdapterConfig
    from alignment.models.spec import ModelSpec
    from feedback_store.export import Selection

    from alignment.training.plan import RunOptions
    config = importlib.import_module(f"alignment.training.{method}").METHOD.config_class
    return {"model": ModelSpec, "adapter": AdapterConfig, "selection": Selection, "run": RunOptions,
            "trainer": config, "METHOD": config}


def preset_default(method: str, section: str, key: str) -> str | None:
    """How a flag's default is written when shipped presets set the key: "preset's value" (with
    the field's default after "else" when only some presets set it); None when none does."""
    from alignment.training.presets import list_presets, load_preset

    sections = ("trainer", method) if section in ("trainer", "METHOD") else (section,)
    sets = [any(key in (preset.get(name) or {}) for name in sections)
            for preset in (load_preset(name) for name in list_presets())]
    if not any(sets):
        return None
    if all(sets):
        return "preset's value"
    return "preset's value, else {field}"


def add_method_flags(method: str, parser: argparse.ArgumentParser) -> None:
    """`prefloop train METHOD`'s flags, each from its section's dataclass field."""
    classes = section_classes(method)

    def add(group, entries):
        for section, flag in entries:
            cls = classes[section]
            shown = preset_default(method, section, flag.field)
            if shown is not None and "{field}" in shown:
                field_text = format_default(field_default(get_field(cls, flag.field)))
                shown = shown.format(field=field_text) if field_text else "preset's value"
            add_flags(group, cls, [flag], overrides=True, shown=lambda _flag, text=shown: text)

    add(parser, COMMON_FLAGS)
    entries = METHOD_FLAGS[method]
    if method in ONLINE_METHODS:
        add(parser.add_argument_group("reward (one of)"), [e for e in entries if e[1].field in REWARD_FLAG_FIELDS])
        add(parser.add_argument_group(
            method.upper(), "--max-steps counts optimizer steps; --batch-size completions per step (a multiple of "
            f"--num-generations); more settings with --set {method}.KEY=VALUE"),
            [e for e in entries if e[1].field not in REWARD_FLAG_FIELDS])
        add_judge_reward_flags(parser.add_argument_group(
            "judge reward (with --reward-judge)", "an OpenAI-compatible server, asked as `prefloop judge` asks it "
            "(templates, rate limits, retries, cost ledger); the API key from the environment"))
    elif method == "ppo":
        add(parser.add_argument_group("reward (one of)"), [e for e in entries if e[1].field in PPO_REWARD_FLAGS])
        add(parser.add_argument_group(
            "PPO", "--max-steps counts PPO steps (one rollout batch each), --batch-size is the micro-batch of the "
            "gradient passes; more settings with --set ppo.KEY=VALUE (cliprange, cliprange_value, vf_coef, gamma, "
            "lam, missing_eos_penalty, ...)"), [e for e in entries if e[1].field not in PPO_REWARD_FLAGS])
        add_judge_reward_flags(parser.add_argument_group(
            "judge reward (with --reward-judge)", "an OpenAI-compatible server, asked as `prefloop judge` asks it "
            "(templates, rate limits, retries, cost ledger); the API key from the environment; compare mode "
            "judges each completion against the reference policy's answer to its prompt"))
    else:
        add(parser, entries)
    _after_flags(parser)


def add_judge_reward_flags(group) -> None:
    """`--judge-*`: `prefloop judge`'s options for the judge reward, from the same dataclasses."""
    from labeling.judge.online import MODES
    from labeling.judge.openai_backend import OpenAIJudgeConfig
    from labeling.judge.runner import JudgeRunConfig

    add_flags(group, OpenAIJudgeConfig, [
        Flag("model", flag="--judge-model", help="the model name the judge's endpoint serves"),
        Flag("base_url", flag="--judge-base-url"),
        Flag("api_key_env", flag="--judge-api-key-env", action="append", metavar="VAR"),
        Flag("timeout", flag="--judge-timeout"),
        Flag("max_attempts", flag="--judge-max-attempts"),
        Flag("max_tokens", flag="--judge-max-tokens"),
    ])
    add_flags(group, JudgeRunConfig, [
        Flag("template", flag="--judge-template"),
        Flag("criteria", flag="--judge-criteria"),
        Flag("concurrency", flag="--judge-concurrency"),
        Flag("rpm", flag="--judge-rpm"),
        Flag("tpm", flag="--judge-tpm"),
        Flag("price_prompt", flag="--judge-price-prompt"),
        Flag("price_completion", flag="--judge-price-completion"),
    ])
    cli_only(group, "--judge-mode", choices=MODES, default="compare",
             help="compare: a prompt's completions against each other (win rate); reference: each against the "
                  "data's 'reference' column")


def judge_reward(args: argparse.Namespace, engine):
    """The judge reward `--reward-judge` asks for, built from the --judge-* flags (None without it)."""
    if not getattr(args, "reward_judge", None):
        return None
    from labeling.judge.online import JudgeReward
    from labeling.judge.openai_backend import API_KEY_ENVS, OpenAIJudge, OpenAIJudgeConfig
    from labeling.judge.runner import JudgeRunConfig

    if not args.judge_model:
        raise CliError("--reward-judge needs --judge-model (the model name the judge's endpoint serves)")
    try:
        config = OpenAIJudgeConfig(model=args.judge_model, base_url=args.judge_base_url,
                                   api_key_env=tuple(args.judge_api_key_env or API_KEY_ENVS),
                                   timeout=args.judge_timeout, max_attempts=args.judge_max_attempts,
                                   max_tokens=args.judge_max_tokens, max_connections=args.judge_concurrency or 16)
        config.api_key()
        run_config = JudgeRunConfig(template=args.judge_template, criteria=args.judge_criteria,
                                    concurrency=args.judge_concurrency, rpm=args.judge_rpm, tpm=args.judge_tpm,
                                    price_prompt=args.judge_price_prompt,
                                    price_completion=args.judge_price_completion, progress=False)
        return JudgeReward(OpenAIJudge(config), run_config, engine=engine, mode=args.judge_mode)
    except ValueError as error:
        raise CliError(f"--reward-judge: {error}") from None


def register(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "train", help=f"train a policy or reward model ({', '.join(METHOD_NAMES)}) from the stored preferences",
        description=__doc__.splitlines()[0],
    )
    methods = parser.add_subparsers(dest="method", required=True, metavar="METHOD", action=LazySubParsersAction)
    shared = _command_flags()
    for method in METHODS:
        sub = methods.add_parser(method.name, parents=[common, shared], help=method.summary,
                                 description=f"prefloop train {method.name}: {method.summary}")
        sub.set_defaults(handler=run_train)
        # the flags' dataclasses import torch and TRL: only when this method is used
        deferred(methods, sub, lambda p, name=method.name: add_method_flags(name, p))


def overrides_from_args(args: argparse.Namespace) -> list[dict]:
    """The flags given, as settings layers: named flags first, then --set in order."""
    from alignment.training.presets import parse_assignment

    layer: dict[str, dict] = {}
    for dest, (section, key) in FLAG_SETTINGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        section = args.method if section == "METHOD" else section
        layer.setdefault(section, {})[key] = value
    layers = [layer] if layer else []
    layers += [parse_assignment(text) for text in args.set]
    return layers


def run_train(args: argparse.Namespace) -> int:
    from alignment.models.errors import ModelError
    from alignment.training.job import TrainRequest, TrainingError, run_training
    from alignment.training.presets import PresetError

    try:
        request = TrainRequest(args.method, model=args.model, preset=args.preset, config_file=args.config,
                               overrides=overrides_from_args(args))
    except PresetError as error:
        raise CliError(str(error)) from None
    eval_args = None
    if args.eval is not None:  # checked before training, not after it
        from labeling.cli.eval_command import parse_eval_options

        if args.method == "reward":
            raise CliError("--eval judges a trained policy; a reward run trains none")
        eval_args = parse_eval_options(args.eval)
    engine = open_store(args)
    judge = judge_reward(args, engine)
    status = "failed"
    try:
        with use_judge(judge):
            result = run_training(request, engine=engine, progress=not args.no_progress)
        status = "done"
    except (TrainingError, PresetError, ModelError) as error:
        raise CliError(str(error)) from None
    except ValueError as error:  # e.g. a Selection value out of range
        raise CliError(str(error).splitlines()[0]) from None
    except KeyboardInterrupt:
        status = "aborted"
        raise
    finally:
        if judge is not None:
            judge.close(status)
    if not result.main:  # another rank of an accelerate/torchrun launch: rank 0 reports
        return 0
    for note in result.notes:
        print(f"note: {note}")
    shown = {k: v for k, v in result.metrics.items()
             if k in ("train_loss", "final_loss", "final_rewards/accuracies", "eval_accuracy", "final_reward",
                      "final_kl", "global_step", "train_runtime")}
    if args.method in ONLINE_METHODS:
        shown.update(_reward_curve(engine, result.run_id))
    print(f"run {result.run_id} {result.status}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
    print(f"output: {result.output_path}")
    if result.policy_name:
        print(f"registered policy {result.policy_name!r}: prefloop generate --policy {result.policy_name}")
    if eval_args is not None and result.policy_name:
        from labeling.cli.eval_command import evaluate

        return evaluate(engine, result.policy_name, eval_args)
    return 0


def _reward_curve(engine, run_id: int) -> dict:
    """First and last logged mean reward of an online run (its `reward` curve)."""
    from alignment.training.runs import run_metrics

    values = [m.value for m in run_metrics(engine, run_id) if m.name == "reward"]
    return {"first_reward": values[0], "last_reward": values[-1]} if values else {}


def use_judge(judge):
    """The judge reward handed down to the run (alignment may not import labeling)."""
    import contextlib

    if judge is None:
        return contextlib.nullcontext()
    from alignment.training.online_rewards import use_judge as handing_down

    return handing_down(judge)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
