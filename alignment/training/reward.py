"""Reward model: a scalar head on a decoder (LoRA + a fully trained `score` layer) or on an
encoder-only model (a small BERT-style scorer is a legitimate cheap choice), trained with
TRL's `RewardTrainer` (Bradley-Terry loss, vote strength as `margin`) on stored pairs.

A share of the pairs is held out and the pairwise accuracy on them (how often the chosen
completion scores higher) is the run's headline metric.

Decoders go through the same prefix-shared packed rows as DPO (`packing.py`): one row per
batch, the prompt encoded once for both completions, the score read at each sequence's last
token. Encoders attend in both directions, so they keep TRL's two-row batches, and so does
every model on a TRL/transformers `alignment._compat` was not tested with (or with
`PREFLOOP_COMPAT=public`).

Weighted data (a `weight` column: `--weighted`, see feedback_store.export.example_weights): the
batch is scored once and TRL's loss (margin and reward centering included) runs on each pair's
two rewards alone; the batch loss is `sum_i w_i * loss_i / n`. Without the column, TRL's loss as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from trl import RewardConfig as TRLRewardConfig
from trl import RewardTrainer as TRLRewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

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
class RewardConfig(TRLRewardConfig):
    """TRL's RewardConfig, plus the held-out share and prefloop's batching."""

    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of the pairs (whole comparisons) held out to report pairwise accuracy; 0 = none."},
    )
    prefix_sharing: bool = field(
        default=True,
        metadata={
            "help": "For decoder reward models, pack each batch as one row with the prompt shared by both "
            "completions (same scores, less compute). Encoders keep TRL's batches."
        },
    )


@dataclass
class PackedRewardCollator:
    """TRL's reward collator (its tensors feed TRL's loss) plus the packed row."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = DataCollatorForPreference(pad_token_id=self.pad_token_id)(examples)
        pieces = [packing.split_shared_prompt(e["chosen_ids"], e["rejected_ids"]) for e in examples]
        packed, layout = packing.pack_pairs(*zip(*pieces))
        packed["ends"] = packing.sequence_end_index(layout, packed["input_ids"], self.pad_token_id)
        batch["prefloop_packed"] = packed
        return batch


class RewardTrainer(GuardedTraining, TRLRewardTrainer):
    """TRL's RewardTrainer. Built as `PackedRewardTrainer` (packed rows for decoders, through
    TRL's private hooks) when `alignment._compat` says this TRL is one it was tested with;
    otherwise TRL's own batches, driven through public arguments only."""

    def __new__(cls, *args, **kwargs):
        if cls is RewardTrainer and compat_trl.fast_path_enabled("reward"):
            cls = PackedRewardTrainer
        return super().__new__(cls)

    def __init__(self, model, *, args: RewardConfig | None = None, **kwargs):
        public = not isinstance(self, PackedRewardTrainer)
        if public:
            from alignment.training.dpo import length_grouping_off

            length_grouping_off(args)
        before = len(kwargs["train_dataset"]) if kwargs.get("train_dataset") is not None else 0
        weighted = weighted_training(args, kwargs.get("train_dataset"))
        super().__init__(model, args=args, **kwargs)
        if public:
            no_pair_fits(before, len(self.train_dataset), "train", self.args.max_length)
        if weighted:
            self.data_collator = WeightedCollator(self.data_collator)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = inputs.pop(WEIGHT, None)
        if weights is None or return_outputs:  # evaluation reports the plain loss
            return self.batch_loss(model, inputs, return_outputs, num_items_in_batch)
        rewards = self.batch_rewards(model, inputs)
        n = weights.numel()

        def loss_of(i: int):
            scored = SimpleNamespace(logits=rewards[[i, n + i]].unsqueeze(-1))
            return self.trl_loss(lambda **_: scored, example_rows(inputs, i, n))

        return weighted_mean(loss_of, weights)

    def batch_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's reward loss on the batch, as TRL computes it."""
        return self.trl_loss(model, inputs, return_outputs, num_items_in_batch)

    def trl_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def batch_rewards(self, model, inputs) -> torch.Tensor:
        """The n chosen then the n rejected rewards of a batch, as TRL's loss reads them."""
        kwargs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        return model(**kwargs, use_cache=False).logits.squeeze(-1)

    def prepare_pairs(self, dataset, name: str):
        """The rows this trainer trains on, from exported pairs (tokenized, too long ones left out)."""
        prepared = tokenize_pairs(dataset, self.processing_class, self.args.max_length)
        no_pair_fits(len(dataset), len(prepared), name, self.args.max_length)
        return prepared


