"""Scores from a trained reward model, for PPO and active selection of what to label next.

    scorer = RewardScorer.load("runs/reward-4/reward_model")
    scorer.score("What is the capital of France?", "Paris.")            # one float
    scorer.score_batch(prompts, responses, batch_size=16)               # a list of floats

A prompt is a string (one user turn) or a chat (a list of {"role", "content"}); it is rendered
exactly as in training: the model's chat template around prompt + response, or "role: content"
lines for a model without one (an encoder scorer).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from alignment.models.errors import ModelError

MANIFEST = "prefloop_run.json"


def _messages(prompt: str | Sequence[dict]) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


class RewardScorer:
    """A reward model in eval mode with its tokenizer; scores are the raw head outputs."""

    def __init__(self, model, tokenizer, *, max_length: int | None = None) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length = max_length
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.sep_token

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto", quantize: str | None = None) -> "RewardScorer":
        """From a reward run's output directory (the base model and head are read from its manifest)."""
        from alignment.models import ModelSpec, load_model

        path = Path(path)
        manifest_file = path / MANIFEST
        if not manifest_file.is_file():
            raise ModelError(f"{path}: not a prefloop reward model (no {MANIFEST}); train one with prefloop train reward")
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("head") != "reward":
            raise ModelError(f"{path}: holds a {manifest.get('method')} policy, not a reward model")
        saved = manifest.get("model_spec", {})
        if manifest.get("adapter_kind") == "model":  # fully fine-tuned: the directory is the model
            spec = ModelSpec(str(path), quantize=quantize or "none", device=device)
        else:
            spec = ModelSpec(saved.get("model", manifest["base_model"]), quantize=quantize or saved.get("quantize", "auto"),
                             device=device, adapter_path=str(path))
        model, _ = load_model(spec, head="reward")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        return cls(model, tokenizer, max_length=manifest.get("max_length"))

    def token_ids(self, prompt: str | Sequence[dict], response: str) -> list[int]:
        """The ids the reward trainer saw for this pair (TRL's tokenization of a reward example)."""
        messages = _messages(prompt) + [{"role": "assistant", "content": response}]
        if self.tokenizer.chat_template is not None:
            ids = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + (self.tokenizer.eos_token or "")
            ids = self.tokenizer(text)["input_ids"]
        return list(ids)[: self.max_length] if self.max_length else list(ids)

    def score(self, prompt: str | Sequence[dict], response: str) -> float:
        return self.score_batch([prompt], [response])[0]

    @torch.no_grad()
    def score_batch(self, prompts: Sequence, responses: Sequence[str], *, batch_size: int = 16) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(prompts), batch_size):
            ids = [self.token_ids(p, r) for p, r in zip(prompts[start : start + batch_size],
                                                         responses[start : start + batch_size])]
            batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding_side="right").to(device)
            logits = self.model(**batch, use_cache=False).logits
            scores += logits[:, 0].float().tolist()
        return scores


def score(prompt: str | Sequence[dict], response: str, *, model_path: str | Path) -> float:
    """One score from the reward model at `model_path` (loads it each call: use RewardScorer for many)."""
    return RewardScorer.load(model_path).score(prompt, response)
