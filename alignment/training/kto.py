"""KTO from unpaired signals: TRL's `KTOTrainer` on the thumbs-up/down ratings and on pairs
split into a desirable winner and an undesirable loser (`export_kto`).

The KTO paper balances the two classes with weights such that
`desirable_weight * n_desirable / (undesirable_weight * n_undesirable)` lies in [1, 4/3];
prefloop sets them from the class counts of the exported data unless they are given.

TRL's loss code (every loss_type, the class weights, the KL estimate, its metrics) runs
unchanged; what changes is how the per-token log-probs it consumes are computed. TRL pads the
completions and the mismatched KL completions of a batch to their longest, encodes each copy of
the shared chat preamble, and runs four forwards (policy, policy on the KL completions, and the
reference on both). prefloop packs each of them as one row without padding, the batch's common
prefix once (`packing.pack_sequences`), and runs the two reference forwards as one (adapter off,
no model copy). Models the packed layout cannot serve, a separate reference model, MoE aux
losses, and any TRL or transformers `alignment._compat` was not tested with (or
`PREFLOOP_COMPAT=public`) get TRL's KTOTrainer as is.

Weighted data (a `weight` column: `--weighted`, see feedback_store.export.example_weights):
TRL's KTO loss is a mean of per-completion terms (each scaled by its class weight) around a KL
estimate that is a constant of the batch (detached). Each completion's term is TRL's loss code
run on that completion alone with the batch's KL completions beside it (so the same KL
estimate), and the batch loss is `sum_i w_i * loss_i / n`. Without the column, TRL's loss as is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import KTOConfig as TRLKTOConfig
from trl import KTOTrainer as TRLKTOTrainer

from alignment._compat import trl as compat_trl
from alignment.training import packing
from alignment.training.common import (
    WEIGHT,
    GuardedTraining,
    MethodSpec,
    TrainingError,
    WeightedCollator,
    example_rows,
    weighted_mean,
    weighted_training,
)


@dataclass
class KTOConfig(TRLKTOConfig):
    """TRL's KTOConfig, plus the class-ratio weighting."""

    prefix_sharing: bool = field(
        default=True,
        metadata={
            "help": "Pack each batch's completions (and KL completions) as one row without padding, the batch's "
            "common prefix encoded once; the two reference forwards run as one. Same loss, less compute. Models "
            "without SDPA/eager attention fall back to TRL's padded batches."
        },
    )
    auto_class_weights: bool = field(
        default=True,
        metadata={
            "help": "Set desirable_weight / undesirable_weight from the class counts (the rarer class is "
            "up-weighted so both contribute equally), unless either weight is set to something other than 1."
        },
    )


class KTOTrainer(GuardedTraining, TRLKTOTrainer):
    """TRL's KTOTrainer, stopping on a non-finite loss. Built as `PackedKTOTrainer` (packed rows,
    which hooks into TRL's private loss method) when `alignment._compat` says this TRL is one it
    was tested with; otherwise TRL's KTOTrainer as is."""

    def __new__(cls, *args, **kwargs):
        if cls is KTOTrainer and compat_trl.fast_path_enabled("kto"):
            cls = PackedKTOTrainer
        return super().__new__(cls)

    def __init__(self, model, *, args: KTOConfig | None = None, **kwargs):
        weighted = weighted_training(args, kwargs.get("train_dataset"))
        super().__init__(model, args=args, **kwargs)
        if weighted:
            self.data_collator = WeightedCollator(self.data_collator)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = inputs.pop(WEIGHT, None)
        if weights is None or return_outputs:  # evaluation reports the plain loss
            return self.batch_loss(model, inputs, return_outputs)
        return self.weighted_loss(model, inputs, weights)

    def batch_loss(self, model, inputs, return_outputs=False):
        """TRL's KTO loss on the batch, as TRL computes it."""
        return super().compute_loss(model, inputs, return_outputs)

    def weighted_loss(self, model, inputs, weights):
        """sum_i w_i * loss_i / n, loss_i TRL's loss on completion i with all the batch's KL completions."""
        n = weights.numel()
        shared = kl_keys(inputs)
        return weighted_mean(lambda i: self.batch_loss(model, example_rows(inputs, i, n, whole=shared)), weights)


def kl_keys(inputs: dict) -> tuple[str, ...]:
    """The batch's KL completions (and their reference log-probs): one KL estimate for every example."""
    return tuple(key for key in inputs if key.startswith(("KL_", "ref_KL")))


