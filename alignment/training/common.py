"""What the four trainers share: the method description, the non-finite-loss guard, the
settings that make TRL behave on the machine at hand, and dataset helpers.

The traps handled here, so that a user never meets them:
- bf16 by default: TRL turns bf16 on unless fp16 is set; on a CPU without bf16 kernels that is
  an error or a slow emulation, so both are off on CPU unless asked for explicitly.
- paged optimizers (`paged_adamw_32bit`, the seed's) page through CUDA: torch's AdamW (fused) on
  CPU, logged.
- `padding_free` is only exact with FlashAttention kernels: off otherwise, logged.
- QLoRA: TRL casts trainable adapter weights to bf16 for a quantized model; on CPU in float32
  that breaks the matmuls, so they are cast back (`restore_trainable_dtype`).
- KTO's KL term compares completions within a batch: batch size >= 2 and sequential sampling.
- gradient checkpointing with PEFT needs `enable_input_require_grads` (TRL does it for a
  PeftModel; done here for the others).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

log = logging.getLogger("prefloop.train")


@dataclass
class PrefixSharing:
    """The packed path's config field (mixed into the ORPO, SimPO, GRPO and RLOO configs)."""

    prefix_sharing: bool = field(
        default=True,
        metadata={
            "help": "Pack each batch as one row, what its sequences share (a pair's or a group's prompt) encoded "
            "once, no padding, the LM head on the scored tokens only. Same loss, less compute. Models without "
            "SDPA/eager attention fall back to TRL's padded batches."
        },
    )

# Paging moves optimizer states through CUDA unified memory: without CUDA, torch's own AdamW
# (its fused kernel, one pass over all LoRA tensors instead of a loop of small ops).
CPU_OPTIMIZER = "adamw_torch_fused"
PAGED_OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "paged_adamw", "paged_lion_32bit", "paged_lion_8bit",
                    "paged_ademamix_32bit", "paged_ademamix_8bit")


class TrainingError(ValueError):
    """A run that cannot start or finish, with a one-line reason (the run row carries it too)."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: training stops instead of writing garbage weights."""

    def __init__(self, step: int, value: float, what: str = "loss") -> None:
        super().__init__(f"{what} became {value} at step {step}: training aborted (lower the learning rate, "
                         f"check the data, or resume from the last checkpoint)")
        self.step, self.value = step, value


class GuardedTraining:
    """Trainer mixin: every step's loss is checked, a NaN/inf stops the run at once."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        value = float(loss.detach().float().mean()) if torch.is_tensor(loss) else float(loss)
        if not math.isfinite(value):
            raise NonFiniteLoss(self.state.global_step + 1, value)
        return loss


class NonFiniteGuard(TrainerCallback):
    """A logged non-finite gradient norm (the loss is checked every step by GuardedTraining)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        value = (logs or {}).get("grad_norm")
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise NonFiniteLoss(state.global_step, value, what="gradient norm")


@dataclass(frozen=True)
class MethodSpec:
    """One training method: its config and trainer classes, what it reads and what it makes."""

    name: str
    config_class: type
    trainer_class: type
    export: str  # which feedback_store export feeds it
    head: str = "causal_lm"  # "causal_lm" or "reward" (sequence classification)
    registers_policy: bool = True
    required_columns: tuple[tuple[str, ...], ...] = ()  # any one of these column sets
    # (trainer settings, dataset) -> settings: method-specific defaults read off the data
    adjust: Callable[[dict, Any], dict] | None = None
    # (dataset, config, seed) -> (train, eval or None)
    split: Callable[[Any, Any, int], tuple[Any, Any]] | None = None
    # (trainer, eval dataset) -> final metrics
    evaluate: Callable[[Any, Any], dict] | None = None
    # (trainer settings, engine) -> settings, checked before the run row exists (PPO: --reward-run)
    resolve: Callable[[dict, Any], dict] | None = None


def device_settings(settings: dict, *, method: str, cuda: bool, flash_attention: bool = False) -> tuple[dict, list[str]]:
    """Trainer settings adjusted to the machine, and the notes to log about each change."""
    settings = dict(settings)
    notes = []
    if not cuda:
        for name in ("bf16", "fp16"):
            if settings.get(name) is None:
                settings[name] = False
        if settings.get("fp16"):
            raise TrainingError("fp16 mixed precision needs a GPU: remove trainer.fp16 on CPU")
        settings["use_cpu"] = True
        optim = str(settings.get("optim", "adamw_torch"))
        if optim in PAGED_OPTIMIZERS:
            settings["optim"] = CPU_OPTIMIZER
            notes.append(f"optimizer {optim} pages memory through CUDA: using {CPU_OPTIMIZER} on CPU")
        settings.setdefault("dataloader_pin_memory", False)
    else:
        if settings.get("bf16") is None and settings.get("fp16") is None:
            settings["bf16"] = torch.cuda.is_bf16_supported()
    if settings.get("padding_free") and not flash_attention:
        settings["padding_free"] = False
        notes.append("padding_free needs FlashAttention (sequences would attend across each other): turned off")
    if method == "kto":
        batch = int(settings.get("per_device_train_batch_size", 8))
        if batch < 2:
            settings["per_device_train_batch_size"] = 2
            notes.append("KTO estimates its KL term from the other completions of a batch: batch size raised to 2")
        if settings.get("train_sampling_strategy", "sequential") != "sequential" and settings.get(
            "loss_type", "kto"
        ) == "kto":
            notes.append(f"KTO pairs each example with its batch neighbours for the KL term: "
                         f"train_sampling_strategy {settings['train_sampling_strategy']} -> sequential")
            settings["train_sampling_strategy"] = "sequential"
    return settings, notes


