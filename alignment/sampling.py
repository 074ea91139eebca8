"""Sampling completions in process: the pure half of generation (no store, no policy names).

    sampling = SamplingConfig(max_new_tokens=128, temperature=0.7, samples=2, seed=0, batch_size=16)
    completions = generate_local(model, tokenizer, conversations, sampling)
    # -> for each conversation, `samples` Completion(text, prompt_tokens, completion_tokens)

`generate_local` applies the chat template, sorts the prompts by token length and cuts them into
batches of `batch_size` sequences (length bucketing: little padding), pads on the left (so every
row's continuation starts at the same column), and seeds torch before each batch so a run is
reproducible under `seed`. Llama-family models decode through `alignment.decoding` (a static
key/value cache, same greedy tokens, same sampling rules); others through `generate`.

Kept apart from alignment/generation.py (which stores what is sampled) so that the model side
(PolicyPool) and the OpenAI backend can use these types and this loop without importing the
module that imports them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from alignment.models.errors import ModelError

Messages = list[dict]


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled (stored with each response as its generation parameters)."""

    max_new_tokens: int = field(default=256, metadata={"help": "most tokens per response"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature; 0 = greedy decoding"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass"})
    samples: int = field(default=1, metadata={"help": "responses per prompt and policy"})
    seed: int = field(default=0, metadata={"help": "sampling seed (reproducible runs)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per forward pass (local backend)"})
    min_new_tokens: int = field(default=0, metadata={"help": "suppress the end token before this many"})

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens}: must be at least 1"),
            (self.temperature >= 0, f"temperature={self.temperature}: must be >= 0"),
            (0 < self.top_p <= 1, f"top_p={self.top_p}: must be in (0, 1]"),
            (self.samples >= 1, f"samples={self.samples}: must be at least 1"),
            (self.batch_size >= 1, f"batch_size={self.batch_size}: must be at least 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be in [0, max_new_tokens]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ModelError(message)

    def params(self) -> dict:
        """What is stored with a response (batching is not a property of the response)."""
        stored = asdict(self)
        stored.pop("batch_size")
        return stored


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def render_prompt(tokenizer, messages: Messages) -> str:
    """The model's chat template with the assistant turn opened; plain turns if it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*turns, "assistant:"])


def prompt_token_counts(tokenizer, conversations: Sequence[Messages]) -> list[int]:
    texts = [render_prompt(tokenizer, messages) for messages in conversations]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def check_context(
    counts: Sequence[int], max_new_tokens: int, limit: int | None, *, labels: Sequence[str], model: str
) -> None:
    """Refuse, before generating anything, a prompt that would not fit with its completion."""
    if limit is None:
        return
    for count, label in zip(counts, labels):
        if count + max_new_tokens > limit:
            raise ModelError(
                f"{label} is {count} tokens: with max_new_tokens={max_new_tokens} it exceeds the "
                f"{limit}-token context of {model}; shorten it or lower --max-new-tokens"
            )


def stop_token_ids(model, tokenizer) -> set[int]:
    """The ids that end a completion: the generation config's end tokens and the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


def generate_local(
    model,
    tokenizer,
    conversations: Sequence[Messages],
    sampling: SamplingConfig,
    *,
    progress: Callable[[int], None] | None = None,
) -> list[list[Completion]]:
    """`sampling.samples` completions for each conversation, batched by prompt length.

    `progress(n)` is called after each batch with the number of sequences it produced."""
    import torch

    from alignment import decoding

    texts = [render_prompt(tokenizer, messages) for messages in conversations]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    # One job per (prompt, sample); sorting by length keeps a batch's padding small, and a
    # prompt's samples side by side.
    jobs = sorted(
        itertools.product(range(len(texts)), range(sampling.samples)), key=lambda job: (lengths[job[0]], job)
    )
    stop = stop_token_ids(model, tokenizer)
    results: list[list[Completion | None]] = [[None] * sampling.samples for _ in texts]
    device = next(model.parameters()).device
    sample = sampling.temperature > 0
    extra = {"temperature": sampling.temperature, "top_p": sampling.top_p} if sample else {}
    fast = decoding.supports(model)  # a static-cache loop for Llama-family models, else generate
    for batch_index, start in enumerate(range(0, len(jobs), sampling.batch_size)):
        batch = jobs[start : start + sampling.batch_size]
        encoded = tokenizer(
            [texts[i] for i, _ in batch],
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        ).to(device)
        torch.manual_seed(sampling.seed + batch_index)
        if fast:
            new_tokens = decoding.decode(
                model,
                encoded["input_ids"],
                encoded["attention_mask"],
                max_new_tokens=sampling.max_new_tokens,
                min_new_tokens=sampling.min_new_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                stop_ids=stop,
                pad_id=tokenizer.pad_token_id,
            ).tolist()
        else:
            with torch.inference_mode():
                output = model.generate(
                    **encoded,
                    max_new_tokens=sampling.max_new_tokens,
                    min_new_tokens=sampling.min_new_tokens or None,
                    do_sample=sample,
                    pad_token_id=tokenizer.pad_token_id,
                    **extra,
                )
            new_tokens = output[:, encoded["input_ids"].shape[1] :].tolist()
        for (prompt_index, sample_index), tokens in zip(batch, new_tokens):
            end = next((k for k, token in enumerate(tokens) if token in stop), None)
            kept = tokens if end is None else tokens[:end]
            results[prompt_index][sample_index] = Completion(
                text=tokenizer.decode(kept, skip_special_tokens=True).strip(),
                prompt_tokens=lengths[prompt_index],
                completion_tokens=len(tokens) if end is None else end + 1,  # the end token counts
            )
        if progress is not None:
            progress(len(batch))
    return results  # type: ignore[return-value]