def _labelled(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor):
    """The real tokens of each row and the (t-1 -> t) completion targets TRL's shifted loss reads."""
    sequences, targets = [], []
    for ids, mask, completion in zip(input_ids, attention_mask, completion_mask):
        keep = mask.bool()
        tokens, scored = ids[keep].tolist(), completion[keep].tolist()
        sequences.append(tokens)
        targets.append([t for t in range(1, len(tokens)) if scored[t]])
    return sequences, targets


def pack_scored(sequences: list[list[int]], targets: list[list[int]], share_prefix: bool = True) -> dict:
    """`packing.pack_sequences`, plus for every scored token t of sequence b: the packed index of
    the state predicting it (`src`), the token (`tgt`), the sequence (`seq`) and TRL's shifted
    position (`pos` = t - 1)."""
    packed, index = packing.pack_sequences(sequences, share_prefix=share_prefix)
    src, tgt, seq, pos = [], [], [], []
    for b, (own, tokens, scored) in enumerate(zip(index, sequences, targets)):
        for t in scored:
            src.append(own[t - 1])
            tgt.append(tokens[t])
            seq.append(b)
            pos.append(t - 1)
    for name, values in (("src", src), ("tgt", tgt), ("seq", seq), ("pos", pos)):
        packed[name] = torch.tensor(values, dtype=torch.long)
    packed["n"] = len(sequences)
    return packed


