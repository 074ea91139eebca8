"""GRPO on TRL's GRPOTrainer: for each stored prompt the LoRA/DoRA policy samples a group of
`num_generations` completions, a reward scores them, and each completion's advantage is its
reward against its group's (no value model). The reward is any online source
(online_rewards.py: a reward run or model, rubric rules, a Python function, the AI judge).

Prefloop's part: the config adds the reward source, `max_length` (prompts longer than
`max_length - max_completion_length` tokens are left out, with a note) and CPU-sized defaults
(groups of 4, completions of at most 128 tokens); the trainer builds the reward from the config,
refuses data without a `prompt` column, and guards every step's loss (NaN/inf stops the run).
`beta` (TRL's default 0: no reference) > 0 keeps the policy near the base with the adapter
off, or near the parent for `--from-policy`. Checkpoints, `--resume`, curves (reward,
reward_std, rewards/<source>/mean, kl, completions/mean_length, ...) are the Trainer's own.

Faster than TRL as is, with the same numbers, on a TRL `alignment._compat` was tested with:
- completions are sampled by `prefloop generate`'s decoding loop (rollouts.py) where TRL would
  call transformers' `generate` and the loop computes the same distribution (no vLLM, no images,
  no min-p / repetition penalty / extra generation kwargs, a Llama-family base);
- a batch is scored as one packed row, what its sequences share (a group's prompt) encoded once,
  the LM head on the completion tokens only (`prefix_sharing`, as for DPO).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig as TRLGRPOConfig
from trl import GRPOTrainer as TRLGRPOTrainer

from alignment._compat import trl as compat_trl
from alignment.training import online_rewards, packing
from alignment.training.common import GuardedTraining, MethodSpec, PrefixSharing, TrainingError
from alignment.training.online_rewards import (
    RewardSource,  # declared there (generation uses it without TRL)
)

log = logging.getLogger("prefloop.train")


@dataclass
class GRPOConfig(PrefixSharing, RewardSource, TRLGRPOConfig):
    """TRL's GRPOConfig plus the reward source; smaller defaults for a CPU."""

    num_generations: int | None = field(default=4, metadata={"help": "completions sampled per prompt (a group)"})
    max_completion_length: int | None = field(default=128, metadata={"help": "most tokens per completion"})
    logging_steps: float = field(default=1, metadata={"help": "log every N steps"})


class OnlineTrainer(GuardedTraining):
    """What prefloop adds to TRL's GRPO and RLOO trainers: the reward from the config, the data
    check, prompts too long for max_length left out, rollouts through the decoding loop."""

    returns_logprobs = True  # GRPO's generation returns (completion_ids, logprobs), RLOO's the ids alone

    def __init__(self, model, args, train_dataset, processing_class, callbacks=None, reward_funcs=None, **kwargs):
        if "prompt" not in train_dataset.column_names:
            raise TrainingError(f"{type(self).__name__.removesuffix('Trainer')} samples completions to prompts: the "
                                f"data needs a 'prompt' column (it has {', '.join(train_dataset.column_names)})")
        train_dataset = _fitting_prompts(train_dataset, processing_class, args)
        rewards = reward_funcs or online_rewards.build(args, processing_class, device=str(args.device))
        super().__init__(model=model, reward_funcs=rewards, args=args, train_dataset=train_dataset,
                         processing_class=processing_class, callbacks=callbacks, **kwargs)
        self._packed = (compat_trl.fast_path_enabled("online_packing") and getattr(args, "prefix_sharing", False)
                        and packing.enable_for_causal_lm(self.accelerator.unwrap_model(self.model)))

    # -- scoring: a group's completions share their prompt --------------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **multimodal):
        """TRL's per-token log-probs of the completions ([rows, logits_to_keep]; entropies too), from
        the batch packed as one row with its common prefix (a group's prompt) encoded once."""
        packable = (self._packed and not compute_aux_loss and all(v is None for v in multimodal.values())
                    and getattr(packing.unwrap_peft(model), "_prefloop_packed_heads", False))
        if not packable:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal)
        packed, src, tgt, rows, columns = completion_positions(input_ids, attention_mask, logits_to_keep)
        device = input_ids.device
        with self.accelerator.autocast():
            out = model(**packing.packed_model_kwargs(packed, device), prefloop_head="logprobs",
                        prefloop_index=src.to(device), prefloop_targets=tgt.to(device),
                        prefloop_outputs=("entropy",) if compute_entropy else (), prefloop_temperature=self.temperature)
        shape = (input_ids.size(0), logits_to_keep)
        rows, columns = rows.to(device), columns.to(device)
        logps = packing.scatter_to_rows(out["log_probs"], rows, columns, shape)
        entropies = packing.scatter_to_rows(out["entropy"], rows, columns, shape) if compute_entropy else None
        return logps, entropies, None

    # -- rollouts ------------------------------------------------------------------------------
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, *args, **kwargs):
        completion_ids = self._decoded_rollouts(prompt_ids, images, multimodal_fields)
        if completion_ids is None:  # GRPO's also takes num_generations and has_tool_images
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)
        return (completion_ids, None) if self.returns_logprobs else completion_ids

    def _decoded_rollouts(self, prompt_ids, images, multimodal_fields) -> list[list[int]] | None:
        """The completions from the decoding loop, or None where TRL's own path must run."""
        from alignment.training import rollouts

        args = self.args
        plain_sampling = (args.min_p is None and args.repetition_penalty == 1.0 and not args.generation_kwargs
                          and not getattr(args, "cache_implementation", None))
        if not (compat_trl.fast_path_enabled("online_decoding") and plain_sampling and not self.use_vllm
                and not getattr(self, "use_transformers_continuous_batching", False)
                and not any(_is_image(image) for image in images or ()) and not multimodal_fields):
            return None
        tokenizer = self.processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        device = self.accelerator.device
        batch = tokenizer.pad({"input_ids": [list(ids) for ids in prompt_ids]}, padding_side="left",
                              return_tensors="pt").to(device)
        with torch.no_grad():
            tokens = rollouts.sample(self.accelerator.unwrap_model(self.model), batch["input_ids"],
                                     batch["attention_mask"], max_new_tokens=self.max_completion_length,
                                     temperature=self.temperature, top_k=self.top_k or 0, top_p=self.top_p,
                                     stop_ids=self.eos_token_ids, pad_id=tokenizer.pad_token_id, fold_lora=True)
        return None if tokens is None else rollouts.completions(tokens, self.eos_token_ids)


