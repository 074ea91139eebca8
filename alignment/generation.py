"""Filling the store with sampled responses: `run_generation`, behind `prefloop generate`.

    report = run_generation(engine, GenerationJob(policies=["default", "dpo-3"], prompts=20,
                                                  sampling=sampling))

The sampling itself (SamplingConfig, Completion, generate_local, ...) is alignment/sampling.py;
its names are imported here too, where most callers have always found them.

`run_generation` reads the job's split of the prompts (train by default: eval prompts are held
out for `prefloop eval`), resolves policy names (stored policy versions; "default"/"base" = the embedded
model; otherwise a model id or path), skips prompts every policy has already answered, checks
every pending prompt against the model's context before generating anything, and stores each
prompt's responses and comparisons in one transaction. Comparisons: one policy with samples>=2
pairs its samples; several policies are paired policy against policy, sample by sample.

Best-of-n (`job.best_of`, `prefloop generate --best-of N --reward-rubric shorter`): each policy
samples N answers per prompt in the same batched pass (a prompt's N samples side by side in one
batch when N <= batch_size), a reward scores them (alignment/training/online_rewards.py's
sources: a reward run or model, rubric rules, a function), and only the best is stored, marked
`sft_source='best-of-n'` with its `reward_score`: an SFT example for rejection-sampling
fine-tuning (`prefloop train sft`; the sft export's `sft_source` selection). Its generation
parameters record the run: `best_of_n = {n, reward, candidates, scores, kept}` (every non-empty
sample's text and score, `kept` the index of the stored one; the first best on a tie). No
comparisons are made. A resumed run skips prompts a policy already has a best-of-n answer for;
plain runs ignore those answers, and best-of-n runs ignore plain samples.
"""

from __future__ import annotations

import itertools
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from alignment.models.errors import ModelError
from alignment.sampling import (  # noqa: F401  (re-exported: callers import them from here)
    Completion,
    Messages,
    SamplingConfig,
    check_context,
    generate_local,
    prompt_token_counts,
    render_prompt,
    stop_token_ids,
)

if TYPE_CHECKING:
    from alignment.training.online_rewards import RewardSource

Backend = Literal["local", "openai"]
COMPARISON_SOURCE = "generate"
# The reward sources best-of-n takes (RewardSource's fields; the judge is GRPO/RLOO's only, for now).
BEST_OF_REWARDS = ("reward_run", "reward_model", "reward_rubric", "reward_function")


@dataclass(frozen=True)
class BestOfN:
    """Rejection sampling: N samples per prompt, the best under `reward` kept as an SFT example."""

    n: int = field(
        default=4,
        metadata={"help": "sample N answers per prompt and store only the best under the reward (--reward-run, "
                          "--reward-model, --reward-rubric or --reward-function) as an SFT example, with its score; "
                          "no comparisons"},
    )
    # online_rewards.RewardSource (imported lazily: it imports transformers): one source set.
    reward: RewardSource | None = None

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ModelError(f"--best-of {self.n}: must be at least 2 (the best of N samples is kept)")
        given = [name for name in BEST_OF_REWARDS if getattr(self.reward, name, None) is not None]
        if getattr(self.reward, "reward_judge", False):
            raise ModelError("--best-of takes --reward-run, --reward-model, --reward-rubric or --reward-function "
                             "(the judge reward is not offered here)")
        if not given:
            raise ModelError("--best-of needs a reward: --reward-run RUN_ID, --reward-model DIR, --reward-rubric RULES "
                             "or --reward-function MODULE:FUNCTION")
        if len(given) > 1:
            raise ModelError("give one reward, not " + " and ".join("--" + n.replace("_", "-") for n in given))