@dataclass
class PackedKTOCollator:
    """TRL's unpaired-preference collator (its tensors feed TRL's loss code) plus packed rows:
    the completions, the KL completions, and both together for the reference pass."""

    inner: Any
    share_prefix: bool = True

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        main = _labelled(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        packed = {"main": pack_scored(*main, self.share_prefix)}
        sequences, targets = list(main[0]), list(main[1])
        if "KL_input_ids" in batch:
            kl = _labelled(batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
            packed["kl"] = pack_scored(*kl, self.share_prefix)
            sequences += kl[0]
            targets += kl[1]
        if "ref_logps" not in batch:
            packed["ref"] = pack_scored(sequences, targets, self.share_prefix)
        batch["prefloop_packed"] = packed
        return batch


class PackedKTOTrainer(KTOTrainer):
    """TRL's KTOTrainer computing its log-probs from packed, prefix-shared rows."""

    def __init__(self, model, *, args: KTOConfig | None = None, **kwargs):
        self._packed = False
        super().__init__(model, args=args, **kwargs)
        if (getattr(self.args, "prefix_sharing", False) and self.ref_model is None and not self.aux_loss_enabled
                and packing.enable_for_causal_lm(self.accelerator.unwrap_model(self.model))):
            self.data_collator = PackedKTOCollator(self.data_collator)
            self._packed = True

    def _packed_forward(self, model, packed: dict, outputs: tuple[str, ...]) -> dict:
        device = self.accelerator.device
        return model(**packing.packed_model_kwargs(packed, device), prefloop_head="logprobs",
                     prefloop_index=packed["src"].to(device), prefloop_targets=packed["tgt"].to(device),
                     prefloop_outputs=outputs)

    def _reference_logps(self, packed: dict, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sequence reference log-probs of the completions and of the KL completions, from one
        packed forward with the adapter off."""
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        unwrapped = self.accelerator.unwrap_model(self.model)
        adapter = (use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
                   if hasattr(unwrapped, "peft_config") else contextlib.nullcontext())
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapter:
            log_probs = self._packed_forward(self.model, packed, outputs=())["log_probs"]
        sums = log_probs.new_zeros(packed["n"]).index_add(0, packed["seq"].to(log_probs.device), log_probs)
        return sums[:n], (sums[n:] if packed["n"] > n else None)

    def batch_loss(self, model, inputs, return_outputs=False):
        packed = inputs.pop("prefloop_packed", None)
        if packed is None or return_outputs:
            return super().batch_loss(model, inputs, return_outputs)
        policy = self._packed_policy(model, packed, inputs)
        return self._trl_loss(lambda: compat_trl.kto_loss(self, policy, inputs, return_outputs))

    def weighted_loss(self, model, inputs, weights):
        """One packed forward for the batch (and one for its KL completions), then TRL's loss on each
        completion's row of it."""
        packed = inputs.pop("prefloop_packed", None)
        if packed is None:
            return super().weighted_loss(model, inputs, weights)
        policy = self._packed_policy(model, packed, inputs)
        n, shared = weights.numel(), kl_keys(inputs)
        return self._trl_loss(lambda: weighted_mean(
            lambda i: compat_trl.kto_loss(self, policy.rows([i]), example_rows(inputs, i, n, whole=shared), False),
            weights))

    def _packed_policy(self, model, packed: dict, inputs: dict) -> _PackedPolicy:
        if "ref_logps" not in inputs:
            n = inputs["input_ids"].size(0)
            inputs["ref_logps"], ref_kl = self._reference_logps(packed["ref"], n)
            if ref_kl is not None:
                inputs["ref_KL_logps"] = ref_kl
        return _PackedPolicy(self, model, packed, inputs)

    def _trl_loss(self, compute):
        precompute, self.precompute_ref_logps = self.precompute_ref_logps, True  # TRL reads them from the batch
        try:
            return compute()
        finally:
            self.precompute_ref_logps = precompute


class _PackedPolicy:
    """Stands in for the model inside TRL's loss code: TRL's fused-head output, packed computation."""

    def __init__(self, trainer: PackedKTOTrainer, model, packed: dict, inputs: dict):
        self.trainer, self.model, self.packed = trainer, model, packed
        self.kl_input_ids = inputs.get("KL_input_ids")
        self.shape = (inputs["input_ids"].size(0), inputs["input_ids"].size(1) - 1)
        self.grids: dict[str, dict] = {}
        self.index: list[int] | None = None  # set on the stand-in of some rows (`rows`)

    def rows(self, index: list[int]) -> _PackedPolicy:
        """A stand-in for the model on some completions of the batch (their KL completions: all of them)."""
        view = _PackedPolicy.__new__(_PackedPolicy)
        view.__dict__.update(self.__dict__)  # the grids are shared: the forwards run once
        view.index = index
        return view

    def grid(self, name: str, shape: tuple[int, int]) -> dict:
        if name not in self.grids:
            packed = self.packed[name]
            outputs = () if name == "kl" else ("entropy", "mean_logits")
            per_token = self.trainer._packed_forward(self.model, packed, outputs)
            device = per_token["log_probs"].device
            seq, pos = packed["seq"].to(device), packed["pos"].to(device)
            self.grids[name] = {k: packing.scatter_to_rows(v, seq, pos, shape) for k, v in per_token.items()}
        return self.grids[name]

    def __call__(self, **trl_kwargs):
        from trl.trainer.utils import FusedCausalLMOutput

        if not trl_kwargs.get("fused_lm_head"):
            return self.model(**trl_kwargs)
        ids = trl_kwargs["input_ids"]
        is_kl = self.kl_input_ids is not None and (ids is self.kl_input_ids or (
            ids.shape == self.kl_input_ids.shape and torch.equal(ids, self.kl_input_ids.to(ids.device))
            and not torch.is_grad_enabled()))
        if is_kl:
            return FusedCausalLMOutput(**self.grid("kl", (ids.size(0), ids.size(1) - 1)))
        grid = self.grid("main", self.shape)
        if self.index is not None:
            grid = {k: None if v is None else v[self.index] for k, v in grid.items()}
        return FusedCausalLMOutput(**grid)


def class_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight): the rarer class weighted up to balance, the lower
    end of the paper's recommended range."""
    if n_desirable == 0 or n_undesirable == 0:
        return 1.0, 1.0
    if n_desirable >= n_undesirable:
        return 1.0, round(n_desirable / n_undesirable, 4)
    return round(n_undesirable / n_desirable, 4), 1.0


def adjust(settings: dict, dataset) -> dict:
    labels = [bool(x) for x in dataset["label"]]
    n_desirable = sum(labels)
    n_undesirable = len(labels) - n_desirable
    if n_desirable == 0 and n_undesirable == 0:
        raise TrainingError("the KTO data has no labelled completion")
    settings = dict(settings)
    explicit = any(float(settings.get(k, 1.0)) != 1.0 for k in ("desirable_weight", "undesirable_weight"))
    if settings.get("auto_class_weights", True) and not explicit:
        settings["desirable_weight"], settings["undesirable_weight"] = class_weights(n_desirable, n_undesirable)
    return settings


METHOD = MethodSpec(
    name="kto",
    config_class=KTOConfig,
    trainer_class=KTOTrainer,
    export="kto",
    required_columns=(("prompt", "completion", "label"),),
    adjust=adjust,
)
