"""Padding-free, prefix-shared batches for pairwise training (DPO and reward models).

The stock TRL collators put `prompt + chosen` and `prompt + rejected` in two rows padded to
the longest sequence of the batch, so the prompt is encoded twice and, with real preference
data (a 10-token answer next to a 400-token one), a large share of the matmuls multiply
padding. Here a whole batch is ONE row with no padding at all:

    [prompt1 | chosen1 | rejected1][prompt2 | chosen2 | rejected2] ...

positions restart per pair (the rejected tokens take the positions right after the prompt),
and attention runs per pair segment with a prefix-sharing mask: the rejected tokens see the
prompt and themselves, never the chosen ones. Every hidden state is exactly the one the
two-row layout computes (same tokens, positions and visible context), while the prompt costs
one pass instead of two and no FLOP is spent on padding.

The per-pair attention is an `AttentionInterface` function ("prefloop_sdpa") that runs one
SDPA call over all the pairs' segments side by side when the forward carries
`prefloop_segments`, and is plain SDPA (mask included) for every other call, so generation and
TRL's own paths are unchanged. Gradient checkpointing recomputes layers with the same keyword
arguments, so it stays exact.

Only the hidden states that matter go through a head: for DPO the positions that predict a
completion token (a chunked log-prob head on those rows only, `logprob_head.py`; on CPU TRL
itself runs the LM head over every position, prompt and padding included), for a reward model
the last token of each sequence.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alignment._compat import transformers as compat
from alignment.decoding import PACKED_SDPA as PACKED_ATTENTION

LOGPROB_OUTPUTS = ("entropy", "mean_logits", "is_top1")
# Vocabulary tile of the log-prob kernel: [tokens, 8192] fp32 tiles keep the transient memory
# small on CPU (TRL's default 32768-wide tile allocates ~0.5 GB per 4096 tokens).
VOCAB_CHUNK = 8192


@dataclass(frozen=True)
class PairLayout:
    """Lengths of each pair's pieces and where its segment starts in the packed row."""

    prompt_lens: list[int]
    chosen_lens: list[int]
    rejected_lens: list[int]
    starts: list[int]

    @property
    def n_pairs(self) -> int:
        return len(self.prompt_lens)


def truncate_pair(prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int], max_length: int | None):
    """TRL's `keep_start` truncation, per sequence: `prompt + completion` to `max_length` tokens."""
    if max_length is None:
        return list(prompt), list(chosen), list(rejected)
    room = max(max_length - len(prompt), 0)
    return list(prompt)[:max_length], list(chosen)[:room], list(rejected)[:room]


