"""transformers (and PEFT) internals prefloop relies on.

Written and tested for transformers 5.24 and PEFT 0.21 (`TESTED`). What is relied on:

- "packing" (`alignment/training/packing.py`): `config._attn_implementation` and
  `PreTrainedModel._can_set_attn_implementation()` to decide whether a model's attention goes
  through `AttentionInterface`, and the model's `forward` replaced on the instance to add the
  packed heads (`prefloop_head=...`). Off: the pairwise trainers use TRL's padded batches.
- "checkpoints" (`alignment/training/ppo.py`): `Trainer._save_checkpoint`,
  `Trainer._load_from_checkpoint` and `Trainer._load_optimizer_and_scheduler`, which handle
  every launcher, checkpoint rotation and the best-model bookkeeping. Off: PPO writes and reads
  the same checkpoint layout (`checkpoint-N/` with the adapter, `optimizer.pt`, `scheduler.pt`,
  `trainer_state.json`) through public calls (`save_model`, `state_dict`, PEFT's
  `load_adapter`, `TrainerState.save_to_json`, `trainer_utils.rotate_checkpoints`).
- "decoding" (`alignment/decoding.py`): the layout of Llama-family decoder layers (`self_attn`
  projections, rotary embedding, norms, MLP) that prefloop's static-cache loop runs step by step,
  and the attention implementation in `config._attn_implementation`. Off: `generate`.
"""

from __future__ import annotations

import types

from packaging.specifiers import SpecifierSet

from alignment import _compat

TESTED = {"transformers": SpecifierSet(">=5.24,<5.25"), "peft": SpecifierSet(">=0.21,<0.22")}
FEATURES = ("packing", "checkpoints", "decoding")


def fast_path_enabled(feature: str) -> bool:
    if feature not in FEATURES:
        raise ValueError(f"unknown transformers fast path {feature!r} (known: {', '.join(FEATURES)})")
    return _compat.check(f"transformers:{feature}", TESTED)


# -- packing ------------------------------------------------------------------------------------
def attn_implementation(model) -> str | None:
    """The attention implementation a model's config selects ("sdpa", "eager", ...)."""
    return getattr(model.config, "_attn_implementation", None)


def can_set_attn_implementation(model) -> bool:
    method = getattr(model, "_can_set_attn_implementation", None)
    return bool(method()) if callable(method) else False


def replace_forward(model, forward) -> None:
    """`model.forward` becomes `forward` (a function of (self, ...)) on this instance only."""
    model.forward = types.MethodType(forward, model)


# -- checkpoints (PPO) ---------------------------------------------------------------------------
def save_checkpoint(trainer) -> None:
    """`checkpoint-<step>` in the output folder: model, optimizer, scheduler, RNG, state; rotated."""
    trainer._save_checkpoint(trainer.model, trial=None)


def load_checkpoint(trainer, checkpoint: str) -> None:
    """The model weights (the adapter), optimizer and scheduler of a `checkpoint-<step>` folder."""
    trainer._load_from_checkpoint(checkpoint)
    trainer._load_optimizer_and_scheduler(checkpoint)
