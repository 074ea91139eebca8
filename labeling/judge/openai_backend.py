"""A judge behind any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, TGI, Ollama,
llama.cpp's server), through the `openai` client.

Retries are the client's own: exponential backoff with jitter (0.5 s doubling, capped at 8 s)
on 408/409/429/5xx, timeouts and connection errors, honouring `Retry-After`/`retry-after-ms`
up to two minutes; `max_attempts` caps them (`max_retries = max_attempts - 1`). What this
module adds, each measured with bench/judge.py at 64 requests in flight on 2 cores:
- clients created once and reused by every request, with a keep-alive connection for each
  request in flight: no request waits for a connection or opens one;
- the client's aiohttp transport (`openai[aiohttp]`, its documented option for high
  concurrency) when aiohttp is installed: HTTP parsing in C, ~1.2 ms of CPU per request
  against ~1.7-2.5 ms with the default httpx transport. Without aiohttp, the httpx
  connections are split over clients of at most `CONNECTIONS_PER_CLIENT`, because the httpx
  pool scans every connection on each request and response (~0.7 ms per request at 64);
- requests sent with the client's documented `post()` and the JSON read directly: the typed
  `chat.completions.create` spends ~2 ms more per request transforming the messages and
  building pydantic models, which on a small machine caps throughput below what the
  endpoint can serve. Retries, timeouts and status errors take the same code path;
- a count of the HTTP attempts each judgement took (a request hook, so failures report it
  too), and the mapping of every failure to a status and a one-line reason.

The API key comes from an environment variable, never from a command-line flag.
"""

from __future__ import annotations

