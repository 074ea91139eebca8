"""Generation through any OpenAI-compatible server (vLLM, TGI, Ollama, OpenAI) with the `openai` client.

    generator = OpenAIGenerator(OpenAIBackendConfig(base_url="http://127.0.0.1:8000/v1"))
    generator.generate("served-model-name", conversations, SamplingConfig(samples=2))
    # -> for each conversation, `samples` Completion(text, prompt_tokens, completion_tokens)

One request per sample (n=1): every server supports it, token counts stay per response, and
sample k carries seed + k so servers that honour `seed` reproduce a run. Requests run
`concurrency` at a time; retries (429, 5xx, timeouts) are the client's own, with backoff.
The API key comes from $OPENAI_API_KEY (or the variable named in the config), "EMPTY" when
unset, which local servers accept.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from alignment.models.errors import ModelError
from alignment.sampling import Completion, Messages, SamplingConfig


@dataclass(frozen=True)
class OpenAIBackendConfig:
    base_url: str = field(metadata={"help": "the server's API root, e.g. http://127.0.0.1:8000/v1"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "environment variable with the key"})
    concurrency: int = field(default=8, metadata={"help": "requests in flight at once"})
    max_retries: int = field(default=3, metadata={"help": "client retries on 429/5xx/timeouts"})
    timeout: float = field(default=120.0, metadata={"help": "seconds per request"})


class OpenAIGenerator:
    def __init__(self, config: OpenAIBackendConfig) -> None:
        import openai

        if not config.base_url:
            raise ModelError("the openai backend needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        self.config = config
        self.client = openai.OpenAI(
            base_url=config.base_url,
            api_key=os.environ.get(config.api_key_env) or "EMPTY",
            max_retries=config.max_retries,
            timeout=config.timeout,
        )

    def generate(
        self,
        model: str,
        conversations: Sequence[Messages],
        sampling: SamplingConfig,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> list[list[Completion]]:
        jobs = [(i, k) for i in range(len(conversations)) for k in range(sampling.samples)]

        def run(job: tuple[int, int]) -> Completion:
            completion = self._complete(model, conversations[job[0]], sampling, job[1])
            if progress is not None:
                progress(1)
            return completion

        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            done = list(pool.map(run, jobs))
        results: list[list[Completion]] = [[] for _ in conversations]
        for (i, _), completion in zip(jobs, done):
            results[i].append(completion)
        return results

    def _complete(self, model: str, messages: Messages, sampling: SamplingConfig, sample: int) -> Completion:
        import openai

        where = f"{self.config.base_url} (model {model!r})"
        try:
            response = self.client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=sampling.seed + sample,
                n=1,
            )
        except openai.APIConnectionError as error:
            raise ModelError(f"cannot reach {where}: {error}") from None
        except openai.APIStatusError as error:
            raise ModelError(f"{where} answered HTTP {error.status_code}: {_message(error)}") from None
        except openai.APIError as error:  # e.g. a body that is not JSON
            raise ModelError(f"{where}: {error}") from None
        if not getattr(response, "choices", None):
            raise ModelError(f"{where} returned no choices")
        usage = response.usage
        return Completion(
            text=(response.choices[0].message.content or "").strip(),
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
        )


def _message(error) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"]).splitlines()[0]
    return str(error).splitlines()[0]