@dataclass(frozen=True)
class GenerationJob:
    """One `prefloop generate` run."""

    policies: tuple[str, ...] = field(
        default=("default",),
        metadata={"help": "stored policy versions, 'default' (the embedded model), 'base' (the model `model` "
                          "names) or model ids"},
    )
    prompts: int | None = field(default=None, metadata={"help": "the first N prompts of the split; unset: all"})
    split: str | None = field(
        default="train",
        metadata={"help": "which prompts: train (pairs for labelling), eval (held out for `prefloop eval`), or all (None)"},
    )
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    backend: Backend = field(default="local", metadata={"help": "local (in-process) or openai (a server)"})
    model: str | None = field(
        default=None,
        metadata={"help": "openai: the served model; local: the base model that the name 'base' stands for"},
    )
    base_url: str | None = field(default=None, metadata={"help": "openai backend: the server's API root"})
    quantize: str = field(default="auto", metadata={"help": "local backend: none, 8bit, 4bit or auto (4bit on CUDA, none on CPU)"})
    dtype: str = field(
        default="auto",
        metadata={"help": "local backend: weights dtype float32, bfloat16 or float16; auto = bfloat16 where the "
                          "hardware computes it natively (a GPU, or a CPU with AMX or AVX512-BF16: about twice "
                          "float32's speed), else float32"},
    )
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "openai backend: key variable"})
    best_of: BestOfN | None = None  # rejection sampling instead of pairs (see the module's docstring)


@dataclass
class GenerationReport:
    policies: list[str]
    prompts_selected: int = 0
    prompts_already_done: int = 0
    prompts_done: int = 0
    responses: int = 0
    comparisons: int = 0
    empty: int = 0  # completions with no text, not stored
    completion_tokens: int = 0
    seconds: float = 0.0
    best_of: int | None = None  # best-of-n: N
    reward: str | None = None  # best-of-n: the reward's name
    kept: int = 0  # best-of-n: answers kept as SFT examples
    kept_score: float = 0.0  # best-of-n: sum of the kept answers' rewards
    scored: int = 0  # best-of-n: samples scored
    all_score: float = 0.0  # best-of-n: sum of every scored sample's reward

    def summary(self) -> str:
        rate = self.completion_tokens / self.seconds if self.seconds else 0.0
        if self.best_of is not None:
            text = (
                f"{', '.join(self.policies)}: best of {self.best_of} under {self.reward} for {self.prompts_done} "
                f"prompts ({self.prompts_already_done} of {self.prompts_selected} selected were already done); "
                f"{self.kept} answers kept as SFT examples ({self.responses} new responses), mean reward "
                f"{self.kept_score / max(self.kept, 1):.3f} kept vs {self.all_score / max(self.scored, 1):.3f} "
                f"over all {self.scored} samples; {self.completion_tokens} tokens in {self.seconds:.1f} s "
                f"({rate:.1f} tokens/s)"
            )
            return text + (f"; {self.empty} empty completions not scored" if self.empty else "")
        text = (
            f"{', '.join(self.policies)}: {self.prompts_done} prompts answered "
            f"({self.prompts_already_done} of {self.prompts_selected} selected were already done); "
            f"{self.responses} new responses, {self.comparisons} new comparisons; "
            f"{self.completion_tokens} tokens in {self.seconds:.1f} s ({rate:.1f} tokens/s)"
        )
        if self.empty:
            text += f"; {self.empty} empty completions not stored"
        return text


def _resolve_policies(job: GenerationJob, *, session) -> list:
    """The PolicyVersion rows for the job's names, created where a name is a model."""
    from feedback_store.catalog import get_or_create_policy, get_policy, list_policies

    from alignment.models import DEFAULT_MODEL, DEFAULT_MODEL_ALIASES, resolve_model_path

    if job.backend == "openai" and job.model and len(job.policies) > 1:
        raise ModelError("--model names one served model: with several --policy values, name each policy "
                         "after the model (or LoRA module) the server serves under that name")
    policies = []
    for name in job.policies:
        stored = get_policy(name, session=session)
        if stored is not None:
            policy = stored
        elif job.backend == "openai":
            policy = get_or_create_policy(name, session=session, base_model=job.model or name,
                                          description=f"served at {job.base_url}")
        elif name in DEFAULT_MODEL_ALIASES:
            model = DEFAULT_MODEL if name == DEFAULT_MODEL else (job.model or DEFAULT_MODEL)
            if model not in DEFAULT_MODEL_ALIASES:
                resolve_model_path(model)
            policy_name = DEFAULT_MODEL if model in DEFAULT_MODEL_ALIASES else model
            policy = get_or_create_policy(policy_name, session=session, base_model=policy_name)
        else:
            try:
                resolve_model_path(name)
            except ModelError as error:
                known = ", ".join(p.name for p in list_policies(session=session)) or "none yet"
                raise ModelError(f"unknown policy {name!r} (stored policies: {known}; 'default' is the "
                                 f"embedded model), and not a model either: {error}") from None
            policy = get_or_create_policy(name, session=session, base_model=name)
        if any(p.id == policy.id for p in policies):
            raise ModelError(f"policy {policy.name!r} is listed twice")
        policies.append(policy)
    return policies


