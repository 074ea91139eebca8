"""TRL's private trainer hooks that prefloop's packed DPO and reward trainers use.

Written and tested for TRL 1.16 on transformers 5.24 (`TESTED`). What is relied on:

- `DPOTrainer._prepare_dataset` / `RewardTrainer._prepare_dataset`: overridden to measure each
  pair (a `length` column for `group_by_length`) and, for the reward model, to fail clearly
  when no pair fits `max_length`;
- `Trainer._set_signature_columns_if_needed` / `_signature_columns`: the `length` column kept;
- `DPOTrainer._precompute_ref_logps`: overridden to compute the reference log-probs from the
  packed rows;
- `DPOTrainer._compute_loss(model, inputs, return_outputs)`: called with a stand-in model that
  returns the packed log-probs, so TRL's loss code runs unchanged (for a weighted batch, once
  per pair on that pair's rows of the one packed forward: `dpo.PackedDPOTrainer.weighted_loss`);
- `RewardTrainer._prepare_dataset` called on the held-out pairs (pairwise accuracy);
- `SFTTrainer._metrics`, `_total_train_tokens`, `_tp_size`: the packed SFT trainer computes its
  loss itself and logs TRL's `entropy`, `mean_token_accuracy` and `num_tokens` as TRL does;
- `KTOTrainer._compute_loss(model, inputs, return_outputs)` and its `precompute_ref_logps`
  attribute: called with a stand-in model that returns the packed log-probs and with the
  reference log-probs in the batch, so TRL's KTO loss code runs unchanged (for a weighted batch,
  once per completion, with the batch's KL completions: `kto.PackedKTOTrainer.weighted_loss`).
- `trl.experimental` `ORPOTrainer.concatenated_forward` / `CPOTrainer.concatenated_forward`
  (model, batch) -> (chosen_logps, rejected_logps, chosen_logits, rejected_logits, nll_loss),
  which `get_batch_loss_metrics` consumes: overridden to compute them from packed rows
  (`reference_free.PackedPairs`; the logits as per-token means, which TRL only averages into
  its `logits/*` metrics), and `aux_loss_enabled` / `is_encoder_decoder`, read to stay off.
- `GRPOTrainer._generate_single_turn` / `RLOOTrainer._generate_single_turn` (prompt_ids,
  images, multimodal_fields[, num_generations, has_tool_images]) -> (completion_ids, logprobs) /
  completion_ids,
  each row cut after its first EOS: overridden to sample with the decoding loop
  (`grpo.OnlineTrainer`), reading `use_vllm`, `use_transformers_continuous_batching`,
  `max_completion_length`, `temperature`, `top_k`, `top_p` and `eos_token_ids` to match TRL's
  generation config (and to stay off where it could not).
- `GRPOTrainer._get_per_token_logps_and_entropies` / the same of `RLOOTrainer` (model,
  input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
  **multimodal) -> (logps, entropies, aux_loss), [rows, logits_to_keep], logits divided by
  `temperature`: overridden to score the batch packed with its common prefix once
  (`grpo.OnlineTrainer`).

Per-example weights (a `weight` column) need no private member: the trainers keep the column with
the public `remove_unused_columns=False`, collate it with `common.WeightedCollator` and weight
the loss in their public `compute_loss`; the public path runs TRL's `compute_loss` per example.

The mixins here are only put into a trainer's class when `fast_path_enabled` says so (the
trainer classes pick it when they are built); otherwise prefloop's trainers are TRL's, used
through public arguments only (TRL's two-row padded batches, TRL's own
`precompute_ref_log_probs`), and the held-out pairs are tokenized by prefloop
(`alignment.training.reward.tokenize_pairs`).
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet

from alignment import _compat

TESTED = {"trl": SpecifierSet(">=1.16,<1.17"), "transformers": SpecifierSet(">=5.24,<5.25")}
# the packed DPO, reward, SFT, KTO and ORPO/SimPO ("reference_free") trainers' hooks, and
# GRPO/RLOO rollouts through the decoding loop ("online_decoding") and their packed scoring
# ("online_packing")
FEATURES = ("dpo", "reward", "sft", "kto", "reference_free", "online_decoding", "online_packing")


def fast_path_enabled(feature: str) -> bool:
    if feature not in FEATURES:
        raise ValueError(f"unknown TRL fast path {feature!r} (known: {', '.join(FEATURES)})")
    return _compat.check(f"trl:{feature}", TESTED)


def _keep_column(trainer, column: str) -> None:
    if column not in trainer._signature_columns:
        trainer._signature_columns = [*trainer._signature_columns, column]


class DPOHooks:
    """TRL DPOTrainer hooks, forwarded to prefloop's public-named methods:
    `measure_pairs(dataset, name)` after TRL's tokenization, and
    `precompute_reference(dataset, name, batch_size)` (None: TRL's own precompute)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return self.measure_pairs(dataset, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        _keep_column(self, "length")

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        computed = self.precompute_reference(dataset, name, batch_size)
        return super()._precompute_ref_logps(dataset, name, batch_size) if computed is None else computed


def dpo_loss(trainer, model, inputs: dict, return_outputs: bool):
    """TRL's DPO loss (every loss_type, its metrics) on what `model(...)` returns."""
    return trainer._compute_loss(model, inputs, return_outputs)


class RewardHooks:
    """TRL RewardTrainer hooks, forwarded to prefloop's `measure_pairs(dataset, name, before=n, max_length=m)`."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        before = len(dataset)
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return self.measure_pairs(dataset, dataset_name, before=before, max_length=args.max_length)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        _keep_column(self, "length")


def prepare_reward_dataset(trainer, dataset, name: str):
    """The rows TRL's reward trainer would train on, from `dataset` (tokenized, filtered)."""
    return trainer._prepare_dataset(dataset, trainer.processing_class, trainer.args, name)


def record_sft_metrics(trainer, mode: str, *, entropy_sum, num_correct, num_valid, num_tokens) -> None:
    """TRL SFTTrainer's per-step metrics (as its `compute_loss` logs them) from packed outputs."""
    gather = trainer.accelerator.gather_for_metrics
    valid = gather(num_valid).sum()
    entropy, correct = gather(entropy_sum).sum(), gather(num_correct).sum()
    metrics = trainer._metrics[mode]
    metrics["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
    metrics["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
    if mode == "train":
        trainer._total_train_tokens += gather(num_tokens).sum().item() // trainer._tp_size
    metrics["num_tokens"] = [trainer._total_train_tokens]


def kto_loss(trainer, model, inputs: dict, return_outputs: bool):
    """TRL's KTO loss (every loss_type, its metrics) on what `model(...)` returns."""
    return trainer._compute_loss(model, inputs, return_outputs)
