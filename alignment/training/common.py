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