def split_shared_prompt(chosen: Sequence[int], rejected: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) from two full sequences: their common prefix is the prompt.

    Each completion keeps at least one token, so each sequence has its own last token."""
    limit = min(len(chosen), len(rejected)) - 1
    shared = 0
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    return list(chosen[:shared]), list(chosen[shared:]), list(rejected[shared:])


def pair_key(prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int]) -> str:
    """A stable key of one tokenized pair, for caching its reference log-probs."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (prompt, chosen, rejected):
        digest.update(len(part).to_bytes(4, "little"))
        digest.update(torch.tensor(list(part), dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


def pack_pairs(
    prompts: Sequence[Sequence[int]], chosens: Sequence[Sequence[int]], rejecteds: Sequence[Sequence[int]]
) -> tuple[dict, PairLayout]:
    """The whole batch as one row, and the per-pair attention layout (see `segment_attention`)."""
    ids: list[int] = []
    positions: list[int] = []
    starts, widths, masks = [], [], []
    for p, c, r in zip(prompts, chosens, rejecteds):
        lp, lc, lr = len(p), len(c), len(r)
        starts.append(len(ids))
        ids += list(p) + list(c) + list(r)
        positions += list(range(lp + lc)) + list(range(lp, lp + lr))
        width = lp + lc + lr
        allowed = torch.ones(width, width, dtype=torch.bool).tril()
        allowed[lp + lc :, lp : lp + lc] = False  # rejected tokens never see the chosen ones
        widths.append(width)
        masks.append(allowed)
    batch = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "segments": segment_attention(starts, widths, masks),
    }
    layout = PairLayout([len(p) for p in prompts], [len(c) for c in chosens], [len(r) for r in rejecteds], starts)
    return batch, layout


def segment_attention(starts: list[int], widths: list[int], masks: list[torch.Tensor]) -> dict:
    """How to run every pair's attention in ONE SDPA call: each segment's queries/keys gathered
    into a [segments, longest] block (`gather`, padding points at the segment's first token),
    each segment's mask in its block (a padding query sees that first token only, no real
    query sees padding), and where the real outputs sit in the flattened block (`keep`, in row
    order)."""
    n, longest = len(widths), max(widths)
    gather = torch.zeros(n, longest, dtype=torch.long)
    allowed = torch.zeros(n, 1, longest, longest, dtype=torch.bool)
    allowed[:, :, :, 0] = True
    keep = []
    for i, (start, width, mask) in enumerate(zip(starts, widths, masks)):
        gather[i] = start
        gather[i, :width] = torch.arange(start, start + width)
        allowed[i, 0, :width, :width] = mask
        keep.append(torch.arange(i * longest, i * longest + width))
    return {"gather": gather, "allowed": allowed, "keep": torch.cat(keep)}


def completion_token_index(layout: PairLayout, packed_ids: torch.Tensor):
    """For every completion token: the packed index of the hidden state that predicts it, the
    token, its sequence (chosen i -> i, rejected i -> n + i) and its position in TRL's shifted
    two-row layout (token k of a completion is predicted at `prompt_len + k - 1`)."""
    src, seq, pos, tgt = [], [], [], []
    n = layout.n_pairs
    for i, (lp, lc, lr, base) in enumerate(
        zip(layout.prompt_lens, layout.chosen_lens, layout.rejected_lens, layout.starts)
    ):
        # A chosen token is predicted by the state just before it, the first one by the prompt's
        # last token, which also predicts the first rejected token.
        src += [base + lp - 1 + k for k in range(lc)]
        src += [base + lp - 1] + [base + lp + lc + k - 1 for k in range(1, lr)]
        seq += [i] * lc + [n + i] * lr
        pos += [lp - 1 + k for k in range(lc)] + [lp - 1 + k for k in range(lr)]
        tgt.append(packed_ids[0, base + lp : base + lp + lc + lr])
    return (
        torch.tensor(src, dtype=torch.long),
        torch.cat(tgt) if tgt else torch.zeros(0, dtype=torch.long),
        torch.tensor(seq, dtype=torch.long),
        torch.tensor(pos, dtype=torch.long),
    )


def sequence_end_index(layout: PairLayout, packed_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Packed index of each sequence's score token: the n chosen sequences, then the n rejected.

    Like transformers' sequence-classification pooling, the score is read at the last token
    that is not the pad token (the pad token is often the EOS token)."""
    row = packed_ids[0].tolist()
    n = layout.n_pairs
    ends = [0] * (2 * n)
    for i, (lp, lc, lr, base) in enumerate(
        zip(layout.prompt_lens, layout.chosen_lens, layout.rejected_lens, layout.starts)
    ):
        prompt = list(range(base, base + lp))
        for slot, completion in enumerate((range(base + lp, base + lp + lc), range(base + lp + lc, base + lp + lc + lr))):
            indices = prompt + list(completion)
            last = indices[-1]
            for idx in reversed(indices):
                if pad_token_id is None or row[idx] != pad_token_id:
                    last = idx
                    break
            ends[slot * n + i] = last
    return torch.tensor(ends, dtype=torch.long)


# -- attention --------------------------------------------------------------------------------
def _packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, prefloop_segments=None,
                 **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if prefloop_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gather, keep = prefloop_segments["gather"], prefloop_segments["keep"]

    def blocks(x):  # [1, heads, row, dim] -> [segments, heads, longest, dim]
        return x[0][:, gather].transpose(0, 1)

    out, _ = sdpa_attention_forward(module, blocks(query), blocks(key), blocks(value), prefloop_segments["allowed"],
                                    dropout=dropout, scaling=scaling, is_causal=False)
    # [segments, longest, heads, dim] -> the real positions, in row order: [1, row, heads, dim]
    return out.reshape(-1, *out.shape[2:]).index_select(0, keep).unsqueeze(0), None


def use_packed_attention(model) -> bool:
    """Switch `model` to the segment-aware SDPA (plain SDPA for ordinary calls). False when the
    model's attention does not go through transformers' AttentionInterface."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if compat.attn_implementation(model) == PACKED_ATTENTION:
        return True
    if compat.attn_implementation(model) not in ("sdpa", "eager") or not compat.can_set_attn_implementation(model):
        return False
    AttentionInterface.register(PACKED_ATTENTION, _packed_sdpa)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    model.set_attn_implementation(PACKED_ATTENTION)
    return compat.attn_implementation(model) == PACKED_ATTENTION


def supports_packing(model) -> bool:
    """A causal decoder whose attention goes through transformers' AttentionInterface, on a
    transformers this module was tested with (else TRL's padded batches: see alignment._compat)."""
    if not compat.fast_path_enabled("packing"):
        return False
    config = model.config
    prefix = getattr(model, "base_model_prefix", "")
    return (
        type(model).__name__.endswith(("ForCausalLM", "ForSequenceClassification"))
        and bool(prefix) and hasattr(model, prefix)
        and not getattr(config, "is_encoder_decoder", False)
        and not hasattr(config.get_text_config(), "output_router_logits")
        and compat.attn_implementation(model) in ("sdpa", "eager", PACKED_ATTENTION)
        and compat.can_set_attn_implementation(model)
        and getattr(config, "model_type", "") not in _BIDIRECTIONAL
    )


_BIDIRECTIONAL = frozenset({"bert", "roberta", "deberta", "deberta-v2", "distilbert", "electra", "xlm-roberta",
                            "modernbert", "albert", "camembert"})


def enable_for_causal_lm(model) -> bool:
    """Switch a causal LM (under its PEFT/accelerate wrappers) to the packed attention and heads
    that the packed trainers call; False, and nothing changed, where it cannot serve packed rows."""
    base = unwrap_peft(model)
    if not (supports_packing(base) and type(base).__name__.endswith("ForCausalLM") and use_packed_attention(base)):
        return False
    add_packed_heads(base)
    return True


def unwrap_peft(model):
    """The transformers model under a PEFT wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


# -- heads ------------------------------------------------------------------------------------
def add_packed_heads(model: torch.nn.Module) -> None:
    """Let `model(..., prefloop_head=...)` return only what the pairwise losses use.

    `model` is the transformers model itself (for PEFT, `peft_model.get_base_model()`); like
    TRL's fused LM head, the patch lives on the instance, so a PEFT or DDP wrapper above it
    passes the extra keyword arguments through. Without `prefloop_head` the forward is the one
    it was before."""
    if getattr(model, "_prefloop_packed_heads", False):
        return
    previous_forward = model.forward

    def _forward(self, *args, prefloop_head=None, prefloop_index=None, prefloop_targets=None,
                 prefloop_outputs=LOGPROB_OUTPUTS, prefloop_temperature=1.0, **kwargs):
        if prefloop_head is None:
            return previous_forward(*args, **kwargs)
        for unused in ("labels", "output_attentions", "output_hidden_states", "return_dict", "fused_lm_head"):
            kwargs.pop(unused, None)
        kwargs["use_cache"] = False
        backbone = getattr(self, self.base_model_prefix)
        hidden = backbone(*args, **kwargs).last_hidden_state
        selected = hidden.reshape(-1, hidden.size(-1)).index_select(0, prefloop_index)
        if prefloop_head == "score":
            return self.score(selected).squeeze(-1)
        if prefloop_head == "logprobs":
            return selected_log_probs(self, selected, prefloop_targets, tuple(prefloop_outputs),
                                      temperature=prefloop_temperature)
        raise ValueError(f"unknown prefloop_head {prefloop_head!r}")

    compat.replace_forward(model, _forward)
    model._prefloop_packed_heads = True


def packed_model_kwargs(packed: dict, device) -> dict:
    """The forward arguments of a packed batch (a 1x1x1x1 mask keeps transformers from building
    a full-row causal mask that the per-segment attention would not use)."""
    return {
        "input_ids": packed["input_ids"].to(device),
        "position_ids": packed["position_ids"].to(device),
        "attention_mask": torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device),
        "prefloop_segments": {k: v.to(device) for k, v in packed["segments"].items()},
    }


def selected_log_probs(model, hidden: torch.Tensor, targets: torch.Tensor, outputs: tuple[str, ...], *,
                       temperature: float = 1.0) -> dict:
    """Per-token log-prob of `targets` under the LM head (logits divided by `temperature`, as TRL's
    online trainers score their samples), plus the requested extras (as in TRL's
    `FusedCausalLMOutput`: entropy, log_sum_sq_probs, mean_logits, is_top1)."""
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    from alignment.training.logprob_head import OUTPUT_NAMES, chunked_log_probs

    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear:
        config = model.config.get_text_config()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 shards the head as a DTensor
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        with maybe_gather_lm_head_ctx(weight, bias):  # DeepSpeed ZeRO-3 partitions it
            return chunked_log_probs(
                hidden, weight, bias, targets, temperature=temperature, chunk_size=VOCAB_CHUNK,
                softcap=getattr(config, "final_logit_softcapping", None),
                logit_scale=getattr(config, "logit_scale", None) or 1.0, outputs=tuple(outputs),
            )
    # A wrapped head (an adapter on lm_head, modules_to_save): call it so its own weights count.
    logits = head(hidden).float() / temperature
    log_softmax = logits.log_softmax(-1)
    result = {name: None for name in OUTPUT_NAMES}
    result["log_probs"] = log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        if "entropy" in outputs:
            result["entropy"] = -(log_softmax.exp() * log_softmax).sum(-1)
        if "log_sum_sq_probs" in outputs:
            result["log_sum_sq_probs"] = torch.logsumexp(2 * log_softmax, -1)
        if "mean_logits" in outputs:
            result["mean_logits"] = logits.mean(-1)
        if "is_top1" in outputs:
            result["is_top1"] = logits.argmax(-1) == targets
    return result


def scatter_to_rows(values: torch.Tensor | None, seq: torch.Tensor, pos: torch.Tensor, shape: tuple[int, int]):
    """Per-token values back into a [sequences, positions] grid (zeros elsewhere, differentiable)."""
    if values is None:
        return None
    grid = values.new_zeros(shape[0] * shape[1])
    grid = grid.index_put((seq * shape[1] + pos,), values)
    return grid.view(shape)


# -- single sequences (SFT) ---------------------------------------------------------------------
def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Tokens every sequence of the batch starts with (a shared system prompt, a shared question),
    leaving each sequence at least its last token of its own."""
    if len(sequences) < 2:
        return 0
    limit = min(len(s) for s in sequences) - 1
    first, shared = sequences[0], 0
    while shared < limit and all(s[shared] == first[shared] for s in sequences[1:]):
        shared += 1
    return shared


def pack_sequences(sequences: Sequence[Sequence[int]], share_prefix: bool = True) -> tuple[dict, list[list[int]]]:
    """A batch of sequences as ONE row without padding: the batch's common prefix once, then each
    sequence's own tokens, positions continuing from the prefix:

        [shared prefix | rest1 | rest2 | ...]

    Each sequence attends to the prefix and to itself (causally), so every hidden state is the one
    a padded batch computes. Returns the batch (`input_ids`, `position_ids`, `segments` for the
    per-segment attention) and, per sequence, the packed index of each of its tokens."""
    shared = common_prefix_length(sequences) if share_prefix else 0
    ids: list[int] = list(sequences[0][:shared]) if sequences else []
    positions: list[int] = list(range(shared))
    index: list[list[int]] = []
    for sequence in sequences:
        start = len(ids)
        ids += list(sequence[shared:])
        positions += list(range(shared, len(sequence)))
        index.append(list(range(shared)) + list(range(start, start + len(sequence) - shared)))
    n, longest = len(index), max(len(own) for own in index)
    gather = torch.zeros(n, longest, dtype=torch.long)
    allowed = torch.zeros(n, 1, longest, longest, dtype=torch.bool)
    allowed[:, :, :, 0] = True  # padding queries see the segment's first token only
    keep = [torch.arange(shared)]  # the prefix's outputs from the first segment, then each rest from its own
    for i, own in enumerate(index):
        width = len(own)
        gather[i] = own[0]
        gather[i, :width] = torch.tensor(own)
        allowed[i, 0, :width, :width] = torch.ones(width, width, dtype=torch.bool).tril()
        keep.append(torch.arange(i * longest + shared, i * longest + width))
    batch = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "segments": {"gather": gather, "allowed": allowed, "keep": torch.cat(keep)},
    }
    return batch, index
