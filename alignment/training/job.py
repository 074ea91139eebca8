"""One training run, end to end: settings -> data snapshot -> run row -> model -> TRL -> lineage.

    result = run_training(TrainRequest("dpo", model="default", overrides=[{"trainer": {"max_steps": 20}}]),
                          engine=engine)
    result.run_id, result.status, result.metrics, result.policy_name

Settings come from a preset, a config file and CLI layers (`presets.py`). The data is the
store's export for the method (or a parquet/JSONL file), snapshotted before anything trains:
the run row holds the ids and content hash, and the rows themselves are kept next to the
checkpoints so `--resume` continues on exactly the same data. A finished policy run
registers a new PolicyVersion (base + adapter, parent, run); a reward run records the path
of its model. `run.from_policy` starts the run from a stored policy, which is then its
reference and the new policy's parent (`lineage.py`). Any failure marks the run failed (or
aborted, for a NaN or an interrupt) with the reason, and registers nothing.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from alignment.training import lineage, presets, runs
from alignment.training.methods import METHOD_NAMES
from alignment.training.common import (
    MethodSpec,
    NonFiniteGuard,
    NonFiniteLoss,
    Notes,
    TrainingError,
    device_settings,
    flatten_conversations,
    is_conversational_dataset,
    restore_trainable_dtype,
)
from feedback_store.models import RunStatus

log = logging.getLogger("prefloop.train")

DATA_FILE = "data.parquet"
MANIFEST = "prefloop_run.json"


@dataclass
class RunOptions:
    """How a run is set up around the trainer (the `run:` section of presets and configs)."""

    output_dir: str | None = field(
        default=None, metadata={"help": "checkpoints, data and the adapter go here (default RUNS_DIR/METHOD-RUN_ID)"}
    )
    runs_dir: str = field(default="runs", metadata={"help": "parent of the default output directories"})
    data: str | None = field(
        default=None, metadata={"help": "train on this parquet/JSONL file instead of the store's export"}
    )
    min_examples: int = field(default=4, metadata={"help": "refuse a snapshot with fewer rows than this"})
    policy_name: str | None = field(
        default=None, metadata={"help": "name of the policy a finished run registers (default METHOD-RUN_ID)"}
    )
    resume: bool = field(
        default=False, metadata={"help": "continue the latest unfinished run of this method from its last checkpoint"}
    )
    from_policy: str | None = field(
        default=None, metadata={"help": "start from this policy version (a name, or latest): also the run's "
                                        "reference (DPO/KTO log-ratio, PPO KL) and the new policy's parent"}
    )


@dataclass
class TrainRequest:
    """What `prefloop train METHOD` asks for; `overrides` are the CLI's layers, last wins."""

    method: str
    model: str | None = None  # over the settings' model.model, itself "default" unless set
    preset: str = presets.AUTO_PRESET
    config_file: str | None = None
    overrides: list[dict] = field(default_factory=list)


@dataclass
class RunResult:
    run_id: int
    status: str
    metrics: dict
    output_path: str | None
    policy_name: str | None = None
    notes: list[str] = field(default_factory=list)
    main: bool = True  # False on the other ranks of a multi-process launch
    trainer: Any = None  # only with build_only=True: the trainer, ready to train


def get_method(name: str) -> MethodSpec:
    if name not in METHOD_NAMES:
        raise TrainingError(f"unknown training method {name!r} (expected one of {', '.join(METHOD_NAMES)})")
    return importlib.import_module(f"alignment.training.{name}").METHOD


# --------------------------------------------------------------------------- settings


def resolve_settings(request: TrainRequest) -> dict:
    layers = [presets.load_preset(request.preset)]
    if request.config_file:
        layers.append(presets.load_yaml(request.config_file))
    layers += [dict(layer, _source="command line") for layer in request.overrides]
    if request.model:
        layers.append({"model": {"model": request.model}, "_source": "command line"})
    return presets.settings_for(presets.merge(*layers), request.method)


def check_trainer_keys(method: MethodSpec, trainer: dict, sources: dict) -> None:
    import dataclasses

    known = {f.name for f in dataclasses.fields(method.config_class) if f.init}
    for key in trainer:
        if key not in known:
            where = sources.get(f"{method.name}.{key}") or sources.get(f"trainer.{key}") or "settings"
            raise presets.PresetError(
                f"{where}: trainer.{key}: not a setting of {method.config_class.__name__}"
                f"{presets._suggest(key, known)}"
            )


