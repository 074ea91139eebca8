"""Supervised fine-tuning (the seed's practical example): TRL's `SFTTrainer` on the winners
and human edits exported from the store (`export_sft`), or on any parquet/JSONL file in one
of TRL's formats (`text`, `messages`, or `prompt`/`completion`).

TRL's tokenization, labels (`completion_only_loss`, `assistant_only_loss`) and loss (`nll`,
`dft`) are kept; what changes is the batch layout. TRL pads every sequence of a batch to the
longest one and encodes each sequence's copy of the shared chat preamble (SmolLM2's template
puts the same system prompt in front of every conversation; the store's winners and edits of
one prompt share the whole question). prefloop packs the batch as ONE row without padding,
the batch's common prefix once (`packing.pack_sequences`), with a per-segment attention mask,
so every hidden state is the one TRL computes; the LM head runs on the labelled positions only,
as in TRL. Same loss, fewer FLOPs.

Models the packed layout cannot serve (see `packing.supports_packing`), TRL's own packing or
`padding_free`, a custom `compute_loss_func`, label smoothing and MoE aux losses go through
TRL's path, and so does everything on a TRL or transformers that `alignment._compat` was not
tested with (or with `PREFLOOP_COMPAT=public`): TRL's SFTTrainer as is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer as TRLSFTTrainer

from alignment._compat import trl as compat_trl
from alignment.training import packing
from alignment.training.common import GuardedTraining, MethodSpec

log = logging.getLogger("prefloop.train")

PACKABLE_KEYS = frozenset({"input_ids", "attention_mask", "labels", "position_ids"})


@dataclass
class SFTConfig(TRLSFTConfig):
    """TRL's SFTConfig, plus prefloop's batching choice: the store export is prompt/completion,
    so the loss covers the completion only (TRL's `completion_only_loss` default)."""

    prefix_sharing: bool = field(
        default=True,
        metadata={
            "help": "Pack each batch as one row without padding, the batch's common prefix (a shared system "
            "prompt or question) encoded once, with a per-sequence attention mask. Same loss, less compute. Models "
            "without SDPA/eager attention fall back to TRL's padded batches."
        },
    )


@dataclass
class PackedSFTCollator:
    """TRL's collator (its padded batch is kept: token counts, fallbacks) plus the packed row."""

    inner: Any
    share_prefix: bool = True

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        if set(batch) - PACKABLE_KEYS or "attention_mask" not in batch or "labels" not in batch:
            return batch  # TRL's packing, padding_free or a vision batch: TRL's path
        batch["prefloop_packed"] = pack_labelled(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                 self.share_prefix)
        return batch


def pack_labelled(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                  share_prefix: bool = True) -> dict:
    """The packed row of a padded batch, and for every labelled token (position t > 0 whose label
    is not -100, as TRL's shifted loss reads them) the packed index of the hidden state that
    predicts it (`src`) and the token (`tgt`)."""
    sequences, sequence_labels = [], []
    for ids, mask, lab in zip(input_ids, attention_mask, labels):
        keep = mask.bool()
        sequences.append(ids[keep].tolist())
        sequence_labels.append(lab[keep].tolist())
    packed, index = packing.pack_sequences(sequences, share_prefix=share_prefix)
    src, tgt = [], []
    for own, lab in zip(index, sequence_labels):
        for t in range(1, len(lab)):
            if lab[t] != -100:
                src.append(own[t - 1])
                tgt.append(lab[t])
    packed["src"] = torch.tensor(src, dtype=torch.long)
    packed["tgt"] = torch.tensor(tgt, dtype=torch.long)
    return packed


class SFTTrainer(GuardedTraining, TRLSFTTrainer):
    """TRL's SFTTrainer, stopping on a non-finite loss. Built as `PackedSFTTrainer` (packed rows,
    which logs TRL's metrics through its private members) when `alignment._compat` says this TRL
    is one it was tested with; otherwise TRL's SFTTrainer as is."""

    def __new__(cls, *args, **kwargs):
        if cls is SFTTrainer and compat_trl.fast_path_enabled("sft"):
            cls = PackedSFTTrainer
        return super().__new__(cls)


class PackedSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer computing its loss from packed, prefix-shared rows."""

    def __init__(self, model, *, args: SFTConfig | None = None, **kwargs):
        self._packed = False
        super().__init__(model, args=args, **kwargs)
        args = self.args
        if (
            getattr(args, "prefix_sharing", False)
            and not args.packing
            and not args.padding_free
            and self.compute_loss_func is None
            and self.label_smoother is None
            and not self.aux_loss_enabled
            and args.loss_type in ("nll", "dft")
            and packing.enable_for_causal_lm(self.accelerator.unwrap_model(self.model))
        ):
            self.data_collator = PackedSFTCollator(self.data_collator)
            self._packed = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        packed = inputs.pop("prefloop_packed", None)
        if packed is None or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        out = model(**packing.packed_model_kwargs(packed, device), prefloop_head="logprobs",
                    prefloop_index=packed["src"].to(device), prefloop_targets=packed["tgt"].to(device),
                    prefloop_outputs=("entropy", "is_top1"))
        log_probs = out["log_probs"]
        per_token_loss = -log_probs
        if self.args.loss_type == "dft":  # DFT: https://huggingface.co/papers/2508.05629
            per_token_loss = per_token_loss * log_probs.exp().detach()
        num_valid = torch.tensor(log_probs.numel(), device=device)
        num_tokens = num_valid if num_items_in_batch is None else num_items_in_batch
        loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        with torch.no_grad():
            compat_trl.record_sft_metrics(
                self, mode, entropy_sum=out["entropy"].detach().sum(), num_correct=out["is_top1"].sum(),
                num_valid=num_valid, num_tokens=inputs["attention_mask"].sum(),
            )
        return loss


METHOD = MethodSpec(
    name="sft",
    config_class=SFTConfig,
    trainer_class=SFTTrainer,
    export="sft",
    required_columns=(("prompt", "completion"), ("messages",), ("text",)),
)
