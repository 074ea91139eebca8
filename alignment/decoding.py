"""A lean decoding loop for Llama-family causal LMs (Llama, Mistral, Qwen2: the embedded default
is a Llama) that `generate_local` uses in place of transformers' `generate` when it can.

    tokens = decode(model, input_ids, attention_mask, max_new_tokens=128, min_new_tokens=0,
                    temperature=0.7, top_p=0.95, stop_ids={2}, pad_id=2)   # (batch, <= 128) ids

Same model calls, same numbers, less around them. The prompt goes through the model's own
`forward` (one pass, positions counted over real tokens as `generate` does for left padding);
each new token then runs through the layers' own modules (norms, projections, rotary
embedding, MLP: whatever Linear is there, float or dynamically quantized) with

- a prompt that stands in several rows (a GRPO group, `--samples 2`, best-of-n) is encoded
  once, its key/value cache copied to its rows.
- a static key/value cache: one buffer per layer, allocated once for prompt + budget; a step
  writes one column and attends over a view of the filled columns. `generate`'s dynamic cache
  concatenates (copies) every layer's whole cache at every step.
- attention as transformers' sdpa path computes it for one query token (grouped query heads
  folded into the kv heads, a boolean padding mask; no mask and `enable_gqa` when nothing is
  padded), so greedy decoding gives `generate`'s tokens (tests/test_decoding.py checks this).
- the sampling rules of `generate` with the same defaults: the generation config's
  `suppress_tokens` are never emitted, the end tokens not before `min_new_tokens`, then temperature, top-k (the model's generation config, else
  transformers' default 50), top-p; but the nucleus is found among the top-k candidates
  instead of sorting the whole vocabulary at each step. The distribution is the same; the
  random draws are not, so a seed gives other (equally reproducible) samples than `generate`.
- a finished row is fed padding (its tokens are not kept) and the loop stops when every row
  has finished.

Anything else (another architecture, a PEFT wrapper, a generation config asking for
repetition penalties and the like, `PREFLOOP_DECODE=generate` in the environment) goes to
`generate`: `supports(model)` says which.
"""

from __future__ import annotations

import os
from collections.abc import Collection

import torch
import torch.nn.functional as F

from alignment._compat import transformers as compat_transformers

ENV = "PREFLOOP_DECODE"  # "generate": always transformers' generate
# The attention alignment/training/packing.py registers for packed training batches: plain SDPA
# for any other call, so a model being trained on packed rows still decodes here.
PACKED_SDPA = "prefloop_sdpa"
ARCHITECTURES = {"llama", "mistral", "qwen2"}
TRANSFORMERS_DEFAULT_TOP_K = 50  # GenerationConfig._get_default_generation_params()["top_k"]
# generation-config fields that change decoding, with the values under which this loop is exact
NEUTRAL = {
    "repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
    "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0), "min_p": (None,), "exponential_decay_length_penalty": (None,),
    "sequence_bias": (None,), "renormalize_logits": (None, False), "num_beams": (None, 1),
}


def supports(model) -> bool:
    """Whether `decode` computes what `generate` would for this model."""
    if os.environ.get(ENV, "").strip().lower() == "generate":
        return False
    if not compat_transformers.fast_path_enabled("decoding"):  # an untested transformers: generate
        return False
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in ARCHITECTURES or type(model).__name__ not in {
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
    }:
        return False  # PEFT wrappers and other heads keep generate
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default" or getattr(config, "pretraining_tp", 1) != 1:
        return False
    if compat_transformers.attn_implementation(model) not in ("sdpa", "eager", PACKED_SDPA, None):
        return False
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        return False  # bitsandbytes layers: keep the path they are tested with
    generation = getattr(model, "generation_config", None)
    for name, neutral in NEUTRAL.items():
        if getattr(generation, name, None) not in neutral:
            return False
    return True


def _top_k(model) -> int:
    value = getattr(getattr(model, "generation_config", None), "top_k", None)
    return TRANSFORMERS_DEFAULT_TOP_K if value is None else int(value)


def sample_next(
    logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float, generator=None
) -> torch.Tensor:
    """One token per row of float `logits` (batch, vocab): temperature, top-k (0 = all), then
    the smallest set of the most likely tokens holding `top_p` of the mass, as `generate`'s
    TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper do."""
    vocab = logits.shape[-1]
    k = vocab if top_k <= 0 else min(top_k, vocab)
    if k == vocab and top_p >= 1.0:  # the whole softmax: nothing to rank (GRPO's default)
        return _draw(torch.softmax(logits / temperature, dim=-1), generator)
    values, indices = torch.topk(logits, k, dim=-1)  # sorted, descending
    probs = torch.softmax(values / temperature, dim=-1)
    if top_p < 1.0:
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each
        probs = probs.masked_fill(before >= top_p, 0.0)
        probs[:, 0] = torch.where(probs[:, 0] > 0, probs[:, 0], 1.0)  # at least one token
    return indices.gather(-1, _draw(probs, generator)[:, None]).squeeze(-1)