# --------------------------------------------------------------------------- data


def read_data_file(path: str):
    from datasets import load_dataset

    file = Path(path)
    if not file.is_file():
        raise TrainingError(f"--data {path}: no such file")
    kind = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}.get(file.suffix.lower())
    if kind is None:
        raise TrainingError(f"--data {path}: expected a .parquet or .jsonl file")
    try:
        return load_dataset(kind, data_files=str(file), split="train")
    except Exception as error:  # datasets raises many types for unreadable files
        raise TrainingError(f"--data {path}: cannot read it ({str(error).splitlines()[0]})") from None


def load_data(method: MethodSpec, selection, data_path: str | None, engine: Engine):
    """(dataset, where it came from): the store's export for the method, or a file."""
    if data_path:
        dataset = read_data_file(data_path)
        if method.required_columns and not any(set(cols) <= set(dataset.column_names)
                                               for cols in method.required_columns):
            wanted = " or ".join("/".join(cols) for cols in method.required_columns)
            raise TrainingError(f"--data {data_path}: {method.name} needs columns {wanted} "
                                f"(found {', '.join(dataset.column_names) or 'none'})")
        return dataset, f"file:{Path(data_path).resolve()}"
    from feedback_store.db import read_scope
    from feedback_store.export import export

    with read_scope(engine) as session:
        return export(method.export, session=session, selection=selection), f"store:{method.export}"


# --------------------------------------------------------------------------- the run


def run_training(request: TrainRequest, *, engine: Engine, progress: bool = True, callbacks=(),
                 build_only: bool = False) -> RunResult:
    """Train as `request` says and record it in the store. Raises TrainingError (one line) when the
    run cannot start or fails; the run row, if one was created, says why.

    build_only: stop once the trainer is built (the run row stays `running`) and return it in
    `RunResult.trainer`: for benchmarks and notebooks that drive the steps themselves."""
    from alignment.models import ModelSpec
    from alignment.models.adapters import AdapterConfig
    from feedback_store.export import Selection, snapshot

    method = get_method(request.method)
    settings = resolve_settings(request)
    sources = settings["_sources"]
    options = presets.build(RunOptions, settings["run"], "run", sources)
    if options.resume:
        return _resume(request, method, settings, options, engine=engine, progress=progress, callbacks=callbacks)
    check_trainer_keys(method, settings["trainer"], sources)
    if method.resolve is not None:
        settings["trainer"] = method.resolve(settings["trainer"], engine)
    spec = presets.build(ModelSpec, settings["model"], "model", sources)
    adapter = presets.build(AdapterConfig, settings["adapter"], "adapter", sources)
    selection = presets.build(Selection, settings["selection"], "selection", sources)
    start = _start_point(options, spec, method, adapter, engine)
    if start is not None:
        settings["run"]["from_policy"] = start.name  # "latest" as it resolved: --resume starts from the same one

    state = _process_state()
    spec = _placed(spec)
    if not state.is_main_process:
        # Under `accelerate launch`, rank 0 exports, snapshots and records the run; the others
        # train on the very rows it saved.
        run_id, output_dir = _from_main()
        return _execute(method, run_id, spec, adapter, settings, options, Path(output_dir),
                        lambda: _saved_data(Path(output_dir)), engine=engine, progress=progress,
                        callbacks=callbacks, checkpoint=None, main=False, start=start)
    try:
        dataset, source = load_data(method, selection, options.data, engine)
    except BaseException as error:
        _to_followers(state, error=str(error))
        raise
    ids, digest = snapshot(dataset)
    record = {
        "method": method.name,
        "model": spec.model,
        "preset": request.preset,
        "config_file": request.config_file,
        "data": source,
        "settings": {k: v for k, v in settings.items() if not k.startswith("_")},
    }
    if start is not None:
        record["from_policy"] = {"name": start.name, "id": start.policy_id}
    seed = int(settings["trainer"].get("seed", 42))
    run_id = runs.start_run(engine, kind=method.name, config=record, snapshot_ids=ids, snapshot_hash=digest,
                            seed=seed, base_model=spec.model)
    output_dir = Path(options.output_dir or Path(options.runs_dir) / f"{method.name}-{run_id}").resolve()
    record["settings"]["run"]["output_dir"] = str(output_dir)
    runs.update_config(engine, run_id, record)

    def prepare():
        try:
            if len(dataset) < options.min_examples:
                if len(dataset) == 0:
                    where = f"the file {options.data}" if options.data else "the store"
                    raise TrainingError(f"no {method.name} training data in {where} for this selection: record "
                                        f"votes first (prefloop serve / prefloop judge) or loosen "
                                        f"--raters/--min-agreement")
                raise TrainingError(
                    f"the {method.name} snapshot has {len(dataset)} rows, fewer than the {options.min_examples} "
                    f"needed (more votes, a looser selection, or --set run.min_examples=N)"
                )
            output_dir.mkdir(parents=True, exist_ok=True)
            dataset.to_parquet(str(output_dir / DATA_FILE))  # what --resume (and other ranks) train on
        except BaseException as error:
            _to_followers(state, error=str(error))
            raise
        _to_followers(state, run_id=run_id, output_dir=str(output_dir))
        return dataset

    return _execute(method, run_id, spec, adapter, settings, options, output_dir, prepare,
                    engine=engine, progress=progress, callbacks=callbacks, checkpoint=None, build_only=build_only,
                    start=start)