def completion_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int):
    """The batch packed as one row (its common prefix once: `packing.pack_sequences`) and, for
    every real token of the last `logits_to_keep` columns (the completions), the packed index of
    the state that predicts it, the token, and its [row, column] in TRL's output grid."""
    start = input_ids.size(1) - logits_to_keep
    real = attention_mask.bool().cpu()
    ids = input_ids.cpu()
    packed, index = packing.pack_sequences([row[keep].tolist() for row, keep in zip(ids, real)])
    place = real.long().cumsum(1) - 1  # a real token's place in its sequence
    scored = real[:, start:] & (place[:, start:] > 0)  # a first token has no state predicting it
    rows, columns = scored.nonzero(as_tuple=True)  # row-major, as TRL's grid is read
    by_place = torch.zeros(len(index), max(map(len, index)), dtype=torch.long)  # packed index of each place
    for row, own in enumerate(index):
        by_place[row, :len(own)] = torch.tensor(own, dtype=torch.long)
    src = by_place[rows, place[rows, start + columns] - 1]
    return packed, src, ids[rows, start + columns], rows, columns


def _is_image(item) -> bool:
    return item is not None and not (isinstance(item, (list, tuple)) and len(item) == 0)


def _fitting_prompts(dataset, tokenizer, args):
    limit = args.max_length
    if not limit or not args.max_completion_length:
        return dataset
    budget = limit - args.max_completion_length
    if budget < 1:
        raise TrainingError(f"max_length {limit} leaves no room for a prompt beside max_completion_length "
                            f"{args.max_completion_length}")

    def length(example) -> int:
        prompt = example["prompt"]
        if isinstance(prompt, str) or tokenizer.chat_template is None:
            return len(tokenizer(online_rewards.text_of(prompt))["input_ids"])
        return len(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"])

    kept = dataset.filter(lambda example: length(example) <= budget, desc="Prompts within max_length")
    if len(kept) < len(dataset):
        log.warning("%d prompts are longer than max_length - max_completion_length (%d tokens): left out",
                    len(dataset) - len(kept), budget)
    if len(kept) == 0:
        raise TrainingError(f"every prompt is longer than max_length - max_completion_length ({budget} tokens)")
    return kept


class GRPOTrainer(OnlineTrainer, TRLGRPOTrainer):
    pass


def resolve(settings: dict, engine) -> dict:
    return online_rewards.resolve(settings, engine, method="grpo")


METHOD = MethodSpec(
    name="grpo",
    config_class=GRPOConfig,
    trainer_class=GRPOTrainer,
    export="prompts",
    required_columns=(("prompt",),),
    resolve=resolve,
)
