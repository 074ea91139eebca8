"""DPO on stored preference pairs: TRL's `DPOTrainer`, with prefix-shared packed batches.

TRL's loss code (every `loss_type`, `beta`, `label_smoothing`, `ld_alpha`, WPO weighting, its
metrics) runs unchanged; what changes is how the per-token log-probs it consumes are computed:

- one row per pair, the prompt encoded once, padding only to the longest pair (`packing.py`);
- the LM head only on the completion tokens (TRL on CPU projects every position);
- the reference log-probs from the same packed forward with the adapter disabled (no model
  copy), computed once per pair and cached for later epochs, or all up front when
  `precompute_ref_log_probs` is set (always for full fine-tuning: no second model in memory).

Models the packed layout cannot serve (flash-attention kernels, encoder-decoders, MoE aux
losses, vision models) go through TRL's own path, and so does everything on a TRL or
transformers that `alignment._compat` was not tested with (or with `PREFLOOP_COMPAT=public`):
the packed trainer hooks into TRL's private methods, the plain one uses public arguments only.

Weighted data (a `weight` column: `--weighted`, see feedback_store.export.example_weights):
every loss type TRL computes per pair is weighted per pair before the batch mean,
`sum_i w_i * loss_i / n`, where loss_i is TRL's own loss code run on pair i alone (one forward
for the batch on the packed path, one per pair on TRL's path). The losses TRL computes over the
batch as a whole (`BATCH_LOSSES`: aot and aot_unpaired sort the batch's log-ratios, sft averages
over the batch's tokens) have no per-pair term to weight: their batch loss is scaled by the
batch's mean weight. Without the column, the loss is TRL's, untouched.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import DPOConfig as TRLDPOConfig
from trl import DPOTrainer as TRLDPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

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

log = logging.getLogger("prefloop.train")

# DPO losses TRL computes over the whole batch rather than per pair: a weighted batch scales them by its mean weight.
BATCH_LOSSES = frozenset({"aot", "aot_unpaired", "sft"})


@dataclass
class DPOConfig(TRLDPOConfig):
    """TRL's DPOConfig, plus prefloop's batching choice."""

    prefix_sharing: bool = field(
        default=True,
        metadata={
            "help": "Pack each pair as one row [prompt | chosen | rejected] with a prefix-sharing attention mask: "
            "the prompt is encoded once and rows pad only to the longest pair. Same loss, less compute. Models "
            "without SDPA/eager attention fall back to TRL's two-row batches."
        },
    )


@dataclass
class PackedPreferenceCollator:
    """TRL's preference collator (its tensors feed TRL's loss code) plus the packed rows."""

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = DataCollatorForPreference(
            pad_token_id=self.pad_token_id, max_length=self.max_length, truncation_mode=self.truncation_mode
        )(examples)
        pieces = [
            packing.truncate_pair(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"], self.max_length)
            for e in examples
        ]
        packed, layout = packing.pack_pairs(*zip(*pieces))
        src, tgt, seq, pos = packing.completion_token_index(layout, packed["input_ids"])
        packed.update(src=src, tgt=tgt, seq=seq, pos=pos)
        packed["keys"] = [packing.pair_key(*piece) for piece in pieces]
        batch["prefloop_packed"] = packed
        return batch


class DPOTrainer(GuardedTraining, TRLDPOTrainer):
    """TRL's DPOTrainer. Built as `PackedDPOTrainer` (prefix-shared packed rows, which hooks into
    TRL's private methods) when `alignment._compat` says this TRL is one it was tested with;
    otherwise TRL's own two-row batches, driven through public arguments only."""

    def __new__(cls, *args, **kwargs):
        if cls is DPOTrainer and compat_trl.fast_path_enabled("dpo"):
            cls = PackedDPOTrainer
        return super().__new__(cls)

    def __init__(self, model, *, args: DPOConfig | None = None, **kwargs):
        if not isinstance(self, PackedDPOTrainer):
            length_grouping_off(args)
        weighted = weighted_training(args, kwargs.get("train_dataset"))
        super().__init__(model, args=args, **kwargs)
        if weighted:
            self.data_collator = WeightedCollator(self.data_collator)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = inputs.pop(WEIGHT, None)
        if weights is None or return_outputs:  # evaluation reports the plain loss
            return self.batch_loss(model, inputs, return_outputs)
        if BATCH_LOSSES & set(loss_type_list(self.args.loss_type)):
            loss = self.batch_loss(model, inputs)
            return loss * weights.to(loss.device, loss.dtype).mean()
        return self.weighted_loss(model, inputs, weights)

    def batch_loss(self, model, inputs, return_outputs=False):
        """TRL's DPO loss on the batch, as TRL computes it."""
        return super().compute_loss(model, inputs, return_outputs)

    def weighted_loss(self, model, inputs, weights):
        """sum_i w_i * loss_i / n, loss_i TRL's loss on pair i alone (its own forward here)."""
        n = weights.numel()
        return weighted_mean(lambda i: self.batch_loss(model, example_rows(inputs, i, n)), weights)


