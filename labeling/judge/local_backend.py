"""A judge that runs in-process on a local causal LM (the embedded default model, or any).

Requests from the runner's workers are gathered into batches (up to `batch_size`, waiting a
few milliseconds for stragglers) and each batch runs as one padded forward pass in a worker
thread, so the event loop keeps collecting the next batch meanwhile.

Two modes:
- "choice" (default): the template's prompt, the assistant turn opened with "[[", and one
  forward pass; the verdict is the most probable of the letters A, B, C as the next token,
  and its probability among the three is the confidence. Always a readable verdict, which is
  what a small local model needs.
- "generate": greedy generation of up to `max_new_tokens` through `alignment.generation`,
  parsed like any remote judge's text (a reply cut at the limit is a parse failure).
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

    def __post_init__(self) -> None:
        if self.mode not in ("choice", "generate"):
            raise ValueError(f"local judge mode must be 'choice' or 'generate' (got {self.mode!r})")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {self.batch_size})")


class LocalJudge:
    kind = "local"
    uses_template = True

    def __init__(self, model, tokenizer, config: LocalJudgeConfig = LocalJudgeConfig(), *, model_id: str | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.model_id = model_id or f"local:{config.model}"
        self.max_output_tokens = 1 if config.mode == "choice" else config.max_new_tokens
        # Enough requests in flight to fill one batch while the previous one runs.
        self.preferred_concurrency = 2 * config.batch_size
        self._letter_ids = _letter_token_ids(tokenizer) if config.mode == "choice" else None
        self._pending: asyncio.Queue | None = None
        self._batcher: asyncio.Task | None = None
        self.batches: list[int] = []  # sizes of the batches run (for tests and the benchmark)

    @classmethod
    def load(cls, config: LocalJudgeConfig = LocalJudgeConfig(), **spec_options) -> "LocalJudge":
        from alignment.models.loading import load_model, resolve_model_path
        from alignment.models.spec import ModelSpec

        spec = ModelSpec(model=config.model, **spec_options)
        model, tokenizer = load_model(spec)
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
        if self.config.mode == "choice":
            return self._choose(conversations)
        return self._generate(conversations)

    def _choose(self, conversations: Sequence[Sequence[dict]]) -> list[JudgeReply]:
        import torch

        from alignment.generation import render_prompt

        texts = [render_prompt(self.tokenizer, list(messages)) + VERDICT_PREFIX for messages in conversations]
        encoded = self.tokenizer(
            texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        ).to(next(self.model.parameters()).device)
        # Left padding shifts each row's tokens: positions must count real tokens only, or a
        # prompt would be judged differently alone and in a batch.
        positions = (encoded["attention_mask"].cumsum(dim=-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self.model(**encoded, position_ids=positions).logits[:, -1, :].float()
        logprobs = torch.log_softmax(logits, dim=-1)[:, list(self._letter_ids)].tolist()
        lengths = encoded["attention_mask"].sum(dim=1).tolist()
        replies = []
        for row, length in zip(logprobs, lengths):
            best = max(range(len(LETTERS)), key=row.__getitem__)
            letter = LETTERS[best]
            alternatives = {LETTERS[i]: row[i] for i in range(len(LETTERS)) if i != best}
            tokens = [
                TokenLogprob(VERDICT_PREFIX, 0.0, {}),
                TokenLogprob(letter, row[best], alternatives),
                TokenLogprob("]]", 0.0, {}),
            ]
            replies.append(JudgeReply(text=f"[[{letter}]]", prompt_tokens=int(length), completion_tokens=1, logprobs=tokens))
        return replies

    def _generate(self, conversations: Sequence[Sequence[dict]]) -> list[JudgeReply]:
        from alignment.generation import SamplingConfig, generate_local

        sampling = SamplingConfig(
            max_new_tokens=self.config.max_new_tokens, temperature=0.0, batch_size=len(conversations)
        )
        completions = generate_local(self.model, self.tokenizer, [list(m) for m in conversations], sampling)
        return [
            JudgeReply(
                text=c.text,
                prompt_tokens=c.prompt_tokens or 0,
                completion_tokens=c.completion_tokens or 0,
                # Stopped by the limit (or, rarely, by an end token exactly at it): the text may
                # end before its verdict, so it is not trusted to hold one.
                truncated=(c.completion_tokens or 0) >= self.config.max_new_tokens,
            )
            for [c] in completions
        ]

    async def aclose(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
            try:
                await self._batcher
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
            self._batcher = self._pending = None


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
