"""The arithmetic of PPO for language models, as plain tensor functions (tested against loops).

Shapes: (batch, response tokens); `mask` is 1 on a response's real tokens (up to and including
its end token) and 0 on the padding after it.

    mask = response_mask(tokens, stop_ids)
    rewards, kl = token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    advantages = masked_whiten(advantages, mask)
    pg, clipped = policy_loss(new_logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    vf, vclipped = value_loss(new_values, old_values, returns, mask, cliprange_value=0.2)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the unmasked entries (0 when there is a single one)."""
    mean = masked_mean(values, mask)
    n = mask.sum()
    squares = ((values - mean) ** 2 * mask).sum()
    return squares / (n - 1) if n > 1 else squares * 0


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """Zero mean (unless shift_mean=False), unit variance over the unmasked entries; masked ones become 0."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def response_mask(tokens: torch.Tensor, stop_ids: Iterable[int]) -> torch.Tensor:
    """1 on each row's tokens up to and including its first stop token, 0 after it."""
    stops = torch.tensor(sorted(set(stop_ids)), dtype=tokens.dtype, device=tokens.device)
    is_stop = torch.isin(tokens, stops) if stops.numel() else torch.zeros_like(tokens, dtype=torch.bool)
    # stops strictly before position t: t is past the end
    before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    return (before == 0).to(torch.float32)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (0 for an empty row)."""
    return (mask.sum(1).long() - 1).clamp(min=0)


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token rewards, per-token KL estimate): each token pays kl_coef * (log pi - log ref) and
    the sequence's score is added at its last real token."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(scores.size(0), device=scores.device)
    rewards[rows, last_index(mask)] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation: (advantages, returns = advantages + values). The value
    after a response's last token is 0 (the episode ends there)."""
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    length = rewards.size(1)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                *, cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped surrogate loss, share of tokens where the clip was binding)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               *, cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped value loss, share of tokens where the clipped error was the larger): the new value
    may move at most cliprange_value from the rollout's, as in PPO's reference implementation."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's categorical distribution."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) at each position, without materialising a second vocabulary-sized tensor."""
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@dataclass
class KLController:
    """The KL coefficient: fixed, or adapted towards `target` (Ziegler et al. 2019): moved by at most
    20% of the error per `horizon` episodes."""

    value: float
    target: float | None = None
    horizon: int = 10_000

    def update(self, kl: float, n_episodes: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_episodes / self.horizon
        return self.value