def _start_point(options: RunOptions, spec, method: MethodSpec, adapter, engine: Engine):
    """The policy the run starts from (None: the base model), checked before anything is recorded."""
    from alignment.models import resolve_quantize

    if not options.from_policy:
        return None
    return lineage.resolve_start(engine, options.from_policy, model=spec.model, method=method.name,
                                 adapter_method=adapter.method, quantized=resolve_quantize(spec) != "none")


def _process_state():
    """The launch this process is part of (one process unless started by accelerate/torchrun).
    cpu= as the trainer will say it (use_cpu on a machine without CUDA), so that this first
    initialisation of accelerate's shared state is the one the trainer finds."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _placed(spec):
    """Under a multi-process launch each rank loads its copy on its own GPU (the model layer's
    "auto" would put every rank on cuda:0)."""
    import dataclasses

    import torch

    state = _process_state()
    if state.num_processes > 1 and spec.device == "auto" and torch.cuda.is_available():
        return dataclasses.replace(spec, device=f"cuda:{state.local_process_index}")
    return spec


def _to_followers(state, **message) -> None:
    """Rank 0 tells the other ranks which run to join (or why there is none)."""
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list([message])


def _from_main() -> tuple[int, str]:
    from accelerate.utils import broadcast_object_list

    [message] = broadcast_object_list([None])
    if "error" in message:
        raise TrainingError(message["error"])
    return message["run_id"], message["output_dir"]


def _saved_data(output_dir: Path):
    from datasets import Dataset

    return Dataset.from_parquet(str(output_dir / DATA_FILE))


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint the Trainer finished writing. A process killed while saving leaves
    a `checkpoint-N` without `trainer_state.json`, which the Trainer writes last."""
    done = [path for path in output_dir.glob("checkpoint-*") if (path / "trainer_state.json").is_file()]
    steps = {int(path.name.split("-")[-1]): path for path in done if path.name.split("-")[-1].isdigit()}
    return str(steps[max(steps)]) if steps else None


