"""PPO (RLHF): the LoRA policy writes completions to stored prompts, a reward model scores them,
and the policy is pushed towards higher scores without straying far from where it started.

One PPO step:
1. rollout: `rollout_batch_size` prompts (stored prompts, snapshotted like the other methods'
   data), one sampled completion each at `temperature` (no top-k/top-p, so the sampler and the
   log-probs PPO optimises are the same distribution), through `prefloop generate`'s
   static-cache decoding loop (alignment/decoding.py) on Llama-family bases, else `generate`;
2. scoring: the completions are decoded and scored by one reward source, the same flags as
   GRPO/RLOO (online_rewards.py):
   - `--reward-run` / `--reward-model`: the reward model of a finished reward run (its own
     tokenizer and chat template: it may be another model than the policy);
   - `--reward-function module:function`: PPO's own signature, f(completions, prompts) -> floats
     (rule-based rewards and tests; GRPO's functions take (prompts, completions, **columns));
   - `--reward-rubric RULES` and `--reward-judge`: these compare two answers, and PPO samples one
     completion per prompt, so each completion is compared with the reference policy's answer
     to the same prompt (the base with the adapter off, or the `--from-policy` parent), sampled
     beside it at the same temperature: reward 1 if the completion beats it, 0.5 for a tie, 0
     if it loses -- "better than where training started", which is what the KL term holds the
     policy near. Sampling the reference's answers costs one more generation pass per step.
     When a rollout batch draws a prompt more than once (rollout_batch_size > prompts), its
     completions are compared with all of that prompt's answers in the batch, the reference's
     and each other (a win rate, as in GRPO's groups). `--judge-mode reference` compares with
     the data's `reference` column instead, and samples nothing more;
3. per-token rewards: every token pays `kl_coef * (log pi - log ref)`, the score is added at the
   completion's last token; the coefficient is fixed, or adapted towards `kl_target`. The logged
   `kl` is this log-ratio summed over a completion (a sample estimate: a batch mean can dip
   below 0);
4. GAE advantages (`gamma`, `lam`) from a value head's estimates, whitened over the batch;
5. `ppo_epochs` passes over the rollout in minibatches of `mini_batch_size` (micro-batches of
   `per_device_train_batch_size` accumulated): clipped policy loss + `vf_coef` * clipped value
   loss, one optimizer step per minibatch.

Memory: one base model (optionally 4-bit) holds the policy, the reference, the value
function and, when it can, the reward model. The policy is a LoRA/DoRA adapter; the reference is the same base with the adapter
switched off (no copy); the value function is a linear head on the policy's last hidden state,
so one forward gives log-probs and values, and the head costs hidden_size + 1 parameters (a
separate value adapter would double the forward passes). The value loss therefore also shapes
the shared adapter, weighted by `vf_coef` as in the original RLHF PPO. The reward model is a
reward model of a reward run on the same base (a LoRA adapter with a score head, the usual
case) is a second, frozen adapter on that base, switched on only to score (shared_reward.py);
another reward model (another base, an encoder, a full fine-tune) is a separate model in eval
mode. Neither is ever trained here, and checkpoints hold the policy adapter alone.

Dropout is turned off in the policy: with it, the first PPO epoch would already see a ratio
away from 1 and spend its clip range on noise.

The trainer is a `transformers.Trainer` whose `train()` runs this loop, so that checkpoints
(adapter, value head, KL coefficient, optimizer, scheduler), `--resume`, callbacks (the run's
metric curves, progress bar), the NaN guard and interrupts behave as for the other methods.
Curves per PPO step: reward, reward_std, kl, kl_coef, non_score_reward, response_length,
ended_fraction, value_mean, return_mean, loss, policy_loss, value_loss, clip_fraction,
value_clip_fraction, entropy, approx_kl (policy vs its rollout self), grad_norm, learning_rate.

Limits: one process (no accelerate/torchrun launch yet); LoRA/DoRA adapters only (full or
lm_head training would need a reference copy). A run from a stored policy (`--from-policy`)
starts from it and is held close to it: see lineage.py.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import TrainOutput, speed_metrics

from alignment._compat import transformers as compat
from alignment.training import online_rewards, ppo_math, ppo_reward
from alignment.training.common import MethodSpec, NonFiniteLoss, TrainingError

log = logging.getLogger("prefloop.train")

VALUE_HEAD_FILE = "value_head.safetensors"
PPO_STATE_FILE = "ppo_state.json"
OPTIMIZER_FILE, SCHEDULER_FILE, TRAINER_STATE_FILE = "optimizer.pt", "scheduler.pt", "trainer_state.json"  # as Trainer


@dataclass
class PPOConfig(TrainingArguments):
    """transformers' TrainingArguments (optimizer, schedule, checkpoints, logging) plus PPO's own."""

    reward_run: int | None = field(
        default=None, metadata={"help": "id of a finished `prefloop train reward` run whose model scores completions"}
    )
    reward_model: str | None = field(
        default=None, metadata={"help": "a saved reward model directory (a reward run's output) instead of a run id"}
    )
    reward_function: str | None = field(
        default=None,
        metadata={"help": "MODULE:FUNCTION, f(completions, prompts) -> scores: a rule-based reward instead of a model"},
    )
    reward_rubric: str | None = field(
        default=None,
        metadata={"help": "rubric rules (shorter, longer, no-refusal, comma-chained, or module:function): a "
                          "completion scores 1 / 0.5 / 0 for beating / tying / losing to the reference's answer"},
    )
    reward_judge: bool = field(
        default=False,
        metadata={"help": "score with the AI judge (an OpenAI-compatible server; see --judge-*): each completion "
                          "against the reference's answer to its prompt"},
    )
    max_length: int | None = field(
        default=512, metadata={"help": "prompt + completion tokens; longer prompts are left out (with a note)"}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "most tokens per sampled completion"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of the rollouts (> 0)"})
    rollout_batch_size: int = field(default=16, metadata={"help": "prompts (completions) per PPO step"})
    mini_batch_size: int = field(default=8, metadata={"help": "completions per optimizer step within a PPO epoch"})
    ppo_epochs: int = field(default=4, metadata={"help": "optimisation passes over each rollout batch"})
    generation_batch_size: int = field(
        default=16, metadata={"help": "sequences per generate / scoring forward (no gradients kept)"}
    )
    kl_coef: float = field(default=0.05, metadata={"help": "per-token KL penalty to the reference (initial value)"})
    kl_target: float | None = field(
        default=None, metadata={"help": "adapt kl_coef so the completion's KL approaches this; None = fixed kl_coef"}
    )
    kl_horizon: int = field(default=10_000, metadata={"help": "episodes over which the adaptive KL moves by its step"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip range"})
    cliprange_value: float = field(default=0.2, metadata={"help": "how far a value may move from its rollout estimate"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    gamma: float = field(default=1.0, metadata={"help": "discount factor"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "subtracted from the score of a completion cut at max_new_tokens"}
    )
    score_clip: float | None = field(default=None, metadata={"help": "clip reward-model scores to [-x, x]"})
    logging_steps: float = field(default=1, metadata={"help": "log every N PPO steps"})
    save_steps: float = field(default=25, metadata={"help": "checkpoint every N PPO steps"})

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.temperature > 0, f"temperature={self.temperature}: PPO samples, it must be > 0"),
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.rollout_batch_size >= 1, "rollout_batch_size must be at least 1"),
            (1 <= self.mini_batch_size <= self.rollout_batch_size,
             f"mini_batch_size={self.mini_batch_size}: must be in [1, rollout_batch_size={self.rollout_batch_size}]"),
            (self.ppo_epochs >= 1, "ppo_epochs must be at least 1"),
            (self.generation_batch_size >= 1, "generation_batch_size must be at least 1"),
            (self.kl_coef >= 0, "kl_coef must be >= 0"),
            (self.kl_target is None or self.kl_target > 0, "kl_target must be > 0"),
            (self.cliprange > 0 and self.cliprange_value > 0, "cliprange and cliprange_value must be > 0"),
            (0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.fp16:
            raise ValueError("PPO trains in float32 or bf16: remove fp16 (use bf16 on a GPU)")

    def updates_per_step(self) -> int:
        return self.ppo_epochs * math.ceil(self.rollout_batch_size / self.mini_batch_size)


@dataclass
class Rollout:
    """One batch of sampled completions and everything PPO needs about them (rows aligned)."""

    input_ids: torch.Tensor  # (B, P + R): left-padded prompt, then the completion
    attention_mask: torch.Tensor
    prompt_width: int  # P
    responses: torch.Tensor  # (B, R)
    mask: torch.Tensor  # (B, R): 1 up to and including the end token
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    stats: dict


def prompt_indices(n_prompts: int, batch: int, step: int, seed: int) -> list[int]:
    """The prompts of PPO step `step` (0-based): consecutive slices of per-epoch shuffles, so a
    resumed run draws the same prompts as an uninterrupted one."""
    out = []
    for position in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(position, n_prompts)
        order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(order[offset]))
    return out


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _hidden_size(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    size = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if not size:
        size = model.get_output_embeddings().weight.shape[1]
    return int(size)


class PPOTrainer(Trainer):
    """PPO with a value head on a LoRA policy; `reward_fn` (completions, prompts) -> scores
    overrides the config's reward model/function."""

    def __init__(self, model, args: PPOConfig, train_dataset, processing_class, callbacks=None, reward_fn=None,
                 **kwargs):
        if not hasattr(model, "disable_adapter") or not getattr(model, "peft_config", None):
            raise TrainingError("PPO trains a LoRA or DoRA adapter (the reference is the base with the adapter "
                                "off): use --adapter lora or dora")
        super().__init__(model=model, args=args, train_dataset=train_dataset, processing_class=processing_class,
                         callbacks=callbacks, **kwargs)
        if self.accelerator.num_processes > 1:
            raise TrainingError("PPO runs in one process for now: launch it without accelerate/torchrun")
        self.tokenizer = processing_class
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        _disable_dropout(self.model)
        device = next(self.model.parameters()).device
        self.value_head = nn.Linear(_hidden_size(self.model), 1, device=device, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: no random baseline in the first steps
        nn.init.zeros_(self.value_head.bias)
        self.kl_controller = ppo_math.KLController(args.kl_coef, args.kl_target, args.kl_horizon)
        from alignment.generation import stop_token_ids

        self.stop_ids = stop_token_ids(self.model, self.tokenizer)
        self.prompts, self.prompt_ids, self.skipped_prompts = self._encode_prompts(train_dataset)
        reward_device = str(device) if device.type == "cuda" else "cpu"
        # rubric rules and the judge: TRL's signature (prompts, completions, **columns), compared
        # with the reference's answers (the module docstring); the others as PPO always had them
        self.online_reward = None
        if reward_fn is None and (args.reward_rubric is not None or args.reward_judge):
            self.online_reward = online_rewards.build(args, self.tokenizer, device=reward_device)
            reward_fn = self._score_online
        # a reward model on the policy's own base becomes a second adapter of it (shared_reward.py)
        self.reward_fn = reward_fn or ppo_reward.load_reward(
            reward_model=args.reward_model, reward_function=args.reward_function,
            device=reward_device, batch_size=args.generation_batch_size,
            policy=self.accelerator.unwrap_model(self.model), policy_tokenizer=self.tokenizer,
        )
        causal = self.accelerator.unwrap_model(self.model).get_base_model()
        forward = inspect.signature(causal.forward).parameters
        self._forward_keys = {k for k in ("position_ids", "logits_to_keep") if k in forward}
        # The backbone alone (hidden states), then the LM head on the completion tokens through the
        # chunked log-prob kernel: no [batch, tokens, vocabulary] logits (the rollout's and the
        # update's largest tensors) are ever materialised. Else the model's own forward and logits.
        prefix = getattr(causal, "base_model_prefix", "")
        self._backbone = getattr(causal, prefix, None) if prefix and "position_ids" in forward else None
        self._causal = causal

    def _reference(self):
        """The reference: the adapter off, or the frozen copy of a policy this run continues
        (a run from a policy on a quantized base, see lineage.py)."""
        from trl.trainer.utils import use_adapter

        from alignment.training.lineage import reference_adapter

        return use_adapter(self.model, reference_adapter(self.model))

    # -- data --------------------------------------------------------------------------------
    def _encode_prompts(self, dataset) -> tuple[list, list[list[int]], int]:
        from alignment.generation import render_prompt

        if dataset is None or "prompt" not in dataset.column_names:
            raise TrainingError("PPO needs a dataset with a `prompt` column (a chat or a string per row)")
        prompts = list(dataset["prompt"])
        texts = [p if isinstance(p, str) else render_prompt(self.tokenizer, p) for p in prompts]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        budget = (self.args.max_length or 10**9) - self.args.max_new_tokens
        kept = [i for i, ids in enumerate(encoded) if 0 < len(ids) <= budget]
        if not kept:
            raise TrainingError(f"no prompt fits: every one is longer than max_length - max_new_tokens = {budget} "
                                f"tokens (raise --max-length or lower max_new_tokens)")
        # the other columns (e.g. `reference` for --judge-mode reference), row-aligned with the prompts
        self.columns = {name: [dataset[name][i] for i in kept] for name in dataset.column_names if name != "prompt"}
        return [prompts[i] for i in kept], [encoded[i] for i in kept], len(prompts) - len(kept)

    def total_steps(self) -> int:
        if self.args.max_steps and self.args.max_steps > 0:
            return int(self.args.max_steps)
        return max(1, math.ceil(self.args.num_train_epochs * len(self.prompts) / self.args.rollout_batch_size))

    # -- optimizer: the value head trains beside the adapter -----------------------------------
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if not any(p is self.value_head.weight for g in optimizer.param_groups for p in g["params"]):
            optimizer.add_param_group({"params": list(self.value_head.parameters()), "weight_decay": 0.0})
        return optimizer

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad] + list(self.value_head.parameters())

    # -- forward passes ------------------------------------------------------------------------
    def _score(self, input_ids, attention_mask, prompt_width: int, responses, *, values: bool,
               entropy: bool = False):
        """(log p of each completion token at the PPO temperature, values at the same positions or
        None, per-token entropies or None)."""
        if self._backbone is None:
            logits, estimates = self._forward(input_ids, attention_mask, prompt_width, values=values)
            return (ppo_math.token_logprobs(logits, responses), estimates,
                    ppo_math.entropy_from_logits(logits.detach()) if entropy else None)
        from alignment.training.packing import selected_log_probs

        positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # left padding: real tokens only
        with self.accelerator.autocast():
            hidden = self._backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                    use_cache=False).last_hidden_state
        hidden = hidden[:, prompt_width - 1:-1]  # the states that predict the completion tokens
        shape = responses.shape
        out = selected_log_probs(self._causal, hidden.reshape(-1, hidden.size(-1)), responses.reshape(-1),
                                 ("entropy",) if entropy else (), temperature=self.args.temperature)
        estimates = self.value_head(hidden.float()).squeeze(-1) if values else None
        entropies = out["entropy"].detach().view(shape) if entropy else None
        return out["log_probs"].view(shape), estimates, entropies

    def _forward(self, input_ids, attention_mask, prompt_width: int, *, values: bool):
        """(logits predicting each completion token, values at the same positions or None)."""
        width = input_ids.size(1) - prompt_width
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if "position_ids" in self._forward_keys:  # left padding: positions count real tokens only
            kwargs["position_ids"] = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        if "logits_to_keep" in self._forward_keys:
            kwargs["logits_to_keep"] = width + 1
        with self.accelerator.autocast():
            out = self.model(**kwargs, output_hidden_states=values)
        logits = out.logits[:, -(width + 1):-1] / self.args.temperature
        estimates = None
        if values:
            hidden = out.hidden_states[-1][:, prompt_width - 1:-1]
            estimates = self.value_head(hidden.float()).squeeze(-1)
        return logits, estimates

    @torch.no_grad()
    def _generate(self, prompt_ids: list[list[int]], step: int, *, salt: int = 0) -> list[list[int]]:
        responses = []
        pad = self.tokenizer.pad_token_id
        for k, part in enumerate(_chunks(len(prompt_ids), self.args.generation_batch_size)):
            batch = self.tokenizer.pad({"input_ids": prompt_ids[part]}, padding_side="left", return_tensors="pt")
            batch = batch.to(self.args.device)
            # a resumed run samples the same; salt: the reference's answers are other draws
            torch.manual_seed(self.args.seed * 7919 + step * 131 + k + salt * 104_729)
            output = self._decode_fast(batch)
            if output is None:
                output = self.model.generate(
                    **batch, do_sample=True, temperature=self.args.temperature, top_k=0, top_p=1.0,
                    max_new_tokens=self.args.max_new_tokens, pad_token_id=pad,
                    remove_invalid_values=True,  # a diverged policy is reported by the NaN guard, not by the sampler
                )[:, batch["input_ids"].size(1):]
            responses += output.tolist()
        return responses

    def _decode_fast(self, batch) -> torch.Tensor | None:
        """The completions' token ids from `prefloop generate`'s static-cache loop (rollouts.sample:
        the policy's base with its LoRA/DoRA layers in place) at the PPO temperature, full softmax
        (no top-k, no top-p); None where that loop does not apply or fails."""
        from alignment.training import rollouts

        return rollouts.sample(self.accelerator.unwrap_model(self.model), batch["input_ids"], batch["attention_mask"],
                               max_new_tokens=self.args.max_new_tokens, temperature=self.args.temperature, top_k=0,
                               top_p=1.0, stop_ids=self.stop_ids, pad_id=self.tokenizer.pad_token_id)

    @torch.no_grad()
    def rollout(self, step: int) -> Rollout:
        args = self.args
        self.model.eval()
        picked = prompt_indices(len(self.prompts), args.rollout_batch_size, step, args.seed)
        prompt_ids = [self.prompt_ids[i] for i in picked]
        raw_responses = self._generate(prompt_ids, step)

        pad = self.tokenizer.pad_token_id
        device = self.args.device
        width = max(len(r) for r in raw_responses)
        responses = torch.tensor([r + [pad] * (width - len(r)) for r in raw_responses], device=device)
        mask = ppo_math.response_mask(responses, self.stop_ids)
        prompts = self.tokenizer.pad({"input_ids": prompt_ids}, padding_side="left", return_tensors="pt").to(device)
        prompt_width = prompts["input_ids"].size(1)
        input_ids = torch.cat([prompts["input_ids"], responses], 1)
        attention_mask = torch.cat([prompts["attention_mask"], mask.long()], 1)

        logprobs, ref_logprobs, values = [], [], []
        for part in _chunks(len(picked), args.generation_batch_size):
            logprob, value, _ = self._score(input_ids[part], attention_mask[part], prompt_width, responses[part],
                                            values=True)
            logprobs.append(logprob)
            values.append(value)
            with self._reference():
                ref_logprob, _, _ = self._score(input_ids[part], attention_mask[part], prompt_width, responses[part],
                                                values=False)
            ref_logprobs.append(ref_logprob)
        logprobs, ref_logprobs, values = torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)
        for name, tensor in (("policy log-probability", logprobs), ("reference log-probability", ref_logprobs),
                             ("value", values)):
            if not torch.isfinite(tensor * mask).all():
                raise NonFiniteLoss(self.state.global_step + 1, float("nan"), what=name)

        texts = [self._decode(row, m) for row, m in zip(responses.tolist(), mask.tolist())]
        self._picked = (picked, step)  # for _score_online: the rows' columns, the reference's sampling
        raw_scores = [float(s) for s in self.reward_fn(texts, [self.prompts[i] for i in picked])]
        if len(raw_scores) != len(texts):
            raise TrainingError(f"the reward gave {len(raw_scores)} scores for {len(texts)} completions")
        scores = torch.tensor(raw_scores, device=device, dtype=torch.float32)
        if not torch.isfinite(scores).all():
            raise NonFiniteLoss(self.state.global_step + 1, float("nan"), what="reward")
        ended = self._ended(responses, mask)
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~ended).float()
        if args.score_clip is not None:
            scores = scores.clamp(-args.score_clip, args.score_clip)

        kl_coef = self.kl_controller.value
        rewards, kl = ppo_math.token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
        advantages, returns = ppo_math.gae(rewards, values, mask, gamma=args.gamma, lam=args.lam)
        advantages = ppo_math.masked_whiten(advantages, mask)
        sequence_kl = kl.sum(1)
        stats = {
            "reward": scores.mean().item(),
            "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
            "kl": sequence_kl.mean().item(),
            "kl_coef": kl_coef,
            "non_score_reward": (-kl_coef * sequence_kl).mean().item(),
            "response_length": mask.sum(1).mean().item(),
            "ended_fraction": ended.float().mean().item(),
            "value_mean": ppo_math.masked_mean(values, mask).item(),
            "return_mean": ppo_math.masked_mean(returns, mask).item(),
        }
        return Rollout(input_ids, attention_mask, prompt_width, responses, mask, logprobs, values * mask,
                       advantages, returns, stats)

    def _score_online(self, completions: list[str], prompts: list) -> list[float]:
        """A rubric or judge reward (TRL's signature) in PPO's: against the reference's answers to
        the same prompts, sampled now (or the data's references for --judge-mode reference)."""
        picked, step = self._picked
        columns = {name: [values[i] for i in picked] for name, values in self.columns.items()}
        if getattr(self.online_reward, "mode", "compare") == "reference":
            return list(self.online_reward(prompts, completions, **columns))
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), self._reference():
            raw = self._generate([self.prompt_ids[i] for i in picked], step, salt=1)
        if was_training:
            self.model.train()
        references = [self._decode(row, ppo_math.response_mask(torch.tensor([row]), self.stop_ids)[0].tolist())
                      for row in raw]
        n = len(completions)
        scores = self.online_reward(list(prompts) * 2, list(completions) + references,
                                    **{name: values * 2 for name, values in columns.items()})
        return list(scores)[:n]

    def _ended(self, responses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        last = responses.gather(1, ppo_math.last_index(mask).unsqueeze(1)).squeeze(1)
        stops = torch.tensor(sorted(self.stop_ids), device=responses.device, dtype=responses.dtype)
        return torch.isin(last, stops)

    def _decode(self, tokens: list[int], mask: list[float]) -> str:
        kept = [t for t, m in zip(tokens, mask) if m and t not in self.stop_ids]
        return self.tokenizer.decode(kept, skip_special_tokens=True).strip()

    # -- optimisation --------------------------------------------------------------------------
    def optimize(self, batch: Rollout, step: int) -> dict:
        args = self.args
        self.model.train()
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        n = batch.responses.size(0)
        sums: dict[str, float] = {}
        tokens_seen = 0.0
        for _ in range(args.ppo_epochs):
            order = torch.randperm(n, generator=generator).to(batch.responses.device)
            for minibatch in order.split(args.mini_batch_size):
                total = batch.mask[minibatch].sum().clamp(min=1)
                for micro in minibatch.split(args.per_device_train_batch_size):
                    stats, tokens = self._micro_step(batch, micro, total)
                    for key, value in stats.items():
                        sums[key] = sums.get(key, 0.0) + value * tokens
                    tokens_seen += tokens
                grad_norm = torch.nn.utils.clip_grad_norm_(self._trainable(), args.max_grad_norm or float("inf"))
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        updates = args.updates_per_step()
        out = {key: value / max(tokens_seen, 1.0) for key, value in sums.items() if key != "grad_norm"}
        out["grad_norm"] = sums["grad_norm"] / updates
        out["learning_rate"] = self.current_learning_rate()
        return out

    def current_learning_rate(self) -> float:
        """The scheduler's last learning rate (the optimizer's own for a plateau schedule)."""
        if isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            return float(self.optimizer.param_groups[0]["lr"])
        rate = self.lr_scheduler.get_last_lr()[0]
        return float(rate.item() if torch.is_tensor(rate) else rate)

    def _micro_step(self, batch: Rollout, rows: torch.Tensor, minibatch_tokens: torch.Tensor) -> tuple[dict, float]:
        args = self.args
        mask = batch.mask[rows]
        logprobs, values, entropies = self._score(batch.input_ids[rows], batch.attention_mask[rows],
                                                  batch.prompt_width, batch.responses[rows], values=True, entropy=True)
        pg_loss, clip_fraction = ppo_math.policy_loss(logprobs, batch.logprobs[rows], batch.advantages[rows], mask,
                                                      cliprange=args.cliprange)
        vf_loss, vf_clip_fraction = ppo_math.value_loss(values, batch.values[rows], batch.returns[rows], mask,
                                                        cliprange_value=args.cliprange_value)
        loss = pg_loss + args.vf_coef * vf_loss
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLoss(self.state.global_step + 1, value)
        # Each micro-batch's mean times its share of the minibatch's tokens: the accumulated
        # gradient is that of the minibatch's token mean, whatever the micro-batch size.
        tokens = float(mask.sum())
        (loss * (tokens / float(minibatch_tokens))).backward()
        with torch.no_grad():
            entropy = ppo_math.masked_mean(entropies, mask)
            approx_kl = 0.5 * ppo_math.masked_mean((logprobs - batch.logprobs[rows]) ** 2, mask)
        return {"loss": value, "policy_loss": float(pg_loss.detach()), "value_loss": float(vf_loss.detach()),
                "clip_fraction": float(clip_fraction), "value_clip_fraction": float(vf_clip_fraction),
                "entropy": float(entropy), "approx_kl": float(approx_kl)}, tokens

    # -- the loop ------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | None = None, trial=None, **_ignored) -> TrainOutput:
        args = self.args
        steps = self.total_steps()
        self.create_optimizer_and_scheduler(num_training_steps=steps * args.updates_per_step())
        self.state = TrainerState(stateful_callbacks=[
            cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)
        ])
        if resume_from_checkpoint:
            self._resume(resume_from_checkpoint)
        self.state.compute_steps(args, steps)
        self.state.init_training_references(self, steps, args.num_train_epochs, None)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        if self.skipped_prompts:
            log.warning("%d prompts are longer than max_length - max_new_tokens: left out", self.skipped_prompts)
            self.log({"skipped_prompts": float(self.skipped_prompts)})

        start, first_step = time.time(), self.state.global_step
        losses: list[float] = []
        pending: list[dict] = []
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        while self.state.global_step < steps and not self.control.should_training_stop:
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            step = self.state.global_step
            batch = self.rollout(step)
            stats = {**batch.stats, **self.optimize(batch, step)}
            self.kl_controller.update(stats["kl"], args.rollout_batch_size)
            losses.append(stats["loss"])
            pending.append(stats)
            self.state.global_step += 1
            self.state.epoch = self.state.global_step * args.rollout_batch_size / len(self.prompts)
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if self.control.should_log:
                self.log({key: sum(s[key] for s in pending) / len(pending) for key in pending[-1]})
                pending = []
            if self.control.should_save:
                self.save_checkpoint()
                self.control = self.callback_handler.on_save(args, self.state, self.control)
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        self.model.eval()
        self.detach_reward()  # the run's result is the policy adapter alone
        done = self.state.global_step - first_step
        metrics = speed_metrics("train", start, num_samples=done * args.rollout_batch_size, num_steps=done)
        metrics["train_loss"] = sum(losses) / len(losses) if losses else 0.0
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    def shared_reward(self):
        """The reward scorer when it runs on the policy's base (a SharedRewardScorer), else None."""
        from alignment.training.shared_reward import SharedRewardScorer

        scorer = getattr(self.reward_fn, "scorer", None)
        return scorer if isinstance(scorer, SharedRewardScorer) else None

    def detach_reward(self) -> None:
        """Take a shared reward adapter off the policy (it can score no more after)."""
        scorer = self.shared_reward()
        if scorer is not None:
            scorer.detach()

    # -- checkpoints: the adapter (Trainer), plus the value head and the KL coefficient ----------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        from alignment.training.shared_reward import hidden_from_save

        with hidden_from_save(self.accelerator.unwrap_model(self.model)):  # the policy adapter only
            super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            from safetensors.torch import save_file

            target = Path(output_dir or self.args.output_dir)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                      str(target / VALUE_HEAD_FILE))
            (target / PPO_STATE_FILE).write_text(json.dumps({"kl_coef": self.kl_controller.value}))

    def save_checkpoint(self) -> None:
        """`checkpoint-<step>/`: transformers' own checkpointing when `alignment._compat` allows,
        else the same files written through public calls."""
        if compat.fast_path_enabled("checkpoints"):
            compat.save_checkpoint(self)
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = Path(self.args.output_dir)
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self.save_model(str(folder))
        if not self.args.should_save:
            return
        if not self.args.save_only_model:
            torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)
            torch.save(self.lr_scheduler.state_dict(), folder / SCHEDULER_FILE)
        for callback in self.callback_handler.callbacks + [self.control]:
            if isinstance(callback, ExportableState):
                name = type(callback).__name__
                if isinstance(self.state.stateful_callbacks.get(name), list):
                    self.state.stateful_callbacks[name].append(callback.state())
                else:
                    self.state.stateful_callbacks[name] = callback.state()
        self.state.save_to_json(str(folder / TRAINER_STATE_FILE))
        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _load_checkpoint(self, checkpoint: str) -> None:
        if compat.fast_path_enabled("checkpoints"):
            compat.load_checkpoint(self, checkpoint)
            return
        folder = Path(checkpoint)
        model = self.accelerator.unwrap_model(self.model)
        adapter = model.active_adapter
        # PEFT's public loader, into the adapter being trained (its weights replaced in place)
        model.load_adapter(str(folder), adapter_name=adapter, is_trainable=True)
        model.set_adapter(adapter)
        device = self.args.device
        if (folder / OPTIMIZER_FILE).is_file():
            self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location=device, weights_only=True))
        if (folder / SCHEDULER_FILE).is_file():
            self.lr_scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, weights_only=True))

    def _resume(self, checkpoint: str) -> None:
        from safetensors.torch import load_file

        folder = Path(checkpoint)
        if not (folder / VALUE_HEAD_FILE).is_file():
            raise TrainingError(f"{checkpoint}: no {VALUE_HEAD_FILE} (not a PPO checkpoint)")
        self._load_checkpoint(checkpoint)
        self.value_head.load_state_dict(load_file(str(folder / VALUE_HEAD_FILE), device=str(self.args.device)))
        self.kl_controller.value = json.loads((folder / PPO_STATE_FILE).read_text())["kl_coef"]
        self.state = TrainerState.load_from_json(str(folder / TRAINER_STATE_FILE))


def resolve(settings: dict, engine) -> dict:
    """The reward source checked before the run row exists: rubric rules and the judge as GRPO's
    (online_rewards.resolve), a reward run, model or function as PPO always had them."""
    if settings.get("reward_rubric") is not None or settings.get("reward_judge"):
        return online_rewards.resolve(settings, engine, method="ppo")
    return ppo_reward.resolve(settings, engine)


METHOD = MethodSpec(
    name="ppo",
    config_class=PPOConfig,
    trainer_class=PPOTrainer,
    export="prompts",
    required_columns=(("prompt",),),
    resolve=resolve,
)