def loss_type_list(loss_type) -> list[str]:
    if isinstance(loss_type, str):
        return [name.strip() for name in loss_type.split(",")]
    return list(loss_type or ["sigmoid"])


def length_grouping_off(args) -> None:
    """TRL's tokenized pair rows carry no `input_ids` to measure, and only the fast path adds a
    `length` column: on the public path, batches are drawn at random instead (same loss, more
    padding)."""
    if args is not None and getattr(args, "train_sampling_strategy", None) == "group_by_length":
        args.train_sampling_strategy = "random"
        log.warning("group_by_length needs prefloop's pair lengths (a fast path that is off here): "
                    "sampling batches at random")


class PackedDPOTrainer(compat_trl.DPOHooks, DPOTrainer):
    """TRL's DPOTrainer computing its log-probs from prefix-shared packed rows."""

    def __init__(self, model, *, args: DPOConfig | None = None, **kwargs):
        self._ref_cache: dict[str, tuple[float, float]] = {}
        self._packed = False
        if (
            args is not None
            and getattr(args, "prefix_sharing", False)
            and args.ld_alpha is None  # LD-DPO re-weights tokens in TRL's layout: keep TRL's path
            and not isinstance(model, str)
            and packing.supports_packing(packing.unwrap_peft(model))
            and kwargs.get("data_collator") is None
        ):
            tokenizer = kwargs.get("processing_class")
            tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
            if tokenizer is not None and tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            if tokenizer is not None and packing.use_packed_attention(packing.unwrap_peft(model)):
                kwargs["data_collator"] = PackedPreferenceCollator(
                    tokenizer.pad_token_id, args.max_length, args.truncation_mode
                )
                self._packed = True
        super().__init__(model, args=args, **kwargs)
        if self._packed:
            packing.add_packed_heads(packing.unwrap_peft(self.accelerator.unwrap_model(self.model)))
            if self.ref_model is not None:
                self._pack_reference_model()
            # TRL reads the reference log-probs from the batch; this trainer puts them there.
            self.precompute_ref_logps = True

    def _pack_reference_model(self) -> None:
        """A separate reference model must read the packed rows the same way as the policy."""
        reference = packing.unwrap_peft(self.accelerator.unwrap_model(self.ref_model))
        if not packing.use_packed_attention(reference):
            raise ValueError(f"the reference model ({type(reference).__name__}) cannot use packed attention: "
                             "set prefix_sharing=False")
        packing.add_packed_heads(reference)

    # -- data (called from TRL's dataset preparation, see alignment._compat.trl) -----------------
    def measure_pairs(self, dataset, dataset_name: str):
        if "length" not in dataset.column_names:
            # what group_by_length sorts on (TRL's DPO rows have no input_ids to measure): the
            # packed row's length, i.e. the compute of the pair
            dataset = dataset.map(
                lambda e: {"length": len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])},
                desc=f"Measuring {dataset_name} pairs",
            )
        return dataset

    # -- reference log-probs -----------------------------------------------------------------
    def precompute_reference(self, dataset, name: str, batch_size: int):
        """The dataset with its reference log-probs from packed rows (None: TRL computes them)."""
        if not self._packed:
            return None
        from tqdm.auto import tqdm

        packing.add_packed_heads(packing.unwrap_peft(self.accelerator.unwrap_model(self.model)))
        chosen, rejected = [], []
        # No gradient and no backward to keep: a larger batch than training is free.
        step = max(batch_size, 1) * 4
        for start in tqdm(range(0, len(dataset), step), desc=f"Reference log-probs ({name})",
                          disable=self.args.disable_tqdm):
            batch = self.data_collator([dataset[i] for i in range(start, min(start + step, len(dataset)))])
            ref_c, ref_r = self._reference_pass(batch["prefloop_packed"])
            chosen += ref_c.tolist()
            rejected += ref_r.tolist()
        for column in ("ref_chosen_logps", "ref_rejected_logps"):
            if column in dataset.column_names:
                dataset = dataset.remove_columns(column)
        return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)

    def _reference_pass(self, packed: dict) -> tuple[torch.Tensor, torch.Tensor]:
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        model = self.ref_model if self.ref_model is not None else self.model
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.ref_model is None and hasattr(unwrapped, "peft_config"):
            # the reference is the base: the new adapter off (or TRL's frozen "ref" copy of a loaded one)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        else:
            adapter = contextlib.nullcontext()
        if self.ref_model is not None and not getattr(packing.unwrap_peft(self.ref_model), "_prefloop_packed_heads",
                                                      False):
            self._pack_reference_model()  # precompute runs inside TRL's __init__, before ours finishes
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapter:
            out = self._packed_forward(model, packed, outputs=())
        return self._sum_per_sequence(out["log_probs"], packed)

    def _reference_logps(self, packed: dict) -> tuple[torch.Tensor, torch.Tensor]:
        keys = packed["keys"]
        if any(key not in self._ref_cache for key in keys):
            ref_c, ref_r = self._reference_pass(packed)
            for key, c, r in zip(keys, ref_c.tolist(), ref_r.tolist()):
                self._ref_cache[key] = (c, r)
        device = self.accelerator.device
        values = torch.tensor([self._ref_cache[key] for key in keys], device=device, dtype=torch.float32)
        return values[:, 0], values[:, 1]

    # -- the packed forward -----------------------------------------------------------------
    def _packed_forward(self, model, packed: dict, outputs: tuple[str, ...]) -> dict:
        device = self.accelerator.device
        return model(
            **packing.packed_model_kwargs(packed, device),
            prefloop_head="logprobs",
            prefloop_index=packed["src"].to(device),
            prefloop_targets=packed["tgt"].to(device),
            prefloop_outputs=outputs,
        )

    def _sum_per_sequence(self, log_probs: torch.Tensor, packed: dict) -> tuple[torch.Tensor, torch.Tensor]:
        n = packed["segments"]["gather"].size(0)
        sums = log_probs.new_zeros(2 * n).index_add(0, packed["seq"].to(log_probs.device), log_probs)
        return sums[:n], sums[n:]

    def batch_loss(self, model, inputs, return_outputs=False):
        packed = inputs.pop("prefloop_packed", None)
        if packed is None:
            return super().batch_loss(model, inputs, return_outputs)
        policy = self._packed_policy(model, packed, inputs)
        return compat_trl.dpo_loss(self, policy, inputs, return_outputs)

    def weighted_loss(self, model, inputs, weights):
        """One packed forward for the batch, then TRL's loss on each pair's rows of it."""
        packed = inputs.pop("prefloop_packed", None)
        if packed is None:
            return super().weighted_loss(model, inputs, weights)
        policy = self._packed_policy(model, packed, inputs)
        n = weights.numel()
        return weighted_mean(
            lambda i: compat_trl.dpo_loss(self, policy.rows([i, n + i]), example_rows(inputs, i, n), False), weights)

    def _packed_policy(self, model, packed: dict, inputs: dict) -> _PackedPolicy:
        if "ref_chosen_logps" not in inputs:
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = self._reference_logps(packed)
        outputs = ("entropy", "mean_logits", "is_top1") + (("log_sum_sq_probs",) if self.use_weighting else ())
        return _PackedPolicy(self, model, packed, outputs, rows=inputs["input_ids"].shape)


