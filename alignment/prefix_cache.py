"""Batched forward passes over prompts that begin with the same tokens (a judge's system prompt
and instructions): the shared prefix goes through the model once, and each batch runs only the
rest of its prompts (their suffixes) on a copy of the prefix's keys and values.

    prefix = PrefixKV.compute(model, prefix_ids)        # once; EMPTY_PREFIX: none shared
    logits = last_logits(model, prefix, suffixes)        # (batch, vocab): the next token of each
    tokens = greedy(model, prefix, suffixes, 32, stop)   # new token ids of each row

A row of a batch is laid out as [prefix | padding | suffix | new tokens]. Padding sits between
the prefix and the suffix so that every row's last token is in the last column (one
`logits_to_keep=1` pass, then one new column per decoding step); positions count real tokens
only, so a prompt gets the same numbers alone, in a batch, with or without the prefix cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


@dataclass(frozen=True)
class PrefixKV:
    """The keys and values of a token prefix, per layer, each (1, kv_heads, len(ids), head_dim).
    Read-only: batches get copies."""

    ids: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @classmethod
    def compute(cls, model, ids: Sequence[int]) -> "PrefixKV":
        if not ids:
            return EMPTY_PREFIX
        device = next(model.parameters()).device
        with torch.inference_mode():
            output = model(torch.tensor([list(ids)], device=device), use_cache=True)
        cache = output["cache"] if "cache" in output else output["past_key_values"]  # 5.x / 4.x name
        return cls(tuple(ids), tuple((layer.keys, layer.values) for layer in cache.layers))

    def __len__(self) -> int:
        return len(self.ids)


EMPTY_PREFIX = PrefixKV((), ())


def last_logits(model, prefix: PrefixKV, suffixes: Sequence[Sequence[int]], max_padding: float = 0.25) -> torch.Tensor:
    """Float logits (batch, vocab) of the token after each `prefix + suffix`.

    Processing a prompt costs the same per token in a batch of 1 or 16 on a CPU, so padding
    is pure waste: rows are sorted by length and cut into sub-batches whose padding stays
    under `max_padding` of their tokens."""
    if not suffixes:
        raise ValueError("no prompts to run")
    logits: list[torch.Tensor | None] = [None] * len(suffixes)
    with torch.inference_mode():
        for group in _length_groups([len(s) for s in suffixes], max_padding):
            for i, row in zip(group, _Batch(model, prefix, [suffixes[i] for i in group]).prefill().float()):
                logits[i] = row
        return torch.stack(logits)  # type: ignore[arg-type]


def _length_groups(lengths: Sequence[int], max_padding: float) -> list[list[int]]:
    """Indices sorted by length, cut where a group's padding would pass `max_padding` of it."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups:
            group = groups[-1]
            padded = (len(group) + 1) * lengths[i]  # the new row is the longest
            if padded - sum(lengths[j] for j in group) - lengths[i] <= max_padding * padded:
                group.append(i)
                continue
        groups.append([i])
    return groups


def greedy(
    model, prefix: PrefixKV, suffixes: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Collection[int]
) -> list[list[int]]:
    """Greedy continuation of each `prefix + suffix`: up to `max_new_tokens` ids per row, the
    first stop token included; a row goes on (unread) until every row has stopped."""
    with torch.inference_mode():
        batch = _Batch(model, prefix, suffixes, max_new_tokens)
        logits = batch.prefill()
        stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=batch.device)
        done = torch.zeros(len(suffixes), dtype=torch.bool, device=batch.device)
        columns = []
        for step in range(max_new_tokens):
            token = logits.argmax(dim=-1)
            columns.append(token)
            done |= torch.isin(token, stop)
            if step + 1 == max_new_tokens or bool(done.all()):
                break
            logits = batch.step(token)
        new = torch.stack(columns, dim=1).tolist()
    return [row[: next((k + 1 for k, t in enumerate(row) if t in stop_ids), len(row))] for row in new]


class _Batch:
    """One padded batch on a cache seeded with the prefix."""

    def __init__(self, model, prefix: PrefixKV, suffixes: Sequence[Sequence[int]], new_tokens: int = 0) -> None:
        if not suffixes or any(len(s) == 0 for s in suffixes):
            raise ValueError("every prompt needs at least one token after the shared prefix")
        self.model, self.device = model, next(model.parameters()).device
        self.cache_arg = _cache_argument(model)
        rows, width = len(suffixes), max(len(s) for s in suffixes)
        pad = getattr(model.config, "pad_token_id", None) or 0
        ids = torch.full((rows, width), pad, dtype=torch.long)
        suffix_mask = torch.zeros((rows, width), dtype=torch.long)
        for row, suffix in enumerate(suffixes):
            ids[row, width - len(suffix) :] = torch.tensor(list(suffix))
            suffix_mask[row, width - len(suffix) :] = 1
        self.ids, self.suffix_mask = ids.to(self.device), suffix_mask.to(self.device)
        self.mask = torch.cat([torch.ones((rows, len(prefix)), dtype=torch.long), suffix_mask], dim=1).to(self.device)
        self.positions = len(prefix) + (self.suffix_mask.cumsum(dim=1) - 1).clamp(min=0)
        self.cache = _seeded_cache(model, prefix, rows, len(prefix) + width + new_tokens)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        output = self.model(
            input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
            logits_to_keep=1, **{self.cache_arg: self.cache},
        )
        return output.logits[:, -1, :]

    def prefill(self) -> torch.Tensor:
        return self._forward(self.ids, self.positions)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        ones = torch.ones((len(tokens), 1), dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        self.positions = self.positions[:, -1:] + 1
        return self._forward(tokens[:, None], self.positions)


def _seeded_cache(model, prefix: PrefixKV, rows: int, capacity: int):
    """A fresh cache holding `rows` copies of the prefix, with room for `capacity` positions."""
    cache = DynamicCache(config=model.config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        # Plain full-attention layers: storage allocated once instead of a concatenation of
        # all keys and values at every decoding step. (Sliding-window and other kinds of
        # layers keep the model's own cache.)
        cache = Cache(layers=[_BufferLayer(rows, capacity) for _ in cache.layers])
    for index, (keys, values) in enumerate(prefix.layers):
        # Both kinds copy the expanded views: the PrefixKV stays intact.
        cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), index)
    return cache


class _BufferLayer(DynamicLayer):
    """A DynamicLayer that writes into (rows, heads, capacity, dim) storage allocated once."""

    def __init__(self, rows: int, capacity: int) -> None:
        super().__init__()
        self.rows, self.capacity, self.length = rows, capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        heads = key_states.shape[1]
        self.key_storage = key_states.new_empty((self.rows, heads, self.capacity, key_states.shape[-1]))
        self.value_storage = value_states.new_empty((self.rows, heads, self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.key_storage[:, :, self.length : end] = key_states
        self.value_storage[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.key_storage[:, :, :end], self.value_storage[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


def _cache_argument(model) -> str:
    """Recent transformers name the forward argument `cache`; earlier ones `past_key_values`.
    (A peft wrapper passes either on: ask the model it wraps.)"""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
