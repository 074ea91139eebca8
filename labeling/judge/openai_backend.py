"""A judge behind any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, TGI, Ollama,
llama.cpp's server), through the `openai` client.

Retries are the client's own: exponential backoff with jitter (0.5 s doubling, capped at 8 s)
on 408/409/429/5xx, timeouts and connection errors, honouring `Retry-After`/`retry-after-ms`
up to two minutes; `max_attempts` caps them (`max_retries = max_attempts - 1`). What this
module adds: one client and connection pool shared by every request (sized to the
concurrency, so 64 requests in flight never queue for a connection), a count of the HTTP
attempts each judgement took (a request hook, so failures report it too), and the mapping
of every failure to a status and a one-line reason.

The API key comes from an environment variable, never from a command-line flag.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from labeling.judge.backends import JudgeCallError, JudgeReply, JudgeRequest
from labeling.judge.parsing import TokenLogprob

API_KEY_ENVS = ("PREFLOOP_JUDGE_API_KEY", "OPENAI_API_KEY")
# Servers without authentication (a local vLLM, Ollama) still need a non-empty key in the client.
NO_KEY = "no-key"

# The attempt counter of the judgement running in the current task (see `_count_attempt`).
_attempts: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("judge_attempts", default=None)


@dataclass(frozen=True)
class OpenAIJudgeConfig:
    model: str = field(metadata={"help": "model name sent to the endpoint"})
    base_url: str | None = field(default=None, metadata={"help": "endpoint base URL, e.g. http://localhost:8000/v1 (default: OpenAI)"})
    api_key_env: Sequence[str] = field(default=API_KEY_ENVS, metadata={"help": "environment variables tried for the API key, in order"})
    timeout: float = field(default=60.0, metadata={"help": "seconds per HTTP attempt"})
    max_attempts: int = field(default=4, metadata={"help": "HTTP attempts per judgement, first try included"})
    max_tokens: int = field(default=512, metadata={"help": "completion token limit per judgement"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (0: as deterministic as the endpoint allows)"})
    logprobs: bool = field(default=False, metadata={"help": "ask for logprobs (top 5) and turn them into a confidence"})
    max_connections: int = field(default=64, metadata={"help": "HTTP connections kept open (set to the concurrency)"})

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1 (got {self.max_attempts})")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be positive (got {self.timeout})")

    def api_key(self) -> str:
        for name in self.api_key_env:
            if os.environ.get(name):
                return os.environ[name]
        if self.base_url is None:
            raise ValueError(f"no API key: set {' or '.join(self.api_key_env)}")
        return NO_KEY


async def _count_attempt(request) -> None:
    box = _attempts.get()
    if box is not None:
        box[0] += 1


class OpenAIJudge:
    kind = "openai"
    uses_template = True

    def __init__(self, config: OpenAIJudgeConfig):
        self.config = config
        self.model_id = config.model
        self.max_output_tokens = config.max_tokens
        self.preferred_concurrency = config.max_connections
        self._api_key = config.api_key()  # fail before the run starts, not on its first request
        self._client = None

    def _get_client(self):
        # Created inside the running event loop (its connection pool belongs to that loop).
        if self._client is None:
            import httpx2  # the HTTP library the openai client is built on
            import openai

            connections = max(self.config.max_connections, 1)
            http_client = openai.DefaultAsyncHttpxClient(
                limits=httpx2.Limits(max_connections=connections, max_keepalive_connections=connections),
                event_hooks={"request": [_count_attempt]},
            )
            self._client = openai.AsyncOpenAI(
                api_key=self._api_key,
                base_url=self.config.base_url,
                max_retries=self.config.max_attempts - 1,
                timeout=self.config.timeout,
                http_client=http_client,
            )
        return self._client

    async def judge(self, request: JudgeRequest) -> JudgeReply:
        import openai

        client = self._get_client()
        extra = {"logprobs": True, "top_logprobs": 5} if self.config.logprobs else {}
        box = [0]
        token = _attempts.set(box)
        try:
            completion = await client.chat.completions.create(
                model=self.config.model,
                messages=list(request.messages),
                temperature=self.config.temperature,
                max_tokens=self.config.max_tokens,
                **extra,
            )
        except openai.APITimeoutError:
            raise JudgeCallError("timeout", f"no reply within {self.config.timeout:g} s", attempts=box[0]) from None
        except openai.APIStatusError as error:
            raise JudgeCallError(
                "http_error", f"HTTP {error.status_code}: {_one_line(error.message)}", attempts=box[0]
            ) from None
        except openai.APIConnectionError as error:
            raise JudgeCallError("connection_error", _one_line(str(error.__cause__ or error)), attempts=box[0]) from None
        except (openai.APIError, ValueError) as error:  # a 200 whose body is not a chat completion (JSON errors included)
            raise JudgeCallError(
                "bad_response", f"unreadable reply: {type(error).__name__}: {_one_line(str(error))}", attempts=box[0]
            ) from None
        finally:
            _attempts.reset(token)
        return _reply(completion, attempts=box[0])

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _reply(completion, *, attempts: int) -> JudgeReply:
    usage = getattr(completion, "usage", None)
    prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
    completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
    choices = getattr(completion, "choices", None) or []
    billed = {"attempts": attempts, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    if not choices:
        raise JudgeCallError("empty", "the endpoint returned no choices", **billed)
    choice = choices[0]
    text = choice.message.content if choice.message is not None else None
    if not text:
        raise JudgeCallError("empty", "the endpoint returned an empty message", **billed)
    return JudgeReply(
        text=text,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        attempts=attempts,
        truncated=choice.finish_reason == "length",
        logprobs=_logprobs(choice),
    )


def _logprobs(choice) -> list[TokenLogprob] | None:
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    return [
        TokenLogprob(item.token, item.logprob, {alt.token: alt.logprob for alt in (item.top_logprobs or [])})
        for item in content
    ]


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