def _resume(request, method, settings, options, *, engine, progress, callbacks) -> RunResult:
    from alignment.models import ModelSpec
    from alignment.models.adapters import AdapterConfig

    run = runs.latest_unfinished_run(engine, method.name, options.output_dir)
    if run is None:
        where = f" in {options.output_dir}" if options.output_dir else ""
        raise TrainingError(f"no unfinished {method.name} run to resume{where}")
    saved = run.config.get("settings", {})
    # The run's own settings, with this command's explicit flags (e.g. a new --max-steps) on top.
    layers = [{**{k: v for k, v in saved.items()}, "_source": f"run {run.id}"}]
    layers += [dict(layer, _source="command line") for layer in request.overrides]
    merged = presets.settings_for(presets.merge(*layers), method.name)
    merged["run"]["resume"] = False
    if method.resolve is not None:
        merged["trainer"] = method.resolve(merged["trainer"], engine)
    sources = merged["_sources"]
    output_dir = Path(saved.get("run", {}).get("output_dir") or options.output_dir or "")
    spec = presets.build(ModelSpec, {"model": run.config.get("model", "default"), **merged["model"]}, "model", sources)
    adapter = presets.build(AdapterConfig, merged["adapter"], "adapter", sources)
    run_options = presets.build(RunOptions, merged["run"], "run", sources)
    data_file = output_dir / DATA_FILE
    if not data_file.is_file():
        raise TrainingError(f"run {run.id}: its data snapshot {data_file} is gone, cannot resume")
    start = _start_point(run_options, spec, method, adapter, engine)

    def prepare():
        from datasets import Dataset

        from feedback_store.export import snapshot

        dataset = Dataset.from_parquet(str(data_file))
        if snapshot(dataset)[1] != run.snapshot_hash:
            raise TrainingError(f"run {run.id}: {data_file} does not match the run's snapshot hash")
        return dataset

    checkpoint = last_complete_checkpoint(output_dir) if output_dir.is_dir() else None
    main = _process_state().is_main_process
    if main:
        runs.reopen_run(engine, run.id, resumed_at_step=int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0)
    result = _execute(method, run.id, _placed(spec), adapter, merged, run_options, output_dir, prepare,
                      engine=engine, progress=progress, callbacks=callbacks, checkpoint=checkpoint, main=main,
                      start=start)
    if checkpoint is None:
        result.notes.insert(0, f"run {run.id} had no checkpoint yet: it restarted from step 0")
    return result


def _execute(method, run_id, spec, adapter, settings, options, output_dir, prepare, *, engine, progress, callbacks,
             checkpoint, main: bool = True, build_only: bool = False, start=None) -> RunResult:
    """Everything after the run row exists: any failure marks it (on the main process), then
    propagates as TrainingError."""
    import torch

    from alignment.models.errors import ModelError

    notes = Notes()

    def mark(reason: str, status: RunStatus = RunStatus.failed) -> None:
        if main:
            runs.fail_run(engine, run_id, reason, status=status)

    try:
        dataset = prepare()
        trainer, config, eval_set, tokenizer, trainer_settings = _build_trainer(
            method, run_id, spec, adapter, settings, dataset, output_dir, notes, engine=engine, progress=progress,
            callbacks=callbacks, main=main, start=start)
        if build_only:
            return RunResult(run_id, RunStatus.running.value, {}, None, None, notes.items, main, trainer)
        metrics, output_path, kind = _train(method, run_id, spec, adapter, trainer, config, eval_set, tokenizer,
                                            trainer_settings, output_dir, engine=engine, checkpoint=checkpoint,
                                            main=main, start=start)
        policy_name = None
        if method.registers_policy:
            policy_name = options.policy_name or f"{method.name}-{run_id}"
        if main:
            if policy_name:
                base_policy = "default" if spec.is_default else spec.model
                full_model = kind == "model"
                runs.register_policy(
                    engine, run_id, name=policy_name,
                    base_model=output_path if full_model else start.model if start else base_policy,
                    adapter_path=None if full_model else output_path,
                    parent_name=start.name if start else base_policy,
                    description=f"{method.name} run {run_id} from {start.name if start else base_policy}",
                )
            final = {**metrics, "notes": "; ".join(notes.items)} if notes.items else metrics
            runs.finish_run(engine, run_id, metrics=final, output_path=output_path)
        return RunResult(run_id, RunStatus.done.value, metrics, output_path, policy_name, notes.items, main)
    except NonFiniteLoss as error:
        mark(str(error), RunStatus.aborted)
        raise TrainingError(f"run {run_id} aborted: {error}") from None
    except KeyboardInterrupt:
        mark("interrupted (resume with --resume)", RunStatus.aborted)
        raise
    except (torch.OutOfMemoryError, MemoryError) as error:
        mark(_oom_message(error))
        raise TrainingError(f"run {run_id} failed: {_oom_message(error)}") from None
    except (TrainingError, ModelError, presets.PresetError) as error:
        mark(str(error))
        raise TrainingError(f"run {run_id} failed: {error}") from None
    except RuntimeError as error:
        if _is_oom(error):
            mark(_oom_message(error))
            raise TrainingError(f"run {run_id} failed: {_oom_message(error)}") from None
        mark(f"{type(error).__name__}: {_first_line(error)}")
        raise
    except BaseException as error:
        mark(f"{type(error).__name__}: {_first_line(error)}")
        raise


