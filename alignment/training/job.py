"""One training run, end to end: plan -> data snapshot -> model -> TRL -> lineage.

    result = run_training(TrainRequest("dpo", model="default", overrides=[{"trainer": {"max_steps": 20}}]),
                          engine=engine)
    result.run_id, result.status, result.metrics, result.policy_name

`plan.py` decides the run before anything trains, in one frozen RunPlan that new and resumed
(`--resume`) runs both get from `plan_run`: the method, run id, model spec, adapter, resolved
trainer settings, run options, output directory, start point and data snapshot. Settings come
from a preset, a config file and CLI layers (`presets.py`); the data is the store's export for
the method (or a parquet/JSONL file), snapshotted before anything trains: the run row holds the
ids and content hash, and the rows themselves are kept next to the checkpoints so `--resume`
continues on exactly the same data.

This module runs a plan: `_execute(plan, rows)` takes the rows, `_build_trainer` the model,
adapter, machine settings and TRL trainer (a `Built`: the mutable runtime side, never in the
plan), `_train` trains and saves. A finished policy run registers a new PolicyVersion (base +
adapter, parent, run); a reward run records the path of its model. `run.from_policy` starts
the run from a stored policy, which is then its reference and the new policy's parent
(`lineage.py`). Any failure once the run row exists marks the run failed (or aborted, for a NaN
or an interrupt) with the reason, and registers nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from alignment._compat import transformers as compat_transformers
from alignment.training import lineage, presets, runs
from alignment.training.common import (
    WEIGHT,
    NonFiniteGuard,
    NonFiniteLoss,
    Notes,
    TrainingError,
    device_settings,
    flatten_conversations,
    has_weights,
    is_conversational_dataset,
    restore_trainable_dtype,
)
from alignment.training.plan import (  # noqa: F401  (DATA_FILE ... read_data_file: this module's names before plan.py)
    DATA_FILE,
    RunOptions,
    RunPlan,
    TrainRequest,
    check_trainer_keys,
    get_method,
    last_complete_checkpoint,
    load_data,
    plan_run,
    read_data_file,
    resolve_settings,
    training_data,
)
from feedback_store.models import RunStatus

log = logging.getLogger("prefloop.train")

MANIFEST = "prefloop_run.json"


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


@dataclass
class Built:
    """What `_build_trainer` made for one run: runtime objects, mutable, never part of the plan."""

    trainer: Any
    config: Any  # the method's TrainingArguments, as the trainer got them
    eval_set: Any  # held-out rows for method.evaluate (None: the method has none)
    tokenizer: Any
    trainer_settings: dict  # the plan's trainer settings as the model and machine adjusted them


# --------------------------------------------------------------------------- the run


def run_training(request: TrainRequest, *, engine: Engine, progress: bool = True, callbacks=(),
                 build_only: bool = False) -> RunResult:
    """Train as `request` says and record it in the store. Raises TrainingError (one line) when the
    run cannot start or fails; the run row, if one was created, says why.

    build_only: stop once the trainer is built (the run row stays `running`) and return it in
    `RunResult.trainer`: for benchmarks and notebooks that drive the steps themselves. It applies
    to a new run on the main process (a `--resume` or another rank trains as usual)."""
    plan, rows = plan_run(request, engine=engine)
    return _execute(plan, rows, engine=engine, progress=progress, callbacks=callbacks,
                    build_only=build_only and plan.main and not plan.resumed)


def _execute(plan: RunPlan, rows, *, engine: Engine, progress: bool, callbacks,
             build_only: bool = False) -> RunResult:
    """Everything after the run row exists: `rows` (a new run's, from plan_run; None: read the
    snapshot) -> trainer -> training -> result. Any failure marks the run (on the main process),
    then propagates as TrainingError."""
    import torch

    from alignment.models.errors import ModelError

    method, run_id, spec, start, main = plan.method, plan.run_id, plan.model, plan.start, plan.main
    notes = Notes()

    def mark(reason: str, status: RunStatus = RunStatus.failed) -> None:
        if main:
            runs.fail_run(engine, run_id, reason, status=status)

    try:
        dataset = training_data(plan, rows)
        if has_weights(dataset):
            weights = dataset[WEIGHT]
            notes.add(f"weighted: each example's loss weighs its raters' weight (mean {sum(weights) / len(weights):.3g}, "
                      f"min {min(weights):.3g}, max {max(weights):.3g})")
        built = _build_trainer(plan, dataset, notes, engine=engine, progress=progress, callbacks=callbacks)
        if build_only:
            return RunResult(run_id, RunStatus.running.value, {}, None, None, notes.items, main, built.trainer)
        metrics, output_path, kind = _train(plan, built, engine=engine)
        policy_name = None
        if method.registers_policy:
            policy_name = plan.options.policy_name or f"{method.name}-{run_id}"
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
        # The plan's own notes (a resume without a checkpoint) come first, in the result only.
        return RunResult(run_id, RunStatus.done.value, metrics, output_path, policy_name,
                         [*plan.notes, *notes.items], main)
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


def _build_trainer(plan: RunPlan, dataset, notes: Notes, *, engine: Engine, progress: bool, callbacks) -> Built:
    """Model, adapter, machine settings and TRL trainer for one run. Works on copies of the
    plan's adapter and trainer settings: the plan stays as planned."""
    import dataclasses

    import torch
    from transformers import set_seed

    from alignment.models import apply_adapter, context_length, is_quantized, load_model
    from alignment.models.adapters import find_targets

    method, run_id, spec, start = plan.method, plan.run_id, plan.model, plan.start
    adapter = dataclasses.replace(plan.adapter)  # adjusted below to the model (targets, checkpointing)
    trainer_settings = dict(plan.trainer)
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
    flash = str(compat_transformers.attn_implementation(model) or "").startswith("flash")
    trainer_settings, device_notes = device_settings(trainer_settings, method=method.name,
                                                     cuda=torch.cuda.is_available(), flash_attention=flash)
    for note in device_notes:
        notes.add(note)
    trainer_settings.setdefault("report_to", "none")
    trainer_settings.setdefault("save_total_limit", 2)
    trainer_settings.setdefault("run_name", f"prefloop-{method.name}-{run_id}")
    trainer_settings["disable_tqdm"] = not progress
    try:
        config = method.config_class(output_dir=str(plan.output_dir), **trainer_settings)
    except (TypeError, ValueError) as error:
        raise TrainingError(f"trainer settings: {_first_line(error)}") from None
    if plan.main:
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
    return Built(trainer, config, eval_set, tokenizer, trainer_settings)


