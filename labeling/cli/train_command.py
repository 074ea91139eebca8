"""`prefloop train {sft,reward,dpo,kto,ppo}`: train from exactly the preferences in the store.

    prefloop train dpo --max-steps 50
    prefloop train reward --model default --eval-fraction 0.2
    prefloop train dpo --preset seed-qlora --loss-type ipo --beta 0.5 --raters human --min-agreement 0.75
    prefloop train sft --data my_sft.parquet
    prefloop train ppo --reward-run 4 --max-steps 100   # RLHF on the stored prompts, scored by run 4's model
    prefloop train dpo --resume                  # the latest unfinished dpo run, from its last checkpoint
    prefloop train dpo --from-policy sft-3       # start from policy sft-3, which is also the reference
    accelerate launch --config_file configs/accelerate/ddp.yaml -m labeling.cli train dpo

Settings: a preset (alignment/training/presets/*.yaml; default cpu-lora on CPU, seed-qlora on CUDA),
then --config FILE (same YAML shape), then these flags and any --set section.key=value.
"""

from __future__ import annotations

import argparse

from alignment.training.methods import METHODS
from labeling.cli.common import CliError, open_store

DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")

# flag dest -> (section, key): where a flag's value lands in the settings layers.
FLAG_SETTINGS = {
    "max_steps": ("trainer", "max_steps"),
    "epochs": ("trainer", "num_train_epochs"),
    "batch_size": ("trainer", "per_device_train_batch_size"),
    "learning_rate": ("trainer", "learning_rate"),
    "max_length": ("trainer", "max_length"),
    "seed": ("trainer", "seed"),
    "report_to": ("trainer", "report_to"),
    "quantize": ("model", "quantize"),
    "adapter": ("adapter", "method"),
    "raters": ("selection", "rater_kinds"),
    "min_agreement": ("selection", "min_agreement"),
    "min_votes": ("selection", "min_votes"),
    "tie_policy": ("selection", "tie_policy"),
    "weighted": ("selection", "weighted"),
    "output_dir": ("run", "output_dir"),
    "data": ("run", "data"),
    "policy_name": ("run", "policy_name"),
    "resume": ("run", "resume"),
    "from_policy": ("run", "from_policy"),
    "beta": ("METHOD", "beta"),
    "loss_type": ("METHOD", "loss_type"),
    "label_smoothing": ("METHOD", "label_smoothing"),
    "desirable_weight": ("METHOD", "desirable_weight"),
    "undesirable_weight": ("METHOD", "undesirable_weight"),
    "eval_fraction": ("METHOD", "eval_fraction"),
    "reward_run": ("METHOD", "reward_run"),
    "reward_model": ("METHOD", "reward_model"),
    "reward_function": ("METHOD", "reward_function"),
    "kl_coef": ("METHOD", "kl_coef"),
    "kl_target": ("METHOD", "kl_target"),
    "rollout_batch_size": ("METHOD", "rollout_batch_size"),
    "mini_batch_size": ("METHOD", "mini_batch_size"),
    "ppo_epochs": ("METHOD", "ppo_epochs"),
    "max_new_tokens": ("METHOD", "max_new_tokens"),
    "temperature": ("METHOD", "temperature"),
}


def _loss_types(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in DPO_LOSSES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected one or more of {', '.join(DPO_LOSSES)} (comma-separated)")
    return names


def _fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return number


def _common_flags() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", default=None,
                        help="base model: 'default' (embedded SmolLM2-135M-Instruct, unless the config says "
                             "otherwise), a Hugging Face id or a path")
    parser.add_argument("--preset", default="auto",
                        help="a preset name (alignment/training/presets/NAME.yaml) or a YAML path (default: seed-qlora on CUDA, cpu-lora on CPU)")
    parser.add_argument("--config", default=None, metavar="FILE", help="a YAML file over the preset")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any setting, e.g. --set trainer.warmup_steps=10 (repeatable, last wins)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    parser.add_argument("--epochs", type=float, default=None, help="passes over the data (when no --max-steps)")
    parser.add_argument("--batch-size", type=int, default=None, help="per-device batch size")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--max-length", type=int, default=None, help="tokens per prompt + completion")
    parser.add_argument("--resume", action="store_true", default=None,
                        help="continue the latest unfinished run of this method from its last checkpoint")
    parser.add_argument("--quantize", choices=("auto", "none", "8bit", "4bit"), default=None,
                        help="base model precision (auto: 4bit on CUDA, none on CPU)")
    parser.add_argument("--adapter", choices=("lora", "dora", "full", "lm_head"), default=None,
                        help="what is trained (default lora)")
    parser.add_argument("--raters", choices=("human", "judge", "both"), default=None, help="whose votes count")
    parser.add_argument("--min-agreement", type=_fraction, default=None,
                        help="drop comparisons whose majority has a smaller share of the votes (0-1)")
    parser.add_argument("--min-votes", type=int, default=None, help="drop comparisons with fewer votes")
    parser.add_argument("--tie-policy", choices=("drop", "half"), default=None,
                        help="reward model: drop ties, or train on both orders with margin 0")
    parser.add_argument("--weighted", action="store_true", default=None, help="weight votes by each rater's weight")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--output-dir", default=None, help="where checkpoints and the adapter go")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="train on this parquet/JSONL file (TRL format) instead of the store's export")
    parser.add_argument("--policy-name", default=None, help="name of the policy the run registers")
    parser.add_argument("--from-policy", default=None, metavar="NAME",
                        help="start from this stored policy ('latest': the newest trained one); it is the "
                             "reference (DPO/KTO log-ratio, PPO KL) and the parent of the new policy")
    parser.add_argument("--report-to", choices=("none", "tensorboard"), default=None,
                        help="also log to TensorBoard (under the output directory)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--eval", nargs="?", const="", default=None, metavar="OPTIONS",
                        help="then judge the new policy against its parent on the eval prompts, with "
                             "`prefloop eval` options in one string, e.g. --eval=\"--backend rubric --prompts 50\"")
    return parser


