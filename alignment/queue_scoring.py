"""Margins for the `uncertainty` queue order (feedback_store.queue_strategies.order_by_margin).

A pair's margin is how much a model prefers response a to response b:

- a reward model (alignment.reward_scoring.RewardScorer, or anything with
  `score_batch(prompts, responses)`): r(a) - r(b);
- a DPO-trained policy: its implicit reward difference
  beta * [(log pi(a) - log ref(a)) - (log pi(b) - log ref(b))], with pi the policy (base model
  + its adapter) and ref the base model (the adapter switched off), log-probabilities summed
  over the response's tokens (anything with `logprobs(prompts, responses, adapter=bool)`).

A margin near zero is a pair the model cannot call: the pairs worth a human's vote first.
The store never imports this module: `prefloop queue prioritize --by uncertainty` computes the
margins here and hands them to the store.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_BETA = 0.1  # TRL's DPOConfig default; the ranking does not depend on it


def reward_margins(scorer, pairs: Sequence, *, batch_size: int = 16) -> dict[int, float]:
    """{comparison id: r(a) - r(b)} for `pairs` (feedback_store.judge_runs.PairTexts)."""
    prompts = [p.conversation for p in pairs for _ in (0, 1)]
    responses = [text for p in pairs for text in (p.text_a, p.text_b)]
    scores = scorer.score_batch(prompts, responses, batch_size=batch_size) if pairs else []
    return {p.comparison_id: float(scores[2 * i] - scores[2 * i + 1]) for i, p in enumerate(pairs)}


def dpo_margins(model, pairs: Sequence, *, beta: float = DEFAULT_BETA) -> dict[int, float]:
    """{comparison id: implicit reward of a - implicit reward of b} under a DPO policy."""
    prompts = [p.conversation for p in pairs for _ in (0, 1)]
    responses = [text for p in pairs for text in (p.text_a, p.text_b)]
    if not pairs:
        return {}
    policy = model.logprobs(prompts, responses, adapter=True)
    reference = model.logprobs(prompts, responses, adapter=False)
    implicit = [beta * (p - r) for p, r in zip(policy, reference)]
    return {p.comparison_id: float(implicit[2 * i] - implicit[2 * i + 1]) for i, p in enumerate(pairs)}


class PolicyLogProbs:
    """Summed response log-probabilities of a causal LM with a LoRA adapter, with the adapter on
    (the policy) or off (its reference, the base model)."""

    def __init__(self, model, tokenizer, *, max_length: int | None = None) -> None:
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def load(cls, base_model: str, adapter_path: str, *, device: str = "auto") -> PolicyLogProbs:
        from alignment.models import ModelSpec, load_model

        model, tokenizer = load_model(ModelSpec(base_model, device=device, adapter_path=adapter_path))
        return cls(model, tokenizer)

    def _ids(self, prompt, response: str) -> tuple[list[int], int]:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if self.tokenizer.chat_template is not None:
            head = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                      return_dict=True)["input_ids"]
        else:
            head = self.tokenizer("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: ")["input_ids"]
        tail = self.tokenizer(response, add_special_tokens=False)["input_ids"] + (
            [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])
        ids = list(head) + list(tail)
        if self.max_length:
            ids = ids[: self.max_length]
        return ids, min(len(head), len(ids))

    def logprobs(self, prompts: Sequence, responses: Sequence[str], *, adapter: bool = True,
                 batch_size: int = 8) -> list[float]:
        import contextlib

        import torch

        device = next(self.model.parameters()).device
        switch = contextlib.nullcontext() if adapter else self.model.disable_adapter()
        out: list[float] = []
        with torch.no_grad(), switch:
            for start in range(0, len(prompts), batch_size):
                items = [self._ids(p, r) for p, r in zip(prompts[start:start + batch_size],
                                                         responses[start:start + batch_size])]
                width = max(len(ids) for ids, _ in items)
                pad = self.tokenizer.pad_token_id or 0
                input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in items], device=device)
                attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in items], device=device)
                logits = self.model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, input_ids[:, 1:, None])[..., 0]
                positions = torch.arange(width - 1, device=device)[None, :]
                starts = torch.tensor([s for _, s in items], device=device)[:, None]
                mask = (positions >= starts - 1) & (attention[:, 1:] > 0)
                out += (logp * mask).sum(dim=1).tolist()
        return out


def load_margin_source(engine, *, reward_run: int | None = None, policy: str | None = None,
                       beta: float = DEFAULT_BETA):
    """A function pairs -> margins: from finished reward run `reward_run` (default: the latest
    finished reward run) or from DPO policy `policy` (a name, or "latest")."""
    if policy is not None:
        from alignment.training.runs import find_policy

        found = find_policy(engine, policy)
        if not found.adapter_path:
            raise ValueError(f"policy {found.name!r} has no adapter: its implicit reward needs a DPO-trained adapter")
        model = PolicyLogProbs.load(found.base_model, found.adapter_path)
        return lambda pairs: dpo_margins(model, pairs, beta=beta)
    from alignment.reward_scoring import RewardScorer
    from alignment.training.ppo_reward import reward_run_path

    run_id = reward_run if reward_run is not None else latest_finished_reward_run(engine)
    if run_id is None:
        raise ValueError("no finished reward run: train one (prefloop train reward) or give --policy")
    scorer = RewardScorer.load(reward_run_path(engine, run_id))
    return lambda pairs: reward_margins(scorer, pairs)


def latest_finished_reward_run(engine) -> int | None:
    from sqlmodel import col, select

    from feedback_store.db import session_scope
    from feedback_store.models import RunStatus, TrainingRun

    with session_scope(engine) as session:
        return session.exec(
            select(TrainingRun.id).where(TrainingRun.kind == "reward", TrainingRun.status == RunStatus.done)
            .order_by(col(TrainingRun.id).desc())
        ).first()
