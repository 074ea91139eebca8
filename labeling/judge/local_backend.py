"""A judge that runs in-process on a local causal LM (the embedded default model, or any).

Requests from the runner's workers are gathered into batches (up to `batch_size`, waiting a
few milliseconds for stragglers) and each batch runs as one padded forward pass in a worker
thread, so the event loop keeps collecting the next batch meanwhile.

Every prompt of a template begins with the same system prompt and instructions (about half of
a short comparison's tokens): their keys and values are computed once per judge and copied
into each batch, which then runs only the rest of its prompts (`alignment.prefix_cache`).

Two modes:
- "choice" (default): the template's prompt, the assistant turn opened with "[[", and one
  forward pass; the verdict is the most probable of the letters A, B, C as the next token,
  and its probability among the three is the confidence. Always a readable verdict, which is
  what a small local model needs.
- "generate": greedy generation of up to `max_new_tokens`, parsed like any remote judge's
  text (a reply cut at the limit is a parse failure).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from labeling.judge.backends import JudgeReply, JudgeRequest
from labeling.judge.parsing import TokenLogprob

LETTERS = ("A", "B", "C")
VERDICT_PREFIX = "[["


@dataclass(frozen=True)
class LocalJudgeConfig:
    model: str = field(default="default", metadata={"help": "'default' (embedded SmolLM2-135M-Instruct), a model id or a local path"})
    mode: Literal["choice", "generate"] = field(default="choice", metadata={"help": "choice: score [[A]]/[[B]]/[[C]] in one pass; generate: generate and parse"})
    batch_size: int = field(default=16, metadata={"help": "judge requests per forward pass"})
    max_new_tokens: int = field(default=64, metadata={"help": "generate mode: tokens per reply"})
    linger_s: float = field(default=0.005, metadata={"help": "how long a batch waits for more requests"})
    prefix_cache: bool = field(
        default=True, metadata={"help": "compute the template's shared system prompt once and reuse its keys/values"}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "weights dtype: float32, bfloat16, float16; auto = bfloat16 where the hardware "
                          "computes it natively (CUDA, CPUs with AMX/AVX512-BF16), else float32"},
    )

    def __post_init__(self) -> None:
        if self.mode not in ("choice", "generate"):
            raise ValueError(f"local judge mode must be 'choice' or 'generate' (got {self.mode!r})")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {self.batch_size})")


class LocalJudge:
    kind = "local"
    uses_template = True

    def __init__(self, model, tokenizer, config: LocalJudgeConfig = LocalJudgeConfig(), *, model_id: str | None = None):
        from alignment.generation import stop_token_ids

        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.model_id = model_id or f"local:{config.model}"
        self.max_output_tokens = 1 if config.mode == "choice" else config.max_new_tokens
        # Enough requests in flight to fill one batch while the previous one runs.
        self.preferred_concurrency = 2 * config.batch_size
        self._letter_ids = _letter_token_ids(tokenizer) if config.mode == "choice" else None
        self._stop_ids = stop_token_ids(model, tokenizer)
        # Shared prompt prefixes: their token ids by leading messages, and their keys/values.
        self._prefix_ids_by_messages: dict[tuple, tuple[int, ...]] = {}
        self._prefix_kvs: dict[tuple[int, ...], object] = {}
        self._pending: asyncio.Queue | None = None
        self._batcher: asyncio.Task | None = None
        self.batches: list[int] = []  # sizes of the batches run (for tests and the benchmark)
        self.cached_prompt_tokens = 0  # prompt tokens served from a prefix cache, not recomputed

    @classmethod
    def load(cls, config: LocalJudgeConfig = LocalJudgeConfig(), **spec_options) -> "LocalJudge":
        from dataclasses import replace

        from alignment.models.loading import load_model, resolve_model_path
        from alignment.models.spec import ModelSpec, inference_dtype

        spec = ModelSpec(model=config.model, **{"dtype": config.dtype, **spec_options})
        model, tokenizer = load_model(replace(spec, dtype=inference_dtype(spec)))
        name = Path(resolve_model_path(config.model)[0]).name if spec.is_default else config.model
        return cls(model, tokenizer, config, model_id=f"local:{name}")

    async def judge(self, request: JudgeRequest) -> JudgeReply:
        if self._batcher is None:
            self._pending = asyncio.Queue()
            self._batcher = asyncio.create_task(self._batch_loop())
        future = asyncio.get_running_loop().create_future()
        await self._pending.put((request, future))
        return await future

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._pending.get()]
            deadline = loop.time() + self.config.linger_s
            while len(batch) < self.config.batch_size:
                try:
                    batch.append(self._pending.get_nowait())
                except asyncio.QueueEmpty:
                    if loop.time() >= deadline:
                        break
                    await asyncio.sleep(self.config.linger_s / 5)
            live = [(r, f) for r, f in batch if not f.done()]  # a cancelled caller needs no answer
            if not live:
                continue
            try:
                replies = await asyncio.to_thread(self.run_batch, [r.messages for r, _ in live])
            except Exception as error:  # noqa: BLE001 - every caller of the batch gets the error
                for _, future in live:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), reply in zip(live, replies):
                if not future.done():
                    future.set_result(reply)

    def run_batch(self, conversations: Sequence[Sequence[dict]]) -> list[JudgeReply]:
        """Judge several rendered prompts in one pass (synchronous; also used by the benchmark)."""
        self.batches.append(len(conversations))
        tail = VERDICT_PREFIX if self.config.mode == "choice" else ""
        encoded = [self._split(messages, tail) for messages in conversations]
        # Rows with different prefixes (another criteria text, or no usable prefix) run apart.
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, (prefix, _) in enumerate(encoded):
            groups.setdefault(prefix, []).append(index)
        replies: list[JudgeReply | None] = [None] * len(conversations)
        run = self._choose if self.config.mode == "choice" else self._generate
        for prefix_ids, rows in groups.items():
            prefix = self._prefix_kv(prefix_ids)
            suffixes = [encoded[i][1] for i in rows]
            self.cached_prompt_tokens += len(prefix_ids) * len(rows)
            for i, reply in zip(rows, run(prefix, suffixes)):
                replies[i] = reply
        return replies  # type: ignore[return-value]

    def _split(self, messages: Sequence[dict], tail: str) -> tuple[tuple[int, ...], list[int]]:
        """(shared prefix ids, the rest) of a rendered judge prompt; the prefix is () when the
        cache is off or when tokenizing the whole prompt does not start with the prefix's tokens
        (a token spanning the boundary): then the row runs uncached, with the same result."""
        from alignment.generation import render_prompt

        ids = self._tokens(render_prompt(self.tokenizer, list(messages)) + tail)
        prefix = self._prefix_ids(messages) if self.config.prefix_cache else ()
        if prefix and len(ids) > len(prefix) and tuple(ids[: len(prefix)]) == prefix:
            return prefix, ids[len(prefix) :]
        return (), ids

    def _prefix_ids(self, messages: Sequence[dict]) -> tuple[int, ...]:
        """The tokens before the last message's content: the system prompt and instructions,
        the same for every comparison judged with one template and criteria."""
        from alignment.generation import render_prompt

        key = (*((m["role"], m["content"]) for m in messages[:-1]), messages[-1]["role"])
        if key not in self._prefix_ids_by_messages:
            # The tokens the chat template puts before the last message whatever its content
            # (compared as tokens: a space before the content may merge into its first token).
            last = messages[-1]
            probes = [self._tokens(render_prompt(self.tokenizer, [*messages[:-1], {**last, "content": c}])) for c in "ab"]
            common = next((i for i, (x, y) in enumerate(zip(*probes)) if x != y), min(map(len, probes)))
            self._prefix_ids_by_messages[key] = tuple(probes[0][:common])
            _bound(self._prefix_ids_by_messages)
        return self._prefix_ids_by_messages[key]

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prefix_kv(self, ids: tuple[int, ...]):
        from alignment.prefix_cache import PrefixKV

        if ids not in self._prefix_kvs:
            self._prefix_kvs[ids] = PrefixKV.compute(self.model, ids)
            _bound(self._prefix_kvs)
        return self._prefix_kvs[ids]

    def _choose(self, prefix, suffixes: list[list[int]]) -> list[JudgeReply]:
        import torch

        from alignment.prefix_cache import last_logits

        logits = last_logits(self.model, prefix, suffixes)
        logprobs = torch.log_softmax(logits, dim=-1)[:, list(self._letter_ids)].tolist()
        replies = []
        for row, suffix in zip(logprobs, suffixes):
            best = max(range(len(LETTERS)), key=row.__getitem__)
            letter = LETTERS[best]
            alternatives = {LETTERS[i]: row[i] for i in range(len(LETTERS)) if i != best}
            tokens = [
                TokenLogprob(VERDICT_PREFIX, 0.0, {}),
                TokenLogprob(letter, row[best], alternatives),
                TokenLogprob("]]", 0.0, {}),
            ]
            replies.append(
                JudgeReply(f"[[{letter}]]", prompt_tokens=len(prefix) + len(suffix), completion_tokens=1, logprobs=tokens)
            )
        return replies

    def _generate(self, prefix, suffixes: list[list[int]]) -> list[JudgeReply]:
        from alignment.prefix_cache import greedy

        new_tokens = greedy(self.model, prefix, suffixes, self.config.max_new_tokens, self._stop_ids)
        replies = []
        for suffix, tokens in zip(suffixes, new_tokens):
            kept = tokens[:-1] if tokens and tokens[-1] in self._stop_ids else tokens
            replies.append(
                JudgeReply(
                    text=self.tokenizer.decode(kept, skip_special_tokens=True).strip(),
                    prompt_tokens=len(prefix) + len(suffix),
                    completion_tokens=len(tokens),
                    # Stopped by the limit (or, rarely, by an end token exactly at it): the text
                    # may end before its verdict, so it is not trusted to hold one.
                    truncated=len(tokens) >= self.config.max_new_tokens,
                )
            )
        return replies

    async def aclose(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
            try:
                await self._batcher
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
            self._batcher = self._pending = None


PREFIXES_KEPT = 8  # prefixes remembered per judge (one per template and criteria in use)


def _bound(memo: dict) -> None:
    """Forget the oldest entries of a memo beyond PREFIXES_KEPT."""
    while len(memo) > PREFIXES_KEPT:
        memo.pop(next(iter(memo)))


def _letter_token_ids(tokenizer) -> tuple[int, ...]:
    """The token that continues "[[" with each verdict letter (its first token, if it splits)."""
    prefix = tokenizer(VERDICT_PREFIX, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in LETTERS:
        full = tokenizer(VERDICT_PREFIX + letter, add_special_tokens=False)["input_ids"]
        rest = full[len(prefix) :] if full[: len(prefix)] == prefix else tokenizer(letter, add_special_tokens=False)["input_ids"]
        ids.append(rest[0])
    if len(set(ids)) != len(LETTERS):
        raise ValueError("the tokenizer does not tell the verdict letters A, B, C apart after '[['")
    return tuple(ids)