def restore_trainable_dtype(model, dtype: torch.dtype = torch.float32) -> int:
    """Undo TRL's bf16 cast of trainable adapter weights when not training in bf16 (QLoRA on
    CPU): a bf16 LoRA weight against float32 activations fails or silently loses updates."""
    changed = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype and param.is_floating_point():
            param.data = param.data.to(dtype)
            changed += 1
    return changed


def is_conversational_dataset(dataset) -> bool:
    from trl.data_utils import is_conversational

    return len(dataset) > 0 and is_conversational(dataset[0])


def flatten_conversations(dataset):
    """For a tokenizer without a chat template (an encoder reward model): chats as plain text,
    the prompt as "role: content" lines and each completion after it."""
    chat_columns = [c for c in ("prompt", "chosen", "rejected", "completion", "messages") if c in dataset.column_names]

    def render(messages) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages)

    def convert(example):
        return {column: render(example[column]) for column in chat_columns}

    return dataset.map(convert, desc="Rendering chats as text")


@dataclass
class Notes:
    """Decisions taken for the user, logged and kept in the run's config."""

    items: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.items.append(text)
        log.info(text)


# --------------------------------------------------------------------------- per-example weights
# A weighted export (`--weighted`) carries a `weight` column: each example's loss weight, mean 1
# (feedback_store.export.example_weights). Without it every trainer runs exactly as TRL does.
WEIGHT = "weight"


def has_weights(dataset) -> bool:
    return dataset is not None and WEIGHT in (getattr(dataset, "column_names", None) or ())


def check_weights(dataset, where: str = "the data") -> None:
    """Refuse weights that would train on nothing or on garbage, before any training step: a
    negative or non-finite weight, or every weight 0 (a loss of 0 that looks like success)."""
    if not has_weights(dataset) or len(dataset) == 0:
        return
    values = torch.tensor([float("nan") if v is None else float(v) for v in dataset[WEIGHT]], dtype=torch.float64)
    bad = (~torch.isfinite(values)) | (values < 0)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise TrainingError(f"{where}: example {row} has weight {values[row].item()} (weights must be finite and "
                            f">= 0)")
    if not values.sum() > 0:
        raise TrainingError(f"{where}: every one of the {len(values)} examples has weight 0, so the weighted loss "
                            f"would train on nothing (the raters who agree with the labels all weigh 0: set "
                            f"weights with `prefloop raters weight NAME W`, or train without --weighted)")


def weighted_training(args, dataset) -> bool:
    """Whether `dataset` carries per-example weights; if so, the Trainer must hand the column to
    the collator (it drops columns the model's signature does not name unless told not to)."""
    if not has_weights(dataset):
        return False
    if args is not None:
        args.remove_unused_columns = False
    return True


@dataclass
class WeightedCollator:
    """Any collator, plus the examples' weights as `batch["weight"]` (float32, one per example)."""

    inner: Any

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        if examples and WEIGHT in examples[0]:  # held-out rows scored outside training may have none
            batch[WEIGHT] = torch.tensor([float(e[WEIGHT]) for e in examples], dtype=torch.float32)
        return batch


def example_rows(inputs: dict, i: int, n: int, *, whole: tuple[str, ...] = ()) -> dict:
    """Example i of a collated batch of n: rows i and n + i of the [chosen..., rejected...] tensors,
    row i of the per-example ones; the keys in `whole` (a KTO batch's KL completions, shared by
    every example's loss) and anything else stay as they are."""
    out = {}
    for key, value in inputs.items():
        if key in whole or not torch.is_tensor(value) or value.dim() == 0:
            out[key] = value
        elif value.size(0) == 2 * n:
            out[key] = value[[i, n + i]]
        elif value.size(0) == n:
            out[key] = value[i : i + 1]
        else:
            out[key] = value
    return out


def weighted_mean(loss_of: Callable[[int], torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * loss_i / n, with loss_i = loss_of(i) the trainer's own loss on example i alone:
    the per-example weights applied before the batch mean, as the unweighted loss is that mean."""
    n = weights.numel()
    total = None
    for i in range(n):
        loss = loss_of(i)
        term = weights[i].to(loss.device, loss.dtype) * loss
        total = term if total is None else total + term
    return total / n