def _build_trainer(method, run_id, spec, adapter, settings, dataset, output_dir, notes, *, engine, progress,
                   callbacks, main: bool = True, start=None):
    """Model, adapter, machine settings and TRL trainer for one run."""
    import dataclasses

    import torch
    from transformers import set_seed

    from alignment.models import apply_adapter, context_length, is_quantized, load_model
    from alignment.models.adapters import find_targets

    trainer_settings = dict(settings["trainer"])
    # The run's seed before anything random: a new reward head, LoRA's A matrices.
    set_seed(int(trainer_settings.get("seed", 42)))
    model, tokenizer = load_model(dataclasses.replace(spec, model=start.model) if start else spec, head=method.head)
    if method.head == "causal_lm" and not (hasattr(model, "can_generate") and model.can_generate()):
        raise TrainingError(f"{spec.model} is not a generative (causal) language model: {method.name} needs one")

    # The data, as this tokenizer can read it.
    if tokenizer.chat_template is None and is_conversational_dataset(dataset):
        dataset = flatten_conversations(dataset)
        notes.add(f"{spec.model} has no chat template: chats are rendered as 'role: content' lines")
    if tokenizer.eos_token is None and getattr(tokenizer, "sep_token", None) is not None:
        tokenizer.eos_token = tokenizer.sep_token  # TRL ends plain-text completions with the EOS token
    limit = context_length(model, tokenizer)
    wanted = trainer_settings.get("max_length", method.config_class.max_length)
    if limit and (wanted is None or wanted > limit):
        trainer_settings["max_length"] = limit
        notes.add(f"max_length {wanted} is more than {spec.model} attends to: using {limit}")

    # The adapter.
    gradient_checkpointing = bool(trainer_settings.get("gradient_checkpointing", True))
    if adapter.method == "lm_head" and gradient_checkpointing:
        trainer_settings["gradient_checkpointing"] = gradient_checkpointing = False
        notes.add("lm_head-only training leaves the backbone frozen: gradient checkpointing turned off")
    adapter.gradient_checkpointing = gradient_checkpointing
    if adapter.method in ("lora", "dora") and adapter.target_modules:
        present = set(find_targets(model).modules)
        kept = [name for name in adapter.target_modules if name in present]
        if not kept:
            notes.add(f"none of {adapter.target_modules} in {type(model).__name__}: adapting {sorted(present)}")
        adapter.target_modules = kept or None
    if adapter.method in ("full", "lm_head") and method.name in ("dpo", "kto") and not trainer_settings.get(
        "precompute_ref_log_probs"
    ):
        # No adapter to switch off for the reference: rather than a second model in memory,
        # one no-grad pass over the data before training.
        trainer_settings["precompute_ref_log_probs"] = True
        notes.add(f"{adapter.method} training: reference log-probs precomputed once, no second model copy in memory")
    quantized = is_quantized(model)
    continued = lineage.continues_parent(start, quantized)
    if start is not None:
        model = lineage.start_model(model, start, quantized=quantized, gradient_checkpointing=gradient_checkpointing)
    if continued:
        config = model.peft_config[model.active_adapter]
        notes.add(f"from {start.name} on a quantized base: its adapter is trained on (r={config.r}, "
                  f"alpha={config.lora_alpha}), a frozen copy of it is the reference")
        if method.name == "ppo":
            lineage.add_reference_copy(model)  # TRL's DPO/KTO make this copy themselves
    else:
        model = apply_adapter(model, adapter)

    # The trainer.
    if method.adjust is not None:
        trainer_settings = method.adjust(trainer_settings, dataset)
    flash = str(getattr(model.config, "_attn_implementation", "")).startswith("flash")
    trainer_settings, device_notes = device_settings(trainer_settings, method=method.name,
                                                     cuda=torch.cuda.is_available(), flash_attention=flash)
    for note in device_notes:
        notes.add(note)
    trainer_settings.setdefault("report_to", "none")
    trainer_settings.setdefault("save_total_limit", 2)
    trainer_settings.setdefault("run_name", f"prefloop-{method.name}-{run_id}")
    trainer_settings["disable_tqdm"] = not progress
    try:
        config = method.config_class(output_dir=str(output_dir), **trainer_settings)
    except (TypeError, ValueError) as error:
        raise TrainingError(f"trainer settings: {_first_line(error)}") from None
    if main:
        runs.update_config(engine, run_id, {**runs.get_run(engine, run_id).config,
                                            "trainer": _jsonable(config.to_dict()), "notes": notes.items})

    train_set, eval_set = method.split(dataset, config, config.seed) if method.split else (dataset, None)
    trainer = method.trainer_class(
        model=model,
        args=config,
        train_dataset=train_set,
        processing_class=tokenizer,
        callbacks=[runs.RunMetricsCallback(engine, run_id), NonFiniteGuard(), *callbacks],
    )
    if is_quantized(model) and not (config.bf16 or config.fp16):
        restore_trainable_dtype(trainer.model)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if continued:
        lineage.match_reference_dtype(unwrapped)  # the frozen copy computes as the adapter it copies
    elif "ref" in getattr(unwrapped, "peft_config", {}):
        # TRL copies an adapter it is handed into a frozen "ref" adapter to serve as the reference.
        # This adapter is new (B = 0): the base with adapters off (the parent merged in, for a
        # run from a policy) is exactly the reference, and costs neither the copy's memory nor
        # its LoRA matmuls in every reference pass.
        unwrapped.delete_adapter("ref")
    return trainer, config, eval_set, tokenizer, trainer_settings