class _LocalRunner:
    """In-process generation: one PolicyPool per base model, adapters added by policy name."""

    def __init__(self, policies: Sequence, quantize: str, dtype: str = "auto") -> None:
        from alignment.models import ModelSpec, PolicyPool
        from alignment.models.spec import inference_dtype

        self.pools: dict[str, PolicyPool] = {}
        self.adapter: dict[int, str | None] = {}
        for policy in policies:
            pool = self.pools.get(policy.base_model)
            if pool is None:
                spec = ModelSpec(policy.base_model, quantize=quantize, dtype=dtype)
                pool = self.pools[policy.base_model] = PolicyPool.load(replace(spec, dtype=inference_dtype(spec)))
            if policy.adapter_path:
                pool.add(policy.name, policy.adapter_path)
            self.adapter[policy.id] = policy.name if policy.adapter_path else None

    def lengths(self, policy, conversations) -> list[int]:
        return prompt_token_counts(self.pools[policy.base_model].tokenizer, conversations)

    def check(self, policy, prompts, sampling: SamplingConfig) -> None:
        from alignment.models import context_length

        pool = self.pools[policy.base_model]
        check_context(
            self.lengths(policy, [p.messages for p in prompts]),
            sampling.max_new_tokens,
            context_length(pool.model, pool.tokenizer),
            labels=[f"prompt {p.id}" for p in prompts],
            model=policy.base_model,
        )

    def generate(self, policy, conversations, sampling):
        return self.pools[policy.base_model].generate(self.adapter[policy.id], conversations, sampling)

    def describe(self, policy) -> dict:
        dtype = str(self.pools[policy.base_model].model.dtype).removeprefix("torch.")
        return {"backend": "local", "model": policy.base_model, "adapter": policy.adapter_path, "dtype": dtype}


class _OpenAIRunner:
    def __init__(self, job: GenerationJob) -> None:
        from alignment.openai_backend import OpenAIBackendConfig, OpenAIGenerator

        self.job = job
        self.generator = OpenAIGenerator(OpenAIBackendConfig(base_url=job.base_url or "", api_key_env=job.api_key_env))

    def served(self, policy) -> str:
        return self.job.model or policy.name

    def lengths(self, policy, conversations) -> list[int]:
        return [sum(len(m["content"]) for m in messages) for messages in conversations]

    def check(self, policy, prompts, sampling) -> None:
        """The server knows its context; an over-long prompt fails there, storing nothing for it."""

    def generate(self, policy, conversations, sampling):
        return self.generator.generate(self.served(policy), conversations, sampling)

    def describe(self, policy) -> dict:
        return {"backend": "openai", "model": self.served(policy), "base_url": self.job.base_url}


def comparison_pairs(groups: Sequence[Sequence]) -> list[tuple]:
    """One policy: every pair of its samples. Several: each pair of policies, sample k against
    sample k (the shorter list wraps around)."""
    if len(groups) == 1:
        return list(itertools.combinations(groups[0], 2))
    pairs = []
    for left, right in itertools.combinations(groups, 2):
        if left and right:
            pairs += [(left[k % len(left)], right[k % len(right)]) for k in range(max(len(left), len(right)))]
    return pairs


def _batch_seed(seed: int, policy_name: str, prompt_ids: Sequence[int]) -> int:
    """A seed per (run seed, policy, batch of prompts): reruns of the same batch sample alike."""
    return zlib.crc32(f"{seed}:{policy_name}:{','.join(map(str, prompt_ids))}".encode())