def _train(plan: RunPlan, built: Built, *, engine: Engine) -> tuple[dict, str, str]:
    """Train from the plan's checkpoint (None: from step 0), save the result: (metrics, its path, its kind)."""
    from alignment.models import is_quantized, save_adapter

    method, run_id, spec, start = plan.method, plan.run_id, plan.model, plan.start
    trainer, config, eval_set, tokenizer = built.trainer, built.config, built.eval_set, built.tokenizer
    result = trainer.train(resume_from_checkpoint=plan.checkpoint)

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
    target = plan.output_dir / ("reward_model" if method.head == "reward" else "adapter")
    kind = plan.adapter.method if plan.adapter.method != "full" else "model"
    if plan.main:
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
                    "max_length": built.trainer_settings.get("max_length"),
                    "weighted": WEIGHT in (getattr(trainer.train_dataset, "column_names", None) or ()),
                    "snapshot_hash": plan.snapshot_hash,
                    "chat_template": tokenizer.chat_template is not None}
        (target / MANIFEST).write_text(json.dumps(manifest, indent=2))
    trainer.accelerator.wait_for_everyone()
    return metrics, str(target), kind


def _plain_attention(model) -> None:
    """Back to stock SDPA before saving, so no saved config names prefloop's attention function."""
    from alignment.training.packing import PACKED_ATTENTION, unwrap_peft

    base = unwrap_peft(model)
    if compat_transformers.attn_implementation(base) == PACKED_ATTENTION:
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
