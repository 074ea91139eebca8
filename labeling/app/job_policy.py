"""What an admin may start from the browser: the allow-list of flags, endpoints and paths of web jobs.

Admins in the browser are trusted with the data, not with the host (DESIGN.md, "Security
model"). A web job is a `prefloop generate|judge|train` run, but only with flags that cannot
read a file, reach a host or run code the operator did not choose:

- flags outside a per-command allow-list are refused (`--base-url`, `--api-key-env`,
  `--reward-function`, `--db`, ...), and so are shortened flags, which argparse would expand;
- an OpenAI-compatible endpoint is named with `--endpoint NAME`; its URL, API-key variable
  and default model come from the operator's `prefloop serve --endpoint NAME=URL,...`;
- paths (`--output-dir`, `--data`, `--criteria-file`, `--config`, `--reward-model`, a model
  directory) must resolve, symlinks followed, inside the job directory or a data directory
  the operator named; relative paths are taken from the job directory, and the job gets the
  resolved absolute path, so what is checked is what is used;
- rewards: `--reward-run`, `--reward-rubric` (built-in rules only) and `--reward-model` (a path,
  checked as above) are allowed; `--reward-function` (code) and `--reward-judge` (its URL and
  key come from `--judge-*` flags, which web jobs cannot name) are refused;
- presets are named, never paths; `--rubric` takes the built-in rules only; `--set` and the
  keys of a `--config` file are limited to hyperparameters (no trust_remote_code, no paths).

The CLI run by the operator keeps its full power: nothing here is used by `labeling.cli`.
The flags themselves are read from the CLI's own parsers, which the CLI hands in as a
`CommandLine` (labeling/cli/job_commands.py): the CLI starts the app, so the app does not
import it.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alignment.training.methods import METHOD_NAMES

ENDPOINT_FLAG = "--endpoint"
# The variables the judge and generate backends read a key from by default: a job never
# inherits them, so a key reaches only the endpoint the operator configured it for.
DEFAULT_KEY_ENVS = ("PREFLOOP_JUDGE_API_KEY", "OPENAI_API_KEY")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENDPOINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class JobRefused(ValueError):
    """A web job's arguments break the policy: one line that names the flag."""


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server the operator lets web jobs use."""

    name: str
    base_url: str
    key_env: str | None = field(default=None, metadata={"help": "variable holding its API key"})
    model: str | None = field(default=None, metadata={"help": "model used when a job names none"})


def parse_endpoint(text: str) -> Endpoint:
    """`NAME=URL[,key-env=VAR][,model=MODEL]`, as `prefloop serve --endpoint` takes it."""
    name, sep, rest = text.partition("=")
    if not sep or not _ENDPOINT_NAME.fullmatch(name):
        raise ValueError(f"{text!r}: expected NAME=URL[,key-env=VAR][,model=MODEL]")
    url, *options = rest.split(",")
    if not re.fullmatch(r"https?://[^\s,]+", url):
        raise ValueError(f"endpoint {name}: {url!r} is not an http(s) URL")
    settings: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if key not in ("key-env", "model") or not sep or not value or key in settings:
            raise ValueError(
                f"endpoint {name}: {option!r}: expected key-env=VAR or model=MODEL, once each"
            )
        settings[key] = value
    key_env = settings.get("key-env")
    if key_env is not None and not _ENV_NAME.fullmatch(key_env):
        raise ValueError(
            f"endpoint {name}: key-env={key_env!r} is not an environment variable name"
        )
    return Endpoint(name, url, key_env, settings.get("model"))


@dataclass(frozen=True)
class JobPolicy:
    """The operator's settings for web jobs: where they may read and write, which endpoints."""

    job_dir: Path
    data_dirs: tuple[Path, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()

    def __post_init__(self) -> None:
        # Resolved once, so a later change of the server's working directory moves nothing.
        object.__setattr__(self, "job_dir", Path(self.job_dir).resolve())
        object.__setattr__(self, "data_dirs", tuple(Path(d).resolve() for d in self.data_dirs))
        names = [endpoint.name for endpoint in self.endpoints]
        if len(set(names)) != len(names):
            raise ValueError(f"endpoint names must be unique: {', '.join(names)}")

    @property
    def roots(self) -> tuple[Path, ...]:
        return (self.job_dir, *self.data_dirs)

    def endpoint(self, name: str) -> Endpoint:
        for endpoint in self.endpoints:
            if endpoint.name == name:
                return endpoint
        configured = ", ".join(e.name for e in self.endpoints) or "none"
        raise JobRefused(
            f"{ENDPOINT_FLAG} {name}: no such endpoint (configured on the server: {configured})"
        )


@dataclass(frozen=True)
class CommandLine:
    """The `prefloop` commands web jobs run, as the policy reads them: given by the CLI."""

    # The parser of `prefloop` with (at least) the job commands as subcommands: their flags.
    build_parser: Callable[[], argparse.ArgumentParser]
    # Parse `prefloop ARGV` as the CLI would, raising its one-line error instead of exiting.
    check_arguments: Callable[[list[str]], argparse.Namespace]


@dataclass(frozen=True)
class JobLaunch:
    """What the job runs: its argv (server additions included) and how its environment differs
    from the server's. Holds variable names, never their values."""

    argv: tuple[str, ...]
    drop_env: frozenset[str] = frozenset()
    copy_env: tuple[tuple[str, str], ...] = ()  # (variable in the job, variable of the server)
    set_env: tuple[tuple[str, str], ...] = ()  # literal, non-secret values

    def environment(self, server_env: Mapping[str, str]) -> dict[str, str]:
        env = {k: v for k, v in server_env.items() if k not in self.drop_env}
        env.update(
            {target: server_env[source] for target, source in self.copy_env if source in server_env}
        )
        env.update(self.set_env)
        return env


# ---- the allow-lists ------------------------------------------------------------------------


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# By argparse dest. Anything else, e.g. --base-url, --api-key-env, --reward-function, is refused.
JUDGE_FLAGS = _names(
    "backend model rubric template criteria criteria_file list_templates concurrency rpm "
    "tpm timeout max_attempts max_tokens temperature logprobs batch_size local_mode "
    "max_new_tokens dtype limit price_prompt price_completion route_doubts "
    "doubt_confidence doubt_priority judge_first judge_first_threshold no_progress json"
)
GENERATE_FLAGS = _names(
    "policy prompts split samples max_new_tokens temperature seed backend model quantize batch_size"
)
TRAIN_FLAGS = _names(
    "model preset config set max_steps epochs batch_size learning_rate max_length resume "
    "quantize adapter raters min_agreement min_votes tie_policy weighted seed output_dir "
    "data policy_name from_policy report_to no_progress beta loss_type label_smoothing "
    "desirable_weight undesirable_weight eval_fraction reward_run reward_model kl_coef "
    "kl_target rollout_batch_size mini_batch_size ppo_epochs max_new_tokens temperature "
    "simpo_gamma cpo_alpha num_generations max_completion_length num_iterations reward_rubric"
)
ALLOWED_FLAGS = {"judge": JUDGE_FLAGS, "generate": GENERATE_FLAGS, "train": TRAIN_FLAGS}
PATH_FLAGS = _names("output_dir data criteria_file config reward_model")

_WHY_REFUSED = {
    "db": "a job runs on this server's database",
    "base_url": "endpoints come from the server's settings: name one with --endpoint NAME",
    "api_key_env": "API keys come from the server's settings: name an endpoint with --endpoint NAME",
    "reward_function": "it imports and runs Python code; use --reward-run, --reward-model or "
    "--reward-rubric with built-in rules, or run it from the CLI on the server",
    "reward_judge": "the judge reward is built by the CLI from --judge-* flags (a URL and an API key): "
    "use --reward-run, --reward-model or --reward-rubric, or run it from the CLI on the server",
}

# Settings `--set` and a `--config` file may change: hyperparameters and data selection only.
# Left out on purpose: model.model / model.adapter_path / run.output_dir / run.data / run.runs_dir
# (paths: use the flags, which are checked), model.trust_remote_code, METHOD.reward_function and
# reward_model, METHOD.reward_rubric (module:function rules: use --reward-rubric, which takes the
# built-in rules only) and reward_judge (its backend comes from CLI flags), trainer.report_to /
# push_to_hub / hub_* / deepspeed / *_dir (hosts, files, code).
_HYPERPARAMETERS = _names(
    "learning_rate per_device_train_batch_size per_device_eval_batch_size "
    "gradient_accumulation_steps num_train_epochs max_steps warmup_steps warmup_ratio "
    "weight_decay max_grad_norm adam_beta1 adam_beta2 adam_epsilon optim "
    "lr_scheduler_type seed data_seed max_length max_prompt_length max_completion_length "
    "logging_steps save_steps save_total_limit eval_steps gradient_checkpointing bf16 "
    "fp16 train_sampling_strategy group_by_length label_smoothing_factor beta loss_type "
    "label_smoothing desirable_weight undesirable_weight eval_fraction reward_run kl_coef "
    "kl_target kl_horizon rollout_batch_size mini_batch_size ppo_epochs "
    "generation_batch_size max_new_tokens temperature cliprange cliprange_value vf_coef "
    "gamma lam missing_eos_penalty score_clip rpo_alpha "
    # SimPO/CPO and ORPO (alpha: CPOConfig's AlphaPO exponent), GRPO/RLOO sampling and updates
    "simpo_gamma cpo_alpha alpha num_generations num_iterations epsilon epsilon_high top_p top_k "
    "min_p repetition_penalty scale_rewards steps_per_generation"
)
SETTABLE = {
    "model": _names("quantize compute_dtype double_quant quant_type dtype device"),
    "adapter": _names(
        "method r alpha dropout target_modules target_parameters gradient_checkpointing"
    ),
    "selection": _names(
        "rater_kinds import_as method min_votes min_agreement tie_policy both_bad_policy "
        "weighted sft_min_agreement sft_source"
    ),
    "run": _names("min_examples policy_name from_policy resume"),
    "trainer": _HYPERPARAMETERS,
    **{method: _HYPERPARAMETERS for method in METHOD_NAMES},
}


# ---- the check ------------------------------------------------------------------------------


def authorize(
    policy: JobPolicy,
    command: str,
    args: list[str],
    *,
    command_line: CommandLine,
    server_env: Mapping[str, str] | None = None,
) -> JobLaunch:
    """The launch of `prefloop COMMAND ARGS` as a web job, or JobRefused naming the flag.

    The CLI's own error (command_line.check_arguments: labeling.cli's ArgumentsError) comes
    first for arguments the CLI itself would refuse."""
    check_arguments = command_line.check_arguments
    server_env = os.environ if server_env is None else server_env
    if command not in ALLOWED_FLAGS:
        raise JobRefused(f"unknown job {command!r} (known: {', '.join(ALLOWED_FLAGS)})")
    args, endpoint_name = _take_endpoint(command, args)
    parsed = check_arguments([command, *args])  # the CLI's own messages: usage, typos, bad values
    positional, flags = _given_flags(command_line, command, args)
    allowed = ALLOWED_FLAGS[command]
    argv: list[str] = [command, *positional]
    for flag, dest, value in flags:
        if dest not in allowed:
            why = _WHY_REFUSED.get(
                dest, "not on the web jobs' allow-list; run it from the CLI on the server"
            )
            raise JobRefused(f"{flag}: not allowed in web jobs ({why})")
        if value is not None:
            value = _checked_value(policy, command, parsed, flag, dest, value)
        argv += [flag] if value is None else [flag, value]
    launch = _with_endpoint(policy, command, parsed, endpoint_name, argv, server_env)
    check_arguments(list(launch.argv))  # what the server added parses too
    return launch


def _take_endpoint(command: str, args: list[str]) -> tuple[list[str], str | None]:
    """Remove the web-only `--endpoint NAME`, which the CLI does not know."""
    rest: list[str] = []
    names: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token == ENDPOINT_FLAG or token.startswith(ENDPOINT_FLAG + "="):
            if command not in ("judge", "generate"):
                raise JobRefused(f"{ENDPOINT_FLAG}: only judge and generate jobs use an endpoint")
            if "=" in token:
                names.append(token.split("=", 1)[1])
                i += 1
            elif i + 1 < len(args):
                names.append(args[i + 1])
                i += 2
            else:
                raise JobRefused(
                    f"{ENDPOINT_FLAG}: expected the NAME of an endpoint configured on the server"
                )
            continue
        rest.append(token)
        i += 1
    if len(names) > 1:
        raise JobRefused(f"{ENDPOINT_FLAG}: give one endpoint, not {len(names)}")
    return rest, (names[0] if names else None)


def _command_parser(
    command_line: CommandLine, command: str, method: str | None
) -> argparse.ArgumentParser:
    parser = _subcommands(command_line.build_parser())[command]
    return _subcommands(parser)[method] if command == "train" else parser


def _subcommands(parser: argparse.ArgumentParser) -> dict:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    raise LookupError(parser.prog)


def _given_flags(
    command_line: CommandLine, command: str, args: list[str]
) -> tuple[list[str], list[tuple[str, str, str | None]]]:
    """(positionals, [(flag, dest, value or None)]) as written, after check_arguments accepted them.

    Flags must be written in full: argparse would expand `--base` to `--base-url`, and an
    allow-list of spellings is only sound when each flag has one."""
    positional: list[str] = []
    if command == "train":
        positional, args = [args[0]], args[1:]  # the method; check_arguments made sure it is one
    parser = _command_parser(command_line, command, positional[0] if positional else None)
    options = parser._option_string_actions
    flags: list[tuple[str, str, str | None]] = []
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("-") or token == "-":
            raise JobRefused(f"{token!r}: unexpected argument (web jobs take --flag VALUE pairs)")
        name, eq, inline = token.partition("=")
        action = options.get(name)
        if action is None:
            full = sorted(o for o in options if o.startswith(name)) if len(name) > 2 else []
            hint = f" (write it in full: {', '.join(full)})" if 0 < len(full) <= 4 else ""
            raise JobRefused(f"{name}: unknown or shortened flag{hint}")
        if action.nargs == 0:
            if eq:
                raise JobRefused(f"{name}: takes no value")
            flags.append((name, action.dest, None))
            i += 1
        elif eq:
            flags.append((name, action.dest, inline))
            i += 1
        else:
            flags.append((name, action.dest, args[i + 1]))
            i += 2
    return positional, flags


def _checked_value(
    policy: JobPolicy, command: str, parsed, flag: str, dest: str, value: str
) -> str:
    """The value the job gets (paths made absolute), or JobRefused."""
    if "\x00" in value:
        raise JobRefused(f"{flag}: NUL character in the value")
    if dest in PATH_FLAGS:
        path = inside_roots(policy, flag, value)
        if dest == "config":
            check_config_file(flag, path)
        return str(path)
    if dest == "preset":
        return check_preset(flag, value)
    if dest in ("rubric", "reward_rubric"):
        return check_rubric(flag, value)
    if dest == "set":
        check_setting(flag, value)
        return value
    if dest == "report_to":
        return check_trackers(flag, value)
    if dest == "model" and getattr(parsed, "backend", "local") != "openai":
        return check_model(policy, flag, value)  # openai: a name the endpoint serves, not a file
    if dest == "policy":
        return ",".join(
            check_model(policy, flag, name.strip()) for name in value.split(",") if name.strip()
        )
    return value


def check_trackers(flag: str, value: str) -> str:
    """Offline trackers only: the others send the run to a host with the server's credentials."""
    from alignment.training.trackers import OFFLINE_TRACKERS

    names = [name.strip() for name in value.split(",") if name.strip()]
    hosted = [name for name in names if name not in (*OFFLINE_TRACKERS, "none")]
    if hosted:
        raise JobRefused(f"{flag} {hosted[0]}: not allowed in web jobs (it reports to a host with the server's "
                         f"credentials; offline trackers: {', '.join(OFFLINE_TRACKERS)})")
    return value


def inside_roots(policy: JobPolicy, flag: str, value: str) -> Path:
    """`value` resolved (relative to the job directory, symlinks followed) inside a root."""
    raw = Path(value)
    resolved = (raw if raw.is_absolute() else policy.job_dir / raw).resolve()
    if any(resolved.is_relative_to(root) for root in policy.roots):
        return resolved
    where = ", ".join(str(root) for root in policy.roots)
    raise JobRefused(f"{flag} {value}: outside the job and data directories ({where})")


def check_config_file(flag: str, path: Path) -> None:
    """A --config file may set what --set may: it is read by the job, so read it here first."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise JobRefused(f"{flag} {path}: {error.strerror}") from None
    except yaml.YAMLError:
        raise JobRefused(f"{flag} {path}: not valid YAML") from None
    if not isinstance(data, dict):
        raise JobRefused(f"{flag} {path}: expected a mapping of sections")
    for section, values in data.items():
        if section == "description" or values is None:
            continue
        if not isinstance(values, dict):
            raise JobRefused(f"{flag} {path}: section {section!r} must be a mapping of settings")
        for key in values:
            _check_key(f"{flag} {path}", str(section), key)


def check_setting(flag: str, text: str) -> None:
    path = text.split("=", 1)[0]
    section, _, key = path.partition(".")
    _check_key(f"{flag} {text}", section, key)


def _check_key(where: str, section: str, key) -> None:
    if key not in SETTABLE.get(section, ()):
        raise JobRefused(
            f"{where}: {section}.{key} cannot be set from a web job "
            "(hyperparameters and data selection only; paths through their flags)"
        )


def check_preset(flag: str, value: str) -> str:
    from alignment.training.presets import AUTO_PRESET, list_presets

    known = list_presets()
    if value != AUTO_PRESET and value not in known:
        raise JobRefused(
            f"{flag} {value}: presets by name only (known: {', '.join([AUTO_PRESET, *known])})"
        )
    return value


def check_rubric(flag: str, value: str) -> str:
    from labeling.judge.rubric import RULES

    for part in (p.strip() for p in value.split(",")):
        if part and part not in RULES:
            raise JobRefused(
                f"{flag} {part}: web jobs use the built-in rules only ({', '.join(RULES)}); "
                "module:function runs from the CLI"
            )
    return value


def check_model(policy: JobPolicy, flag: str, value: str) -> str:
    """'default', a stored policy, a Hugging Face id, or a model directory inside a root.

    The loader takes an existing directory before a Hub id, so any value that names one (from
    the server's working directory, where the job runs, or from the job directory) is a path;
    the job gets it resolved from the job directory, so it loads what was checked."""
    from alignment.models.spec import DEFAULT_MODEL_ALIASES

    if value in DEFAULT_MODEL_ALIASES:
        return value
    if not (
        value.startswith((".", "/", "~", "\\"))
        or _exists(Path(value))
        or _exists(policy.job_dir / value)
    ):
        return value  # a Hub id or a stored policy's name: no file is read
    if value.startswith("~"):
        raise JobRefused(f"{flag} {value}: outside the job and data directories")
    return str(inside_roots(policy, flag, value))


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long to be a path is not one
        return False


def _with_endpoint(policy, command, parsed, endpoint_name, argv, server_env) -> JobLaunch:
    """Fill in the operator's endpoint; keep every other configured key out of the job."""
    drop = frozenset({*DEFAULT_KEY_ENVS, *(e.key_env for e in policy.endpoints if e.key_env)})
    remote = getattr(parsed, "backend", None) == "openai"
    if not remote:
        if endpoint_name is not None:
            raise JobRefused(f"{ENDPOINT_FLAG} {endpoint_name}: only with --backend openai")
        return JobLaunch(tuple(argv), drop_env=drop)
    if endpoint_name is None:
        configured = ", ".join(e.name for e in policy.endpoints) or (
            "none: the operator adds one with `prefloop serve --endpoint NAME=URL,key-env=VAR`"
        )
        raise JobRefused(
            f"--backend openai: name an endpoint with {ENDPOINT_FLAG} NAME (configured: {configured})"
        )
    endpoint = policy.endpoint(endpoint_name)
    if endpoint.key_env and not server_env.get(endpoint.key_env):
        raise JobRefused(
            f"{ENDPOINT_FLAG} {endpoint.name}: the server has no ${endpoint.key_env} set for its key"
        )
    argv = [*argv, "--base-url", endpoint.base_url]
    if endpoint.model and parsed.model is None and getattr(parsed, "policy", None) is None:
        argv += ["--model", endpoint.model]
    copy: tuple[tuple[str, str], ...] = ()
    fixed: tuple[tuple[str, str], ...] = ()
    if command == "judge":
        # The judge refuses to run without a key; a keyless endpoint (a local vLLM) gets a dummy.
        key_env = endpoint.key_env or DEFAULT_KEY_ENVS[0]
        argv += ["--api-key-env", key_env]
        copy = ((key_env, key_env),) if endpoint.key_env else ()
        fixed = () if endpoint.key_env else ((key_env, "EMPTY"),)
    elif endpoint.key_env:  # generate reads OPENAI_API_KEY
        copy = (("OPENAI_API_KEY", endpoint.key_env),)
    return JobLaunch(tuple(argv), drop_env=drop, copy_env=copy, set_env=fixed)