def _train(method, run_id, spec, adapter, trainer, config, eval_set, tokenizer, trainer_settings, output_dir, *,
           engine, checkpoint, main: bool = True, start=None):
    from alignment.models import is_quantized, save_adapter

    result = trainer.train(resume_from_checkpoint=checkpoint)

    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    last = next((entry for entry in reversed(trainer.state.log_history) if "loss" in entry), {})
    metrics.update({f"final_{k}": v for k, v in last.items() if isinstance(v, (int, float)) and k != "step"})
    metrics["global_step"] = trainer.state.global_step
    if method.evaluate is not None and eval_set is not None:
        evaluated = method.evaluate(trainer, eval_set)
        metrics.update(evaluated)
        runs.RunMetricsCallback(engine, run_id).on_log(config, trainer.state, None, logs=evaluated)  # rank 0 only

    # The result.
    _plain_attention(trainer.model)
    target = output_dir / ("reward_model" if method.head == "reward" else "adapter")
    kind = adapter.method if adapter.method != "full" else "model"
    if main:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if lineage.REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
            model.delete_adapter(lineage.REFERENCE_ADAPTER)  # the parent's frozen copy is not part of the result
        kind = save_adapter(model, target)
        if start is not None and start.adapter_path and kind == "peft" and not is_quantized(model):
            # trained on the parent merged in: saved as one adapter on the bare weights
            lineage.combine_lora(start.adapter_path, target)
        tokenizer.save_pretrained(target)
        manifest = {"run_id": run_id, "method": method.name, "base_model": spec.model, "head": method.head,
                    "from_policy": start.name if start else None,
                    "adapter_kind": kind, "model_spec": _jsonable(asdict(spec)),
                    "max_length": trainer_settings.get("max_length"),
                    "chat_template": tokenizer.chat_template is not None}
        (target / MANIFEST).write_text(json.dumps(manifest, indent=2))
    trainer.accelerator.wait_for_everyone()
    return metrics, str(target), kind


def _plain_attention(model) -> None:
    """Back to stock SDPA before saving, so no saved config names prefloop's attention function."""
    from alignment.training.packing import PACKED_ATTENTION, unwrap_peft

    base = unwrap_peft(model)
    if getattr(base.config, "_attn_implementation", None) == PACKED_ATTENTION:
        base.set_attn_implementation("sdpa")


def _is_oom(error: BaseException) -> bool:
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def _oom_message(error: BaseException) -> str:
    return ("out of memory: lower trainer.per_device_train_batch_size or trainer.max_length, use "
            "--quantize 4bit, --adapter lora, or set trainer.gradient_checkpointing=true "
            f"({_first_line(error)[:160]})")


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
