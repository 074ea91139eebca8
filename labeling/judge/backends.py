"""What every judge backend takes and returns: the seam the runner talks through.

A backend answers one `JudgeRequest` (one comparison in one order) with a `JudgeReply`
(the judge's raw text and its usage), or raises `JudgeCallError` saying why there is no
answer. Parsing the verdict out of the text is the runner's job, the same for every backend,
so a rubric rule, a local model and a remote endpoint all go through one parser.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from labeling.judge.parsing import TokenLogprob


@dataclass(frozen=True)
class JudgeRequest:
    conversation: Sequence[dict]  # the stored prompt's chat messages
    first: str  # shown as assistant A
    second: str  # shown as assistant B
    messages: Sequence[dict] = ()  # the rendered template (empty for backends that use none)


@dataclass(frozen=True)
class JudgeReply:
    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1
    truncated: bool = False  # stopped at the token limit
    logprobs: Sequence[TokenLogprob] | None = field(default=None, repr=False)


class JudgeCallError(Exception):
    """No usable reply. `status` is what JudgeCall stores: http_error, timeout, connection_error,
    empty or bad_response."""

    def __init__(
        self,
        status: str,
        reason: str,
        *,
        attempts: int = 1,
        raw_text: str | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.attempts = attempts
        self.raw_text = raw_text
        # An answer without a verdict (no choices, empty message) can still be billed.
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens


class JudgeBackend(Protocol):
    kind: str  # openai | local | rubric
    model_id: str  # goes into the judge rater's name
    uses_template: bool  # False: the backend reads conversation/first/second itself
    max_output_tokens: int  # for the tokens-per-minute estimate
    preferred_concurrency: int  # requests in flight that keep this backend busy

    async def judge(self, request: JudgeRequest) -> JudgeReply: ...

    async def aclose(self) -> None: ...