def _store_prompt(session, prompt, policies, results: dict, params: dict, report: GenerationReport) -> None:
    from feedback_store.catalog import add_comparison, add_response, list_responses

    groups = []
    for policy in policies:
        completions = results.get((policy.id, prompt.id))
        if completions is None:  # answered by an earlier run
            groups.append(list_responses(prompt.id, session=session, policy_id=policy.id))
            continue
        made: dict[int, object] = {}
        for completion in completions:
            if not completion.text:
                report.empty += 1
                continue
            response, created = add_response(
                prompt.id, policy.id, completion.text, session=session,
                generation_params=params[policy.id], prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
            )
            report.responses += created
            report.completion_tokens += completion.completion_tokens or 0
            made.setdefault(response.id, response)  # identical samples are one response
        groups.append(list(made.values()))
    for first, second in comparison_pairs(groups):
        if first.id != second.id:
            report.comparisons += add_comparison(first, second, session=session, source=COMPARISON_SOURCE)[1]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _score_best(reward, prompts, outputs: Sequence[Sequence[Completion]], report: GenerationReport) -> list:
    """For each prompt, (its non-empty completions, their rewards, the index of the best); the
    rewards of a whole chunk in one call (a rubric compares each prompt's samples among themselves)."""
    kept = [[c for c in completions if c.text] for completions in outputs]
    report.empty += sum(len(completions) - len(k) for completions, k in zip(outputs, kept))
    flat_prompts = [prompt.messages for prompt, k in zip(prompts, kept) for _ in k]
    flat_completions = [_assistant(c.text) for k in kept for c in k]
    scores = [float(x) for x in reward(flat_prompts, flat_completions)] if flat_completions else []
    if len(scores) != len(flat_completions):
        raise ModelError(f"the reward gave {len(scores)} scores for {len(flat_completions)} completions")
    chosen, start = [], 0
    for k in kept:
        own = scores[start : start + len(k)]
        start += len(k)
        best = max(range(len(own)), key=lambda i: (own[i], -i)) if own else None  # the first best
        chosen.append((k, own, best))
        report.scored += len(own)
        report.all_score += sum(own)
    return chosen


def _store_best(session, prompt, policy, chosen, params: dict, report: GenerationReport) -> None:
    """The best of a prompt's samples as a best-of-n SFT example (nothing when every sample was empty)."""
    from feedback_store.catalog import add_response
    from feedback_store.models import BEST_OF_N

    completions, scores, best = chosen
    for completion in completions:
        report.completion_tokens += completion.completion_tokens or 0
    if best is None:
        return
    record = {"n": report.best_of, "reward": report.reward, "candidates": [c.text for c in completions],
              "scores": scores, "kept": best}
    completion = completions[best]
    response, created = add_response(
        prompt.id, policy.id, completion.text, session=session,
        generation_params={**params, "best_of_n": record}, prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
    )
    if not created:  # the same text sampled before (a plain run): it becomes the example too
        response.generation_params = {**response.generation_params, "best_of_n": record}
    response.sft_source = BEST_OF_N
    response.reward_score = scores[best]
    session.add(response)
    report.responses += created
    report.kept += 1
    report.kept_score += scores[best]


def check_best_of(engine, job: GenerationJob) -> dict:
    """The settings of a best-of-n job's reward, checked before any model loads (sampling, not
    greedy; a run id resolved, rubric rules and functions found: online_rewards.resolve), errors
    as one-line ModelErrors. run_generation calls it; the command line calls it first too."""
    from dataclasses import asdict

    from alignment.training import online_rewards
    from alignment.training.common import TrainingError

    best_of = job.best_of
    if best_of is None:
        raise ModelError("not a best-of-n job")
    if job.sampling.temperature == 0:
        raise ModelError("--best-of needs sampling: greedy decoding (--temperature 0) gives N identical answers")
    try:
        return online_rewards.resolve(asdict(best_of.reward), engine, method="best-of-n")
    except TrainingError as error:
        raise ModelError(str(error)) from None


def _build_reward(settings: dict, tokenizer):
    from alignment.training import online_rewards
    from alignment.training.common import TrainingError

    try:
        return online_rewards.build(settings, tokenizer)
    except TrainingError as error:
        raise ModelError(str(error)) from None