import contextvars
import json
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
    base_url: str | None = field(default=None, metadata={"help": "endpoint base URL, e.g. http://localhost:8000/v1; unset: OpenAI's"})
    api_key_env: Sequence[str] = field(default=API_KEY_ENVS, metadata={"help": "environment variables tried for the API key, in order"})
    timeout: float = field(default=60.0, metadata={"help": "seconds per HTTP attempt"})
    max_attempts: int = field(default=4, metadata={"help": "HTTP attempts per judgement, first try included"})
    max_tokens: int = field(default=512, metadata={"help": "completion token limit per judgement"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (0: as deterministic as the endpoint allows)"})
    logprobs: bool = field(default=False, metadata={"help": "ask for logprobs (top 5) and turn them into a confidence"})
    max_connections: int = field(default=64, metadata={"help": "HTTP connections kept open (set to the concurrency)"})
    transport: str = field(default="auto", metadata={"help": "HTTP transport: aiohttp, httpx, or auto (aiohttp when installed)"})

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1 (got {self.max_attempts})")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be positive (got {self.timeout})")
        if self.transport not in ("auto", "aiohttp", "httpx"):
            raise ValueError(f"transport must be auto, aiohttp or httpx (got {self.transport!r})")
        if self.transport == "aiohttp" and not aiohttp_available():
            raise ValueError("transport 'aiohttp' needs the aiohttp package: pip install 'openai[aiohttp]'")

    def resolved_transport(self) -> str:
        if self.transport == "auto":
            return "aiohttp" if aiohttp_available() else "httpx"
        return self.transport

    def api_key(self) -> str:
        for name in self.api_key_env:
            if os.environ.get(name):
                return os.environ[name]
        if self.base_url is None:
            raise ValueError(f"no API key: set {' or '.join(self.api_key_env)}")
        return NO_KEY


def aiohttp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("aiohttp") is not None


async def _count_attempt(request) -> None:
    box = _attempts.get()
    if box is not None:
        box[0] += 1


CONNECTIONS_PER_CLIENT = 8


class OpenAIJudge:
    kind = "openai"
    uses_template = True

    def __init__(self, config: OpenAIJudgeConfig):
        self.config = config
        self.model_id = config.model
        self.max_output_tokens = config.max_tokens
        self.preferred_concurrency = config.max_connections
        self._api_key = config.api_key()  # fail before the run starts, not on its first request
        self._clients: list = []
        self._turn = 0

    def _next_client(self):
        # Created inside the running event loop (their connection pools belong to that loop).
        if not self._clients:
            self._clients = self._make_clients()
        self._turn = (self._turn + 1) % len(self._clients)
        return self._clients[self._turn]

    def _make_clients(self) -> list:
        import httpx2  # the HTTP library the openai client is built on
        import openai

        total = max(self.config.max_connections, 1)
        if self.config.resolved_transport() == "aiohttp":
            http_client_class, shards = openai.DefaultAioHttpClient, 1
        else:
            http_client_class, shards = openai.DefaultAsyncHttpxClient, -(-total // CONNECTIONS_PER_CLIENT)
        clients = []
        for shard in range(shards):
            connections = total // shards + (1 if shard < total % shards else 0)
            http_client = http_client_class(
                limits=httpx2.Limits(max_connections=connections, max_keepalive_connections=connections),
                event_hooks={"request": [_count_attempt]},
            )
            clients.append(
                openai.AsyncOpenAI(
                    api_key=self._api_key,
                    base_url=self.config.base_url,
                    max_retries=self.config.max_attempts - 1,
                    timeout=self.config.timeout,
                    http_client=http_client,
                )
            )
        return clients

    def request_body(self, messages) -> dict:
        body = {
            "model": self.config.model,
            "messages": list(messages),
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }
        if self.config.logprobs:
            body.update(logprobs=True, top_logprobs=5)
        return body

    async def judge(self, request: JudgeRequest) -> JudgeReply:
        import httpx2
        import openai

        client = self._next_client()
        box = [0]
        token = _attempts.set(box)
        try:
            response = await client.post(
                "/chat/completions", body=self.request_body(request.messages), cast_to=httpx2.Response
            )
            payload = json.loads(response.content)
        except openai.APITimeoutError:
            raise JudgeCallError("timeout", f"no reply within {self.config.timeout:g} s", attempts=box[0]) from None
        except openai.APIStatusError as error:
            raise JudgeCallError(
                "http_error", f"HTTP {error.status_code}: {_one_line(error.message)}", attempts=box[0]
            ) from None
        except openai.APIConnectionError as error:
            raise JudgeCallError("connection_error", _one_line(str(error.__cause__ or error)), attempts=box[0]) from None
        except (openai.APIError, ValueError) as error:  # a 200 whose body is not JSON
            raise JudgeCallError(
                "bad_response", f"unreadable reply: {type(error).__name__}: {_one_line(str(error))}", attempts=box[0]
            ) from None
        finally:
            _attempts.reset(token)
        return reply_from_json(payload, attempts=box[0])

    async def aclose(self) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            await client.close()


def reply_from_json(payload, *, attempts: int) -> JudgeReply:
    """A chat-completion JSON body as a JudgeReply; JudgeCallError if it holds no answer."""
    if not isinstance(payload, dict):
        raise JudgeCallError("bad_response", f"unreadable reply: a JSON {type(payload).__name__}", attempts=attempts)
    usage = payload.get("usage") or {}
    billed = {
        "attempts": attempts,
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
    }
    choices = payload.get("choices") or []
    if not choices:
        raise JudgeCallError("empty", "the endpoint returned no choices", **billed)
    choice = choices[0] if isinstance(choices[0], dict) else {}
    text = (choice.get("message") or {}).get("content")
    if not text or not isinstance(text, str):
        raise JudgeCallError("empty", "the endpoint returned an empty message", **billed)
    return JudgeReply(text=text, truncated=choice.get("finish_reason") == "length", logprobs=_logprobs(choice), **billed)


def _logprobs(choice: dict) -> list[TokenLogprob] | None:
    content = (choice.get("logprobs") or {}).get("content")
    if not content:
        return None
    try:
        return [
            TokenLogprob(
                item["token"], float(item["logprob"]),
                {alt["token"]: float(alt["logprob"]) for alt in item.get("top_logprobs") or []},
            )
            for item in content
        ]
    except (KeyError, TypeError, ValueError):
        return None  # malformed logprobs: no confidence, the verdict still stands


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