def no_pair_fits(before: int, after: int, name: str, max_length) -> None:
    if before and after == 0:
        raise TrainingError(
            f"none of the {before} {name} pairs fits the reward model: every one is longer than "
            f"max_length={max_length} tokens (use a model with a longer context, or shorter data)"
        )


def tokenize_pairs(dataset, tokenizer, max_length: int | None):
    """Exported pairs as TRL's reward trainer tokenizes them (prompt + completion, the chat
    template for chats, EOS appended to plain text), through the tokenizer's public API; pairs
    longer than `max_length` are left out."""
    from trl.data_utils import is_conversational

    def tokenize(example):
        def ids(completion):
            text = example["prompt"] + completion if "prompt" in example else completion
            if is_conversational(example):
                return tokenizer.apply_chat_template(text, tokenize=True, return_dict=True)["input_ids"]
            if not text.endswith(tokenizer.eos_token):
                text = text + tokenizer.eos_token
            return tokenizer(text=text)["input_ids"]

        return {"chosen_ids": ids(example["chosen"]), "rejected_ids": ids(example["rejected"])}

    dataset = dataset.map(tokenize, desc="Tokenizing pairs")
    if max_length is not None:
        dataset = dataset.filter(lambda e: len(e["chosen_ids"]) <= max_length and len(e["rejected_ids"]) <= max_length)
    return dataset


class PackedRewardTrainer(compat_trl.RewardHooks, RewardTrainer):
    """TRL's RewardTrainer scoring packed rows for decoder models."""

    def __init__(self, model, *, args: RewardConfig | None = None, **kwargs):
        self._packed = False
        base = packing.unwrap_peft(model)
        tokenizer = kwargs.get("processing_class")
        if (
            args is not None
            and getattr(args, "prefix_sharing", False)
            and kwargs.get("data_collator") is None
            and tokenizer is not None
            and packing.supports_packing(base)
            and hasattr(base, "score")
            and packing.use_packed_attention(base)
        ):
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            kwargs["data_collator"] = PackedRewardCollator(tokenizer.pad_token_id)
            self._packed = True
        super().__init__(model, args=args, **kwargs)
        if self._packed:
            packing.add_packed_heads(packing.unwrap_peft(self.accelerator.unwrap_model(self.model)))

    # called from TRL's dataset preparation (alignment._compat.trl)
    def measure_pairs(self, dataset, dataset_name: str, *, before: int, max_length: int | None):
        no_pair_fits(before, len(dataset), dataset_name, max_length)
        if "length" not in dataset.column_names:
            # what group_by_length sorts on (TRL's reward rows have no input_ids to measure)
            dataset = dataset.map(lambda e: {"length": len(e["chosen_ids"]) + len(e["rejected_ids"])},
                                  desc=f"Measuring {dataset_name} pairs")
        return dataset

    def prepare_pairs(self, dataset, name: str):
        return compat_trl.prepare_reward_dataset(self, dataset, name)

    def packed_rewards(self, model, packed: dict) -> torch.Tensor:
        """Rewards of the n chosen then the n rejected sequences of a packed batch."""
        device = self.accelerator.device
        return model(**packing.packed_model_kwargs(packed, device), prefloop_head="score",
                     prefloop_index=packed["ends"].to(device))

    def batch_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        packed = inputs.pop("prefloop_packed", None)
        if packed is None:
            return super().batch_loss(model, inputs, return_outputs, num_items_in_batch)
        rewards = self.packed_rewards(model, packed)
        # TRL's loss, margin, centering and metrics, on the packed rewards.
        scored = SimpleNamespace(logits=rewards.unsqueeze(-1))
        return self.trl_loss(lambda **_: scored, inputs, return_outputs, num_items_in_batch)

    def batch_rewards(self, model, inputs) -> torch.Tensor:
        packed = inputs.pop("prefloop_packed", None)
        if packed is None:
            return super().batch_rewards(model, inputs)
        return self.packed_rewards(model, packed)