def _draw(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """One index per row of non-negative weights, with probability proportional to its weight:
    a uniform draw located in the running sum (inverse CDF). The distribution of
    `torch.multinomial(probs, 1)`, several times cheaper over a whole vocabulary on a CPU (one
    cumulative sum instead of an exponential draw per entry); a zero weight is never drawn."""
    cumulative = torch.cumsum(probs, dim=-1)
    total = cumulative[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=probs.dtype) * total
    return torch.searchsorted(cumulative, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


@torch.inference_mode()
def decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Collection[int] = (),
    pad_id: int | None = None,
) -> torch.Tensor:
    """New token ids (batch, n <= max_new_tokens) for left-padded prompts; after a row's first
    stop token its columns hold `pad_id` (as `generate`'s output does)."""
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    config = model.config
    base = model.model
    layers = base.layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    groups = heads // kv_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    pad = torch.tensor(pad_id if pad_id is not None else (int(stop[0]) if len(stop) else 0), device=device)
    top_k = _top_k(model)
    suppressed = list(getattr(getattr(model, "generation_config", None), "suppress_tokens", None) or [])

    mask = attention_mask.to(torch.long)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # what generate passes
    # A prompt sampled several times (a GRPO group, `--samples`, best-of-n) is encoded once and
    # its key/value cache and last logits copied to each of its rows.
    distinct, row_of = torch.unique(torch.cat([input_ids, mask], dim=1), dim=0, return_inverse=True)
    if len(distinct) == batch:
        row_of = None
    else:
        input_ids, mask, positions = (x[_first_rows(row_of, len(distinct))] for x in (input_ids, mask, positions))
    output = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   logits_to_keep=1)
    cache = output["cache"] if "cache" in output else output["past_key_values"]  # 5.x / 4.x name
    logits = output["logits"][:, -1].float()
    del output
    if row_of is not None:
        logits, mask, positions = logits[row_of], mask[row_of], positions[row_of]
    total = prompt_len + max_new_tokens
    keys, values = [], []
    for layer_cache in cache.layers:
        k, v = layer_cache.keys, layer_cache.values
        kbuf = k.new_empty(batch, k.shape[1], total, k.shape[3])
        vbuf = v.new_empty(batch, v.shape[1], total, v.shape[3])
        kbuf[:, :, :prompt_len] = k if row_of is None else k[row_of]
        vbuf[:, :, :prompt_len] = v if row_of is None else v[row_of]
        keys.append(kbuf)
        values.append(vbuf)
    del cache

    full_mask = torch.zeros(batch, total, dtype=torch.bool, device=device)
    full_mask[:, :prompt_len] = mask.bool()
    padded = not bool(mask.all())
    next_position = positions[:, -1:] + 1
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    new_tokens = []
    scaling = None
    for step in range(max_new_tokens):
        if suppressed:
            logits[:, suppressed] = float("-inf")
        if step < min_new_tokens and len(stop):
            logits[:, stop] = float("-inf")
        if temperature > 0:
            token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        else:
            token = logits.argmax(-1)
        token = torch.where(unfinished, token, pad)
        new_tokens.append(token)
        if len(stop):
            unfinished &= ~torch.isin(token, stop)
        if step == max_new_tokens - 1 or not bool(unfinished.any()):
            break
        column = prompt_len + step
        full_mask[:, column] = True
        length = column + 1
        attn_mask = full_mask[:, None, None, :length] if padded else None
        hidden = base.embed_tokens(token[:, None])
        cos, sin = base.rotary_emb(hidden, next_position)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for index, layer in enumerate(layers):
            attn = layer.self_attn
            if scaling is None:
                scaling = getattr(attn, "scaling", head_dim**-0.5)
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, 1, heads, head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, 1, kv_heads, head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, 1, kv_heads, head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys[index][:, :, column : column + 1] = k
            values[index][:, :, column : column + 1] = v
            key, value = keys[index][:, :, :length], values[index][:, :, :length]
            if attn_mask is None:
                out = F.scaled_dot_product_attention(q, key, value, scale=scaling, enable_gqa=groups > 1)
            else:  # transformers' pack_gqa: the group's query heads as rows of one kv head
                packed = q.reshape(batch, kv_heads, groups, head_dim)
                out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attn_mask, scale=scaling)
                out = out.reshape(batch, heads, 1, head_dim)
            out = out.transpose(1, 2).reshape(batch, 1, heads * head_dim)
            hidden = residual + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = base.norm(hidden)
        logits = model.lm_head(hidden[:, -1]).float()
        next_position = next_position + 1
    return torch.stack(new_tokens, dim=1)


def _first_rows(row_of: torch.Tensor, count: int) -> torch.Tensor:
    """For each of `count` distinct rows, the index of its first occurrence in `row_of`."""
    first = torch.full((count,), len(row_of), dtype=torch.long, device=row_of.device)
    return first.scatter_reduce(0, row_of, torch.arange(len(row_of), device=row_of.device), reduce="amin")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
