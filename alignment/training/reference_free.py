"""What ORPO and SimPO share: TRL's experimental pairwise trainers (`trl.experimental.orpo`,
`trl.experimental.cpo`), which need no reference model, on the same preference pairs as DPO.

- TRL warns on every first import of `trl.experimental`; prefloop chose these trainers on purpose,
  so that one warning is silenced here (and only that one).
- Their tokenized rows hold `chosen_input_ids` / `rejected_input_ids`, not the `input_ids` that
  length-grouped sampling measures: a `length` column (prompt + both completions, the compute of
  a pair) is added after TRL's tokenization, so `train_sampling_strategy: group_by_length` (the
  seed-qlora preset) works as it does for DPO.
- Prefix-shared packed rows, as for DPO: TRL runs each pair as two padded rows, the prompt
  encoded twice and the LM head over every position (`concatenated_forward`). `PackedPairs`
  packs the batch as one row per pair, [prompt | chosen | rejected], the prompt once, and runs
  the LM head on the labelled tokens only (plus, for ORPO, whose NLL term covers prompt and
  chosen answer, the prompt's own tokens); TRL's loss code (`get_batch_loss_metrics`: every
  loss type, beta, gamma, alpha, its metrics) then runs unchanged on the same per-sequence
  log-probs. `logits/chosen|rejected` are then the mean logit over the completion tokens
  (TRL's is over its padded grid, prompt and padding included); everything else is TRL's.
  Models the packed layout cannot serve, a pair whose prompt is not the same token prefix of
  both rows, and any TRL or transformers `alignment._compat` was not tested with go through
  TRL's `concatenated_forward` as is.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from alignment._compat import trl as compat_trl
from alignment.training import packing

# the export both read: the store's decided pairs (the same rows as DPO)
EXPORT = "dpo"
REQUIRED_COLUMNS = (("prompt", "chosen", "rejected"), ("chosen", "rejected"))
IGNORED = -100  # TRL's label_pad_token_id: the prompt's labels


def experimental(name: str) -> ModuleType:
    """`trl.experimental.NAME`, without TRL's notice that experimental APIs may change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
        return importlib.import_module(f"trl.experimental.{name}")


def pair_length(example: dict) -> dict:
    return {"length": sum(len(example.get(key) or ()) for key in
                          ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"))}


class MeasuredPairs:
    """Trainer mixin: a `length` column on the tokenized pairs when batches are grouped by length."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        dataset = self.train_dataset
        grouped = getattr(self.args, "train_sampling_strategy", None) == "group_by_length"
        if grouped and dataset is not None and "length" not in dataset.column_names:
            self.train_dataset = dataset.map(pair_length, desc="Measuring pairs")


# -- the packed path -----------------------------------------------------------------------------
def split_at_labels(example: dict) -> tuple[list[int], list[int], list[int]] | None:
    """(prompt, chosen, rejected) of a tokenized ORPO/CPO row: the prompt is the unlabelled prefix,
    which must be the same tokens in both rows (None otherwise: TRL's path for that batch)."""
    chosen, rejected = list(example["chosen_input_ids"]), list(example["rejected_input_ids"])
    cut = _unlabelled_prefix(example["chosen_labels"])
    if (cut == 0 or cut != _unlabelled_prefix(example["rejected_labels"]) or chosen[:cut] != rejected[:cut]
            or cut >= min(len(chosen), len(rejected))):
        return None
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _unlabelled_prefix(labels) -> int:
    labels = list(labels)
    return next((i for i, label in enumerate(labels) if label != IGNORED), len(labels))


def prompt_token_index(layout: packing.PairLayout, packed_ids: torch.Tensor):
    """For each prompt token after the first: the packed index of the state predicting it, and the
    token (ORPO's NLL covers the prompt; `completion_token_index` starts after it)."""
    src, tgt = [], []
    for lp, base in zip(layout.prompt_lens, layout.starts):
        src += range(base, base + lp - 1)
        tgt += packed_ids[0, base + 1: base + lp].tolist()
    return torch.tensor(src, dtype=torch.long), torch.tensor(tgt, dtype=torch.long)


@dataclass
class PackedPairCollator:
    """TRL's pair collator (its padded rows are kept for TRL's fallback) plus the packed rows."""

    inner: Any
    with_prompt_tokens: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        pieces = [split_at_labels(example) for example in examples]
        if any(piece is None for piece in pieces):
            return batch
        packed, layout = packing.pack_pairs(*zip(*pieces))
        src, tgt, seq, _ = packing.completion_token_index(layout, packed["input_ids"])
        packed.update(src=src, tgt=tgt, seq=seq, n=len(pieces))
        if self.with_prompt_tokens:
            packed["prompt_src"], packed["prompt_tgt"] = prompt_token_index(layout, packed["input_ids"])
        batch["prefloop_packed"] = packed
        return batch


class PackedPairs:
    """Trainer mixin for TRL's experimental ORPO and CPO trainers: `concatenated_forward` from
    prefix-shared packed rows when the batch carries them (see the module docstring).

    `nll_over_prompt`: ORPO's NLL term covers prompt and chosen answer, CPO's the answer only;
    `average_log_prob(self)`: whether the sequence log-prob is the per-token mean (as TRL's
    `concatenated_forward` of that trainer passes to `get_batch_logps`)."""

    nll_over_prompt = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._packed = False
        if not (compat_trl.fast_path_enabled("reference_free") and getattr(self.args, "prefix_sharing", False)
                and not self.is_encoder_decoder and not self.aux_loss_enabled):
            return
        if packing.enable_for_causal_lm(self.accelerator.unwrap_model(self.model)):
            self.data_collator = PackedPairCollator(self.data_collator, with_prompt_tokens=self.nll_over_prompt)
            self._packed = True

    def average_log_prob(self) -> bool:
        raise NotImplementedError

    def nll_enabled(self) -> bool:
        return True

    def concatenated_forward(self, model, batch):
        packed = batch.get("prefloop_packed")
        if packed is None:
            return super().concatenated_forward(model, batch)
        device = self.accelerator.device
        n = packed["n"]
        src, tgt, seq = packed["src"], packed["tgt"], packed["seq"]
        if self.nll_over_prompt:  # the prompt's tokens ride along in the same head call
            src, tgt = torch.cat([src, packed["prompt_src"]]), torch.cat([tgt, packed["prompt_tgt"]])
        out = model(**packing.packed_model_kwargs(packed, device), prefloop_head="logprobs",
                    prefloop_index=src.to(device), prefloop_targets=tgt.to(device), prefloop_outputs=("mean_logits",))
        completions = seq.numel()
        log_probs, mean_logits = out["log_probs"][:completions], out["mean_logits"][:completions]
        seq = seq.to(device)
        sums = log_probs.new_zeros(2 * n).index_add(0, seq, log_probs)
        counts = torch.bincount(seq, minlength=2 * n).to(log_probs.dtype)
        logps = sums / counts if self.average_log_prob() else sums
        chosen = seq < n
        if not self.nll_enabled():
            nll = torch.tensor(0.0, device=device)
        else:  # TRL's CrossEntropyLoss: the mean over every scored token of the chosen rows
            nll_terms = [log_probs[chosen]]
            if self.nll_over_prompt:
                nll_terms.append(out["log_probs"][completions:])
            nll_terms = torch.cat(nll_terms)
            nll = -nll_terms.sum() / max(nll_terms.numel(), 1)
        return logps[:n], logps[n:], mean_logits[chosen], mean_logits[~chosen], nll