class _PackedPolicy:
    """Stands in for the model inside TRL's loss code: same output, packed computation."""

    def __init__(self, trainer: PackedDPOTrainer, model, packed: dict, outputs: tuple[str, ...], rows: torch.Size):
        self.trainer, self.model, self.packed, self.outputs = trainer, model, packed, outputs
        self.shape = (rows[0], rows[1] - 1)  # TRL's shifted layout: position t predicts token t + 1
        self._grid: dict | None = None

    def grid(self) -> dict:
        """The packed forward's per-token outputs on TRL's [sequences, positions] grid (computed once)."""
        if self._grid is None:
            per_token = self.trainer._packed_forward(self.model, self.packed, self.outputs)
            device = per_token["log_probs"].device
            seq, pos = self.packed["seq"].to(device), self.packed["pos"].to(device)
            self._grid = {name: packing.scatter_to_rows(value, seq, pos, self.shape) for name, value in per_token.items()}
        return self._grid

    def __call__(self, **_trl_kwargs):
        from trl.trainer.utils import FusedCausalLMOutput

        if "fused_lm_head" not in _trl_kwargs:  # return_outputs=True asks for real logits
            return self.model(**{k: v for k, v in _trl_kwargs.items() if k not in ("labels", "fused_lm_head")})
        return FusedCausalLMOutput(**self.grid())

    def rows(self, index: list[int]):
        """A stand-in for the model on some rows of the batch (one pair: [chosen row, rejected row])."""
        from trl.trainer.utils import FusedCausalLMOutput

        def call(**_trl_kwargs):
            return FusedCausalLMOutput(**{k: None if v is None else v[index] for k, v in self.grid().items()})

        return call


def resolve(settings: dict, engine) -> dict:
    """Settings TRL would refuse with a traceback once the run has started, refused here in one
    line before the run row exists (MethodSpec.resolve)."""
    loss_types = loss_type_list(settings.get("loss_type") or "sigmoid")
    smoothing = settings.get("label_smoothing") or 0.0
    if "exo_pair" in loss_types and not float(smoothing) > 0.0:
        raise TrainingError(f"--loss-type exo_pair needs --label-smoothing > 0 (got {smoothing}; the EXO paper "
                            f"suggests 1e-3)")
    return settings


METHOD = MethodSpec(
    name="dpo",
    config_class=DPOConfig,
    trainer_class=DPOTrainer,
    export="dpo",
    required_columns=(("prompt", "chosen", "rejected"), ("chosen", "rejected")),
    resolve=resolve,
)