def split(dataset, config: RewardConfig, seed: int):
    """Hold out whole comparisons (a tie's two mirrored rows stay together)."""
    fraction = float(getattr(config, "eval_fraction", 0.0) or 0.0)
    if fraction <= 0 or len(dataset) < 2:
        return dataset, None
    groups = dataset["comparison_id"] if "comparison_id" in dataset.column_names else list(range(len(dataset)))
    keys = sorted(set(groups), key=lambda g: (g is None, g))
    generator = torch.Generator().manual_seed(seed)
    order = [keys[i] for i in torch.randperm(len(keys), generator=generator).tolist()]
    n_eval = min(max(1, round(len(keys) * fraction)), len(keys) - 1)
    held = set(order[:n_eval])
    eval_rows = [i for i, g in enumerate(groups) if g in held]
    train_rows = [i for i, g in enumerate(groups) if g not in held]
    return dataset.select(train_rows), dataset.select(eval_rows)


def pairwise_accuracy(trainer: RewardTrainer, eval_dataset) -> dict:
    """How often the chosen completion outscores the rejected one on held-out decided pairs."""
    if eval_dataset is None or len(eval_dataset) == 0:
        return {}
    if "comparison_id" in eval_dataset.column_names:
        counts: dict = {}
        for cid in eval_dataset["comparison_id"]:
            counts[cid] = counts.get(cid, 0) + 1
        decided = [i for i, cid in enumerate(eval_dataset["comparison_id"]) if counts[cid] == 1]  # ties are mirrored
        eval_dataset = eval_dataset.select(decided)
    if len(eval_dataset) == 0:
        return {}
    prepared = trainer.prepare_pairs(eval_dataset, "held-out")
    model = trainer.model
    was_training = model.training
    model.eval()
    correct, margins = 0, []
    collate = trainer.data_collator
    batch_size = max(trainer.args.per_device_eval_batch_size, 1)
    with torch.no_grad():
        for start in range(0, len(prepared), batch_size):
            examples = [prepared[i] for i in range(start, min(start + batch_size, len(prepared)))]
            batch = collate(examples)
            packed = batch.pop("prefloop_packed", None)
            if packed is not None:
                rewards = trainer.packed_rewards(model, packed)
            else:
                batch = {k: v.to(trainer.accelerator.device) for k, v in batch.items() if k not in ("margin", WEIGHT)}
                rewards = model(**batch, use_cache=False).logits.squeeze(-1)
            chosen, rejected = rewards.float().chunk(2)
            correct += int((chosen > rejected).sum())
            margins += (chosen - rejected).tolist()
    model.train(was_training)
    return {
        "eval_accuracy": correct / len(prepared),
        "eval_margin": sum(margins) / len(margins),
        "eval_pairs": len(prepared),
    }


METHOD = MethodSpec(
    name="reward",
    config_class=RewardConfig,
    trainer_class=RewardTrainer,
    export="reward",
    head="reward",
    registers_policy=False,
    required_columns=(("prompt", "chosen", "rejected"), ("chosen", "rejected")),
    split=split,
    evaluate=pairwise_accuracy,
)
