"""Online methods' rollouts through `prefloop generate`'s static-cache decoding loop
(alignment/decoding.py) instead of transformers' `generate`: PPO's, and GRPO's and RLOO's in
place of TRL's regular (non-vLLM) generation path.

The loop runs on the policy's base model, whose LoRA/DoRA layers are in place there, so it
samples the policy (or the reference, with the adapter switched off), in eval mode for the
call: a model training with gradient checkpointing would otherwise drop its KV cache at every
token. The distribution is `generate`'s (tests/test_decoding.py); the random draws are not.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import torch

log = logging.getLogger("prefloop.train")


def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           temperature: float, top_k: int, top_p: float, stop_ids: Collection[int],
           pad_id: int | None) -> torch.Tensor | None:
    """New token ids (batch, <= max_new_tokens) for left-padded prompts, pad after a row's first
    stop token; None where the loop does not apply (another architecture, a quantized base, an
    untested transformers, PREFLOOP_DECODE=generate) or fails (non-finite logits of a diverged
    policy: the caller's `generate` then drops them and its NaN guard reports the run)."""
    from alignment import decoding

    base = model.get_base_model() if hasattr(model, "peft_config") else model
    if not decoding.supports(base):
        return None
    config = base.generation_config
    saved_top_k, was_training = config.top_k, base.training
    config.top_k = top_k  # the loop reads top-k from the generation config (0: the full softmax)
    base.eval()
    try:
        return decoding.decode(base, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, stop_ids=stop_ids, pad_id=pad_id)
    except RuntimeError as error:
        log.debug("rollout: the decoding loop failed (%s); sampling with generate", error)
        return None
    finally:
        config.top_k = saved_top_k
        base.train(was_training)


def completions(tokens: torch.Tensor, stop_ids: Collection[int]) -> list[list[int]]:
    """Each row up to and including its first stop token (all of it when it never stops): what
    TRL's generation path keeps of `generate`'s output."""
    stops = set(stop_ids)
    rows = []
    for row in tokens.tolist():
        end = next((i for i, token in enumerate(row) if token in stops), len(row) - 1)
        rows.append(row[:end + 1])
    return rows
