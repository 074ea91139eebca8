"""The AI judge as a training reward (`prefloop train grpo|rloo --reward-judge`).

    reward = JudgeReward(OpenAIJudge(config), JudgeRunConfig(rpm=600), engine=engine, mode="compare")
    with online_rewards.use_judge(reward):
        run_training(...)
    reward.close("done")

The same backend, prompt templates, verdict parser, rate limits (rpm/tpm), retries and cost
ledger (a JudgeRun row: requests, tokens, cost) as `prefloop judge`; the calls vote on no stored
comparison. Every pair is asked in both orders, so a judge swayed by position scores a tie.

Modes:
- compare: the completions of one prompt against each other; a completion's reward is its
  mean result (1 win, 0.5 tie, 0 loss) over its pairs with the other completions;
- reference: each completion against the prompt's reference answer (a `reference` column of
  the data, e.g. `--data prompts.jsonl`): 1 better, 0.5 tie or inconsistent, 0 worse.

A call that fails after its retries (server down, HTTP errors) stops training with a one-line
TrainingError: the run is marked failed and nothing is registered. A reply whose verdict cannot
be read counts as a tie (and in the ledger as a failure).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict

from alignment.training.common import TrainingError
from alignment.training.online_rewards import conversation_of, groups, text_of, win_rates
from feedback_store.db import session_scope
from feedback_store.judge_runs import add_usage, finish_judge_run, start_judge_run
from feedback_store.models import RunStatus
from feedback_store.raters import get_or_create_judge
from labeling.judge.backends import JudgeCallError, JudgeRequest
from labeling.judge.parsing import VerdictParseError, parse_verdict
from labeling.judge.ratelimit import RateLimiter
from labeling.judge.templates import get_template

log = logging.getLogger("prefloop.train")
MODES = ("compare", "reference")
PROBE = ([{"role": "user", "content": "Say hello."}], "Hello!", "Hi.")


class JudgeReward:
    """TRL's reward signature over a judge backend: f(prompts, completions, **columns) -> floats."""

    __name__ = "judge"

    def __init__(self, backend, config, *, engine, mode: str = "compare"):
        if mode not in MODES:
            raise ValueError(f"judge mode {mode!r}: expected one of {', '.join(MODES)}")
        self.backend, self.config, self.engine, self.mode = backend, config, engine, mode
        self.template = get_template(config.template)
        self.concurrency = config.concurrency or backend.preferred_concurrency
        self._loop = asyncio.new_event_loop()  # one loop for the run: the backend's clients live on it
        self._limiter: RateLimiter | None = None
        self.run_id: int | None = None
        self.requests = 0
        self.where = getattr(getattr(backend, "config", None), "base_url", None) or backend.model_id

    # -- the ledger ------------------------------------------------------------------------------
    def _start(self) -> None:
        if self.run_id is not None:
            return
        version = self.template.version_id(self.config.criteria) if self.backend.uses_template else "rule"
        settings = {k: v for k, v in asdict(self.config).items()
                    if k not in ("progress", "page_size", "write_interval_s", "comparison_ids")}
        settings.update(concurrency=self.concurrency, purpose="training reward", mode=self.mode)
        with session_scope(self.engine) as session:
            rater = get_or_create_judge(self.backend.model_id, version, session=session)
            self.run_id = start_judge_run(rater.id, self.backend.kind, self.backend.model_id, version, settings,
                                          session=session).id

    def _bill(self, requests: int, failed: int, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests += requests
        with session_scope(self.engine) as session:
            add_usage(self.run_id, requests=requests, failed=failed, prompt_tokens=prompt_tokens,
                      completion_tokens=completion_tokens, session=session,
                      price_prompt=self.config.price_prompt, price_completion=self.config.price_completion)

    def close(self, status: str = "done") -> None:
        """End the judge run in the ledger (done, failed or aborted) and the backend's connections."""
        if self._loop.is_closed():
            return
        try:
            self._loop.run_until_complete(self.backend.aclose())
        finally:
            self._loop.close()
        if self.run_id is not None:
            with session_scope(self.engine) as session:
                finish_judge_run(self.run_id, RunStatus(status), session=session)

    # -- asking ----------------------------------------------------------------------------------
    def _run(self, pairs: list[tuple[list, str, str]]) -> list[str]:
        """The letter (A, B or C) for each (conversation, first, second); raises TrainingError when a
        call fails."""
        self._start()
        return self._loop.run_until_complete(self._ask_all(pairs))

    async def _ask_all(self, pairs):
        if self._limiter is None:
            self._limiter = RateLimiter(self.config.rpm, self.config.tpm)
        gate = asyncio.Semaphore(self.concurrency)
        usage = {"requests": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0}

        async def ask(conversation, first, second) -> str:
            async with gate:
                messages = (self.template.render(conversation, first, second, self.config.criteria)
                            if self.backend.uses_template else [])
                estimate = sum(len(m["content"]) for m in messages) // 4 + self.backend.max_output_tokens
                await self._limiter.acquire(estimate)
                usage["requests"] += 1
                try:
                    reply = await self.backend.judge(JudgeRequest(conversation, first, second, messages))
                except JudgeCallError as error:
                    self._limiter.settle(estimate, error.prompt_tokens + error.completion_tokens)
                    usage["failed"] += 1
                    usage["prompt_tokens"] += error.prompt_tokens
                    usage["completion_tokens"] += error.completion_tokens
                    raise
                self._limiter.settle(estimate, reply.prompt_tokens + reply.completion_tokens)
                usage["prompt_tokens"] += reply.prompt_tokens
                usage["completion_tokens"] += reply.completion_tokens
                try:
                    return parse_verdict(reply.text, truncated=reply.truncated).letter
                except VerdictParseError as error:
                    usage["failed"] += 1
                    log.warning("judge reply without a verdict (counted as a tie): %s", error)
                    return "C"

        try:
            return list(await asyncio.gather(*(ask(*pair) for pair in pairs)))
        except JudgeCallError as error:
            raise TrainingError(f"the judge ({self.where}) failed: {error.status}: {error.reason}") from None
        finally:
            self._bill(**usage)

    def check(self) -> None:
        """One request before training: a judge that is down or misconfigured fails here."""
        try:
            self._run([PROBE])
        except TrainingError as error:
            raise TrainingError(f"--reward-judge: {error}") from None

    # -- the reward --------------------------------------------------------------------------------
    def __call__(self, prompts, completions, **columns) -> list[float]:
        texts = [text_of(c).strip() for c in completions]
        conversations = [conversation_of(p) for p in prompts]
        if self.mode == "reference":
            references = columns.get("reference")
            if references is None:
                raise TrainingError("--judge-mode reference needs a 'reference' column in the data "
                                    "(--data FILE with prompt and reference)")
            pairs = []
            for conversation, text, reference in zip(conversations, texts, references):
                pairs += [(conversation, text, text_of(reference)), (conversation, text_of(reference), text)]
            letters = self._run(pairs)
            scores = []
            for k in range(len(texts)):
                ab, ba = letters[2 * k], letters[2 * k + 1]
                scores.append((_points(ab, first=True) + _points(ba, first=False)) / 2)
            return scores

        out = [0.5] * len(texts)
        plan = []  # (group members, i, j) for each pair asked in both orders
        pairs = []
        for members in groups(prompts):
            for i in range(len(members)):
                for j in range(i + 1, len(members)):
                    a, b = members[i], members[j]
                    plan.append((a, b))
                    pairs += [(conversations[a], texts[a], texts[b]), (conversations[a], texts[b], texts[a])]
        letters = self._run(pairs)
        results = {pair: (_points(letters[2 * k], first=True) + _points(letters[2 * k + 1], first=False)) / 2
                   for k, pair in enumerate(plan)}
        for members in groups(prompts):
            rates = win_rates(len(members), lambda i, j: results[(members[i], members[j])])
            for index, rate in zip(members, rates):
                out[index] = rate
        return out


def _points(letter: str, *, first: bool) -> float:
    """What a verdict gives the completion shown first (first=True) or second."""
    if letter == "C":
        return 0.5
    return float((letter == "A") == first)
