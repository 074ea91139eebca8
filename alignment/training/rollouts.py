"""Online methods' rollouts through `prefloop generate`'s static-cache decoding loop
(alignment/decoding.py) instead of transformers' `generate`: PPO's, and GRPO's and RLOO's in
place of TRL's regular (non-vLLM) generation path.

The loop runs on the policy's base model, whose LoRA/DoRA layers are in place there, so it
samples the policy (or the reference, with the adapter switched off), in eval mode for the
call: a model training with gradient checkpointing would otherwise drop its KV cache at every
token. The distribution is `generate`'s (tests/test_decoding.py); the random draws are not.

With `fold_lora=True` (GRPO's and RLOO's rollouts) each plain LoRA Linear is swapped for the
duration of the call for one Linear holding W + scaling * B @ A: one matmul per projection and
token instead of three and peft's per-call bookkeeping (decoding at a GRPO group's batch of 4
reads weights, and the adapter's small matmuls cost a fifth of a step). The same function up
to float rounding; the base weights are never touched (peft's merge/unmerge would drift them),
and the folded copies (the adapted projections' size) are freed when the call returns. PPO
keeps peft's layers: its memory, not its rollout speed, is what it is tuned for.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Iterator

import torch
import torch.nn.functional as F

log = logging.getLogger("prefloop.train")


def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           temperature: float, top_k: int, top_p: float, stop_ids: Collection[int],
           pad_id: int | None, fold_lora: bool = False) -> torch.Tensor | None:
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
        with folded_lora(base) if fold_lora else contextlib.nullcontext():
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


class FoldedLinear(torch.nn.Module):
    """A LoRA Linear's function as one weight: base weight + the active adapters' deltas."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _foldable(module) -> bool:
    """A peft LoRA Linear over a plain float Linear whose active adapters are vanilla LoRA
    (no DoRA or other variant, no LoRA bias), not merged, not switched off."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(module, LoraLinear) or module.merged or module.disable_adapters or module.fan_in_fan_out:
        return False
    if type(module.get_base_layer()) is not torch.nn.Linear:
        return False
    active = [name for name in module.active_adapters if name in module.lora_A]
    return all(name not in module.lora_variant and not module.lora_bias.get(name, False) for name in active)


@contextlib.contextmanager
def folded_lora(model) -> Iterator[int]:
    """For the duration of the block, every foldable LoRA Linear of `model` is a FoldedLinear
    (yields how many); the originals are back in place afterwards, whatever happens."""
    swapped = []
    try:
        with torch.no_grad():
            for parent in list(model.modules()):
                for name, child in list(parent.named_children()):
                    if _foldable(child):
                        setattr(parent, name, _folded(child))
                        swapped.append((parent, name, child))
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def _folded(layer) -> FoldedLinear:
    base = layer.get_base_layer()
    weight = base.weight.detach()
    for adapter in [a for a in layer.active_adapters if a in layer.lora_A]:
        # peft's get_delta_weight (B @ A * scaling), fused into one new tensor
        weight = torch.addmm(weight, layer.lora_B[adapter].weight.to(weight.dtype),
                             layer.lora_A[adapter].weight.to(weight.dtype), alpha=layer.scaling[adapter])
    return FoldedLinear(weight, None if base.bias is None else base.bias.detach())
