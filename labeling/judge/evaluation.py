"""Judge a policy against another (by default its parent) on the held-out eval prompts.

    result = evaluate_policy(engine, "dpo-4", RubricJudge("shorter"), EvalConfig(prompts=50))
    result.win_rate, result.ci_low, result.ci_high, result.n, result.ties

Steps: both policies answer every selected eval prompt (greedy by default, stored like any
responses and paired, so a rerun reuses them); the judge decides each pair in both orders
(`run_judge` on those pairs only: its votes are ordinary judge votes and feed the
leaderboard); the win rate and its interval come from `feedback_store.evaluations.win_rate`;
one Evaluation row is stored, on the policy's training run.

Nothing is half-registered: no eval prompts fails before anything is written; a judge that
fails every request leaves no evaluation and no vote (its failed calls stay in the judge
run's ledger, marked failed, and the generated responses stay for a rerun).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from sqlalchemy.engine import Engine
from sqlmodel import select

from feedback_store.catalog import get_policy, list_policies, list_prompts
from feedback_store.db import session_scope
from feedback_store.evaluations import CONFIDENCE, judged_pairs, record_evaluation, win_rate
from feedback_store.judge_runs import finish_judge_run
from feedback_store.models import JudgeCall, RunStatus
from feedback_store.raters import get_rater
from feedback_store.splits import EVAL, split_counts
from labeling.judge.backends import JudgeBackend
from labeling.judge.runner import JudgeRunConfig, JudgeRunSummary, run_judge

DEFAULT_OPPONENT = "default"  # the embedded base model's policy name


class EvaluationError(ValueError):
    """An evaluation that cannot run or produced nothing: a one-line message saying why."""


@dataclass(frozen=True)
class EvalConfig:
    against: str | None = field(
        default=None, metadata={"help": "the opponent policy (default: the policy's parent, else 'default')"}
    )
    prompts: int | None = field(default=None, metadata={"help": "the first N eval prompts (default: all)"})
    max_new_tokens: int = field(default=256, metadata={"help": "most tokens per response"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature of both policies (0 = greedy)"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    batch_size: int = field(default=16, metadata={"help": "sequences per forward pass"})
    quantize: str = field(default="auto", metadata={"help": "none, 8bit, 4bit or auto (4bit on CUDA)"})
    dtype: str = field(default="float32", metadata={
        "help": "policies' weights dtype: float32 by default, so that a small policy change is not lost to "
                "bfloat16's rounding (a LoRA delta under 0.4% of an activation vanishes); auto = bfloat16 where "
                "native, as prefloop generate samples"})
    confidence: float = field(default=CONFIDENCE, metadata={"help": "level of the win rate's interval"})
    judge: JudgeRunConfig = field(default_factory=lambda: JudgeRunConfig(progress=False))
    show_progress: bool = field(default=True, metadata={"help": "progress bars for generation and judging"})

    def __post_init__(self) -> None:
        if self.prompts is not None and self.prompts < 1:
            raise ValueError(f"prompts must be at least 1 (got {self.prompts})")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be between 0 and 1 (got {self.confidence})")


@dataclass(frozen=True)
class EvaluationResult:
    evaluation_id: int
    policy: str
    against: str
    training_run_id: int | None
    judge: str  # the judge rater: model and template version
    judge_run_id: int
    n: int  # prompts judged
    wins: int
    ties: int
    losses: int
    undecided: int  # pairs whose judgement failed
    win_rate: float  # ties count half
    ci_low: float
    ci_high: float
    confidence: float
    mean_length_policy: float  # characters
    mean_length_against: float
    judge_requests: int
    judge_prompt_tokens: int
    judge_completion_tokens: int
    judge_cost: float | None
    responses_generated: int

    @property
    def beats_opponent(self) -> bool:
        """The whole interval lies above 50 %: the promotion rule of the loop (DESIGN.md)."""
        return self.ci_low > 0.5

    def as_dict(self) -> dict:
        return {**asdict(self), "beats_opponent": self.beats_opponent}

    def summary(self) -> str:
        cost = f", cost {self.judge_cost:.6f}" if self.judge_cost is not None else ""
        undecided = f", {self.undecided} pairs undecided after judge failures" if self.undecided else ""
        lines = [
            (f"evaluation {self.evaluation_id}: {self.policy} vs {self.against} on {self.n} eval prompts, "
             f"judged by {self.judge}"),
            (f"  win rate {self.win_rate:.3f} ({self.confidence:.0%} interval {self.ci_low:.3f} - "
             f"{self.ci_high:.3f}; ties count half): {self.wins} wins, {self.ties} ties, {self.losses} losses"
             f"{undecided}"),
            (f"  mean length (characters): {self.policy} {self.mean_length_policy:.0f}, "
             f"{self.against} {self.mean_length_against:.0f}"),
            (f"  judge run {self.judge_run_id}: {self.judge_requests} requests, tokens prompt "
             f"{self.judge_prompt_tokens}, completion {self.judge_completion_tokens}{cost}"),
        ]
        return "\n".join(lines)


def _opponent(engine: Engine, policy: str, against: str | None) -> tuple[int, str]:
    """The evaluated policy's id and the opponent's name; refuses what cannot be evaluated."""
    with session_scope(engine) as session:
        stored = get_policy(policy, session=session)
        if stored is None:
            known = ", ".join(p.name for p in list_policies(session=session)) or "none yet"
            raise EvaluationError(f"unknown policy {policy!r} (stored policies: {known})")
        if against is None:
            parent = session.get(type(stored), stored.parent_id) if stored.parent_id is not None else None
            against = parent.name if parent is not None else DEFAULT_OPPONENT
        if against == policy:
            raise EvaluationError(f"{policy!r} cannot be evaluated against itself: pass --against NAME")
        return stored.id, against


def _eval_prompt_ids(engine: Engine, limit: int | None) -> list[int]:
    with session_scope(engine) as session:
        ids = [p.id for p in list_prompts(session=session, split=EVAL, limit=limit)]
        if not ids:
            counts = split_counts(session=session)
            raise EvaluationError(
                f"no eval prompts: the store holds {counts['train']} train and 0 eval prompts; import prompts with "
                "a `split` column set to eval, or move some with `prefloop prompts split eval ID...`"
            )
        return ids


def _generate(engine: Engine, names: tuple[str, str], config: EvalConfig) -> int:
    from alignment.generation import GenerationJob, SamplingConfig, run_generation
    from alignment.models import ModelError

    try:
        sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature, samples=1,
                                  seed=config.seed, batch_size=config.batch_size)
        job = GenerationJob(policies=names, prompts=config.prompts, split=EVAL, sampling=sampling,
                            quantize=config.quantize, dtype=config.dtype)
        return run_generation(engine, job, show_progress=config.show_progress).responses
    except ModelError as error:
        raise EvaluationError(str(error)) from None


def _failure_reason(engine: Engine, summary: JudgeRunSummary) -> str:
    with session_scope(engine) as session:
        call = session.exec(
            select(JudgeCall).where(JudgeCall.judge_run_id == summary.run_id, JudgeCall.status != "ok")
            .order_by(JudgeCall.id)
        ).first()
        if summary.requests:
            finish_judge_run(summary.run_id, RunStatus.failed, session=session)
    counts = ", ".join(f"{status} {n}" for status, n in sorted(summary.failures.items()))
    detail = f"; first error: {call.error}" if call is not None and call.error else ""
    return f"{counts or 'no request answered'}{detail}"


def check_evaluable(engine: Engine, policy: str, config: EvalConfig = EvalConfig()) -> str:
    """The opponent's name, or EvaluationError for what would make `evaluate_policy` fail before it
    starts (unknown policy, itself as opponent, no eval prompts): cheap, so callers check before
    loading a judge model or training for hours."""
    _, against = _opponent(engine, policy, config.against)
    _eval_prompt_ids(engine, config.prompts)
    return against


def evaluate_policy(engine: Engine, policy: str, judge: JudgeBackend, config: EvalConfig = EvalConfig()
                    ) -> EvaluationResult:
    """Generate, judge in both orders, compute and store the win rate of `policy` over its opponent.

    Raises EvaluationError (nothing stored as an evaluation) when there are no eval prompts,
    no pair could be formed, or the judge decided none of the pairs; KeyboardInterrupt when
    the judge run was interrupted (rerun to resume: decided pairs are kept)."""
    policy_id, against = _opponent(engine, policy, config.against)
    prompt_ids = _eval_prompt_ids(engine, config.prompts)
    generated = _generate(engine, (policy, against), config)
    with session_scope(engine) as session:
        against_id = get_policy(against, session=session).id
        pairs = judged_pairs(policy_id, against_id, None, prompt_ids, session=session)
    if not pairs.comparison_ids:
        raise EvaluationError(f"no pair to judge on the {len(prompt_ids)} eval prompts: every response of "
                              f"{policy!r} or {against!r} was empty")

    judge_config = replace(config.judge, comparison_ids=tuple(pairs.comparison_ids), limit=None)
    summary = run_judge(engine, judge, judge_config)
    if summary.status == "aborted":
        raise KeyboardInterrupt
    with session_scope(engine) as session:
        rater_id = get_rater(summary.rater, session=session).id
        pairs = judged_pairs(policy_id, against_id, rater_id, prompt_ids, session=session)
    if not pairs.judged:
        raise EvaluationError(
            f"the judge {summary.rater} failed every request ({_failure_reason(engine, summary)}): no evaluation "
            f"stored, {len(pairs.undecided)} pairs left unjudged (judge run {summary.run_id})"
        )
    result = win_rate(pairs.judged, confidence=config.confidence)
    stored_config = {
        "prompts": config.prompts,
        "sampling": {"max_new_tokens": config.max_new_tokens, "temperature": config.temperature,
                     "seed": config.seed, "samples": 1},
        "quantize": config.quantize,
        "dtype": config.dtype,
        "confidence": config.confidence,
        "judge": {"backend": judge.kind, "model": judge.model_id, "template": config.judge.template,
                  "criteria": config.judge.criteria},
    }
    with session_scope(engine) as session:
        evaluation = record_evaluation(
            policy_id=policy_id, against_id=against_id, judge_rater_id=rater_id, judge_run_id=summary.run_id,
            result=result, undecided=len(pairs.undecided),
            prompt_ids=prompt_ids, comparison_ids=pairs.comparison_ids, config=stored_config, session=session,
        )
        return EvaluationResult(
            evaluation_id=evaluation.id, policy=policy, against=against, training_run_id=evaluation.training_run_id,
            judge=summary.rater, judge_run_id=summary.run_id, n=result.n, wins=result.wins, ties=result.ties,
            losses=result.losses, undecided=evaluation.undecided, win_rate=result.win_rate, ci_low=result.ci_low,
            ci_high=result.ci_high, confidence=result.confidence, mean_length_policy=result.mean_length_policy,
            mean_length_against=result.mean_length_against, judge_requests=evaluation.judge_requests,
            judge_prompt_tokens=evaluation.judge_prompt_tokens,
            judge_completion_tokens=evaluation.judge_completion_tokens, judge_cost=evaluation.judge_cost,
            responses_generated=generated,
        )