def register_policies(engine, names: Sequence[str]) -> list[int]:
    """The ids of these policies, registering the ones that are models (as generation would)."""
    from feedback_store.db import session_scope

    with session_scope(engine) as session:
        return [policy.id for policy in _resolve_policies(GenerationJob(policies=tuple(names)), session=session)]


def run_generation(engine, job: GenerationJob, *, show_progress: bool = True) -> GenerationReport:
    """Sample every selected prompt a policy has not answered yet, storing each prompt in one
    transaction. Raises ModelError before generating anything for a prompt that cannot fit."""
    from dataclasses import replace

    from feedback_store.catalog import list_prompts, prompts_without_responses
    from feedback_store.db import session_scope
    from feedback_store.models import BEST_OF_N
    from tqdm.auto import tqdm

    started = time.perf_counter()
    if not job.policies:
        raise ModelError("no policy to sample: pass --policy NAME")
    best_of, reward_settings = job.best_of, None
    if best_of is not None:
        reward_settings = check_best_of(engine, job)
        job = replace(job, sampling=replace(job.sampling, samples=best_of.n))
    with session_scope(engine) as session:
        selected = list_prompts(session=session, limit=job.prompts, split=job.split)
        policies = _resolve_policies(job, session=session)
        selected_ids = {p.id for p in selected}
        kind = BEST_OF_N if best_of is not None else None
        pending = {
            policy.id: {p.id for p in prompts_without_responses(policy.id, session=session, sft_source=kind)}
            & selected_ids
            for policy in policies
        }
    report = GenerationReport(policies=[p.name for p in policies], prompts_selected=len(selected),
                              best_of=best_of.n if best_of is not None else None)
    todo = [p for p in selected if any(p.id in pending[policy.id] for policy in policies)]
    report.prompts_already_done = len(selected) - len(todo)
    if not todo:
        report.seconds = time.perf_counter() - started
        return report

    runner = _OpenAIRunner(job) if job.backend == "openai" else _LocalRunner(policies, job.quantize, job.dtype)
    for policy in policies:
        needed = [p for p in todo if p.id in pending[policy.id]]
        if needed:  # a policy that answered every selected prompt already has nothing to check
            runner.check(policy, needed, job.sampling)
    reward = None
    if reward_settings is not None:  # a reward model without its own tokenizer may read the policy's
        tokenizer = runner.pools[policies[0].base_model].tokenizer if isinstance(runner, _LocalRunner) else None
        reward = _build_reward(reward_settings, tokenizer)
        report.reward = getattr(reward, "__name__", "reward")
    # Length bucketing across the whole run: neighbours in this order share a batch.
    lengths = runner.lengths(policies[0], [p.messages for p in todo])
    todo = [p for _, p in sorted(zip(lengths, todo), key=lambda pair: (pair[0], pair[1].id))]
    params = {
        policy.id: {**job.sampling.params(), **{k: v for k, v in runner.describe(policy).items() if v}}
        for policy in policies
    }
    per_batch = max(1, job.sampling.batch_size // job.sampling.samples)
    # disable=None: a bar on a terminal, none in logs and pipes
    bar = tqdm(total=len(todo), unit="prompt", desc="generate", disable=None if show_progress else True)
    try:
        for start in range(0, len(todo), per_batch):
            chunk = todo[start : start + per_batch]
            results: dict[tuple[int, int], list[Completion]] = {}
            for policy in policies:
                needed = [p for p in chunk if p.id in pending[policy.id]]
                if not needed:
                    continue
                seed = _batch_seed(job.sampling.seed, policy.name, [p.id for p in needed])
                outputs = runner.generate(policy, [p.messages for p in needed], replace(job.sampling, seed=seed))
                if reward is not None:
                    outputs = _score_best(reward, needed, outputs, report)
                results.update({(policy.id, p.id): out for p, out in zip(needed, outputs)})
            for prompt in chunk:
                with session_scope(engine) as session:
                    if reward is None:
                        _store_prompt(session, prompt, policies, results, params, report)
                    else:
                        for policy in policies:
                            if (policy.id, prompt.id) in results:
                                _store_best(session, prompt, policy, results[policy.id, prompt.id],
                                            params[policy.id], report)
                report.prompts_done += 1
                bar.update(1)
    finally:
        bar.close()
        report.seconds = time.perf_counter() - started
    return report