def _method_flags(method: str, parser: argparse.ArgumentParser) -> None:
    if method in ("dpo", "kto"):
        parser.add_argument("--beta", type=float, default=None, help="how far the policy may move from the reference")
    if method == "dpo":
        parser.add_argument("--loss-type", type=_loss_types, default=None, metavar="TYPE[,TYPE]",
                            help=f"TRL's DPO losses: {', '.join(DPO_LOSSES)}")
        parser.add_argument("--label-smoothing", type=float, default=None, help="robust / exo_pair losses")
    if method == "kto":
        parser.add_argument("--desirable-weight", type=float, default=None,
                            help="default: set from the class ratio")
        parser.add_argument("--undesirable-weight", type=float, default=None,
                            help="default: set from the class ratio")
    if method == "reward":
        parser.add_argument("--eval-fraction", type=_fraction, default=None,
                            help="share of pairs held out for the accuracy report (default 0.1)")
    if method == "ppo":
        reward = parser.add_argument_group("reward (one of)")
        reward.add_argument("--reward-run", type=int, default=None, metavar="RUN_ID",
                            help="a finished `prefloop train reward` run: its model scores the completions")
        reward.add_argument("--reward-model", default=None, metavar="PATH",
                            help="a saved reward model directory (a reward run's output)")
        reward.add_argument("--reward-function", default=None, metavar="MODULE:FUNCTION",
                            help="a rule-based reward, f(completions, prompts) -> list of floats")
        ppo = parser.add_argument_group(
            "PPO", "--max-steps counts PPO steps (one rollout batch each), --batch-size is the micro-batch of the "
            "gradient passes; more settings with --set ppo.KEY=VALUE (cliprange, cliprange_value, vf_coef, gamma, "
            "lam, missing_eos_penalty, ...)")
        ppo.add_argument("--kl-coef", type=float, default=None, help="per-token KL penalty to the reference (0.05)")
        ppo.add_argument("--kl-target", type=float, default=None,
                         help="adapt the KL coefficient towards this KL per completion (default: fixed)")
        ppo.add_argument("--rollout-batch-size", type=int, default=None, help="completions per PPO step (16)")
        ppo.add_argument("--mini-batch-size", type=int, default=None, help="completions per optimizer step (8)")
        ppo.add_argument("--ppo-epochs", type=int, default=None, help="passes over each rollout batch (4)")
        ppo.add_argument("--max-new-tokens", type=int, default=None, help="most tokens per completion (64)")
        ppo.add_argument("--temperature", type=float, default=None, help="rollout sampling temperature (0.7)")


def register(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "train", help="train SFT / reward model / DPO / KTO / PPO from the stored preferences",
        description=__doc__.splitlines()[0],
    )
    methods = parser.add_subparsers(dest="method", required=True, metavar="METHOD")
    shared = _common_flags()
    for method in METHODS:
        sub = methods.add_parser(method.name, parents=[common, shared], help=method.summary,
                                 description=f"prefloop train {method.name}: {method.summary}")
        _method_flags(method.name, sub)
        sub.set_defaults(handler=run_train)


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
    try:
        result = run_training(request, engine=engine, progress=not args.no_progress)
    except (TrainingError, PresetError, ModelError) as error:
        raise CliError(str(error)) from None
    except ValueError as error:  # e.g. a Selection value out of range
        raise CliError(str(error).splitlines()[0]) from None
    if not result.main:  # another rank of an accelerate/torchrun launch: rank 0 reports
        return 0
    for note in result.notes:
        print(f"note: {note}")
    shown = {k: v for k, v in result.metrics.items()
             if k in ("train_loss", "final_loss", "final_rewards/accuracies", "eval_accuracy", "final_reward",
                      "final_kl", "global_step", "train_runtime")}
    print(f"run {result.run_id} {result.status}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
    print(f"output: {result.output_path}")
    if result.policy_name:
        print(f"registered policy {result.policy_name!r}: prefloop generate --policy {result.policy_name}")
    if eval_args is not None and result.policy_name:
        from labeling.cli.eval_command import evaluate

        return evaluate(engine, result.policy_name, eval_args)
    return 0


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
