"""Evaluations: a policy against another on held-out (eval) prompts, as judged, with an interval.

    judged = judged_pairs(policy_id, against_id, judge_rater_id, prompt_ids, session=s)
    result = win_rate(judged.judged)                    # pure: no store, no judge, no model
    record_evaluation(..., result=result, session=s)    # an Evaluation row
    list_evaluations(session=s)                         # what `prefloop stats --json` shows
    lineage(session=s)                                  # each policy, its parent, its win rate over it

Scoring: a judgement the policy wins scores 1, a tie (the judge's tie, or its two orders
disagreeing) 1/2, a loss 0; "both bad" counts as a tie. A prompt's score is the mean of its
judgements (one, unless earlier runs left several pairs on it), and the win rate is the
mean over prompts, so every prompt weighs the same.

Interval: Wilson's score interval (statsmodels' `proportion_confint`) on n prompts with the
summed score as the count. With ties the per-prompt score is not a coin flip, but a score
in [0, 1] with mean p has variance at most p(1 - p), so the interval is conservative: it
is never narrower than the data warrant. Wilson rather than a bootstrap because eval sets
are small (10 % of the prompts) and it stays sensible at n = 1 or with every prompt won.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from sqlalchemy import String, func, type_coerce
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from feedback_store.models import (
    Comparison,
    Evaluation,
    JudgeRun,
    PolicyVersion,
    Rater,
    Response,
    Vote,
)

CONFIDENCE = 0.95
_SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}  # from response_a's side


@dataclass(frozen=True)
class Judged:
    """One decided judgement of a pair on an eval prompt, from the evaluated policy's side."""

    prompt_id: int
    comparison_id: int
    score: float  # 1 the policy's response won, 0.5 tie, 0 the opponent's won
    policy_length: int  # characters of each response: what the judge read
    against_length: int


@dataclass(frozen=True)
class WinRate:
    n: int  # prompts with at least one decided judgement
    wins: int  # judgements
    ties: int
    losses: int
    win_rate: float  # ties count half
    ci_low: float
    ci_high: float
    mean_length_policy: float
    mean_length_against: float
    confidence: float = CONFIDENCE


def win_rate(judged: Sequence[Judged], *, confidence: float = CONFIDENCE) -> WinRate:
    """The policy's win rate over prompts, ties as half a win, with a Wilson interval."""
    from statsmodels.stats.proportion import proportion_confint

    if not judged:
        raise ValueError("no decided judgement to compute a win rate from")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (got {confidence})")
    by_prompt: dict[int, list[float]] = defaultdict(list)
    for item in judged:
        by_prompt[item.prompt_id].append(item.score)
    prompt_scores = [sum(scores) / len(scores) for scores in by_prompt.values()]
    n = len(prompt_scores)
    total = sum(prompt_scores)
    low, high = proportion_confint(total, n, alpha=1.0 - confidence, method="wilson")
    return WinRate(
        n=n,
        wins=sum(item.score == 1.0 for item in judged),
        ties=sum(item.score == 0.5 for item in judged),
        losses=sum(item.score == 0.0 for item in judged),
        win_rate=total / n,
        ci_low=float(low),
        ci_high=float(high),
        mean_length_policy=sum(item.policy_length for item in judged) / len(judged),
        mean_length_against=sum(item.against_length for item in judged) / len(judged),
        confidence=confidence,
    )


# ---- reading the judged pairs ---------------------------------------------------------------


@dataclass(frozen=True)
class JudgedPairs:
    comparison_ids: list[int]  # every pair of the two policies on the prompts, judged or not
    judged: list[Judged]
    undecided: list[int]  # comparison ids without a vote of this judge (its calls failed)


def judged_pairs(
    policy_id: int, against_id: int, judge_rater_id: int | None, prompt_ids: Sequence[int], *, session: Session
) -> JudgedPairs:
    """The comparisons between a response of each policy on these prompts, with the judge's votes
    (judge_rater_id None: no judge yet, every pair undecided)."""
    ra, rb = aliased(Response), aliased(Response)
    pair = {policy_id, against_id}
    rows = []
    ids = sorted(set(prompt_ids))
    vote_of_judge = (Vote.comparison_id == Comparison.id) & (Vote.rater_id == (judge_rater_id or -1))
    for start in range(0, len(ids), 900):
        rows += session.exec(
            select(Comparison.id, Comparison.prompt_id, ra.policy_id, func.length(ra.text), func.length(rb.text),
                   type_coerce(Vote.choice, String))
            .join(ra, ra.id == Comparison.response_a_id)
            .join(rb, rb.id == Comparison.response_b_id)
            .outerjoin(Vote, vote_of_judge)
            .where(col(Comparison.prompt_id).in_(ids[start : start + 900]),
                   col(ra.policy_id).in_(pair), col(rb.policy_id).in_(pair), ra.policy_id != rb.policy_id)
            .order_by(Comparison.id)
        ).all()
    judged, undecided = [], []
    for comparison_id, prompt_id, policy_a, length_a, length_b, choice in rows:
        if choice is None:
            undecided.append(comparison_id)
            continue
        policy_is_a = policy_a == policy_id
        score = _SCORE[choice] if policy_is_a else 1.0 - _SCORE[choice]
        lengths = (length_a, length_b) if policy_is_a else (length_b, length_a)
        judged.append(Judged(prompt_id, comparison_id, score, int(lengths[0]), int(lengths[1])))
    return JudgedPairs([row[0] for row in rows], judged, undecided)


# ---- storing and listing --------------------------------------------------------------------


def record_evaluation(
    *,
    policy_id: int,
    against_id: int,
    judge_rater_id: int,
    judge_run_id: int | None,
    result: WinRate,
    undecided: int,
    prompt_ids: Sequence[int],
    comparison_ids: Sequence[int],
    config: dict,
    session: Session,
) -> Evaluation:
    """Store one evaluation on the policy's training run (if it has one), with the judge's cost."""
    policy = session.get(PolicyVersion, policy_id)
    if policy is None or session.get(PolicyVersion, against_id) is None:
        raise ValueError("record_evaluation: unknown policy id")
    run = session.get(JudgeRun, judge_run_id) if judge_run_id is not None else None
    evaluation = Evaluation(
        policy_id=policy_id,
        against_id=against_id,
        training_run_id=policy.training_run_id,
        judge_rater_id=judge_rater_id,
        judge_run_id=judge_run_id,
        n=result.n,
        wins=result.wins,
        ties=result.ties,
        losses=result.losses,
        undecided=undecided,
        win_rate=result.win_rate,
        ci_low=result.ci_low,
        ci_high=result.ci_high,
        mean_length_policy=result.mean_length_policy,
        mean_length_against=result.mean_length_against,
        judge_requests=run.n_requests if run else 0,
        judge_prompt_tokens=run.prompt_tokens if run else 0,
        judge_completion_tokens=run.completion_tokens if run else 0,
        judge_cost=run.cost if run else None,
        prompt_ids=sorted(set(prompt_ids)),
        comparison_ids=sorted(set(comparison_ids)),
        config=config,
    )
    session.add(evaluation)
    session.flush()
    return evaluation


@dataclass(frozen=True)
class EvaluationSummary:
    """An Evaluation as `prefloop stats --json` lists it (names instead of ids)."""

    id: int
    policy: str
    against: str
    training_run_id: int | None
    judge: str  # the judge rater's name: model and template version
    judge_run_id: int | None
    n: int
    wins: int
    ties: int
    losses: int
    undecided: int
    win_rate: float
    ci_low: float
    ci_high: float
    mean_length: dict  # {"policy": characters, "against": characters}
    judge_cost: dict  # {"requests", "prompt_tokens", "completion_tokens", "cost"}
    created_at: str

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(evaluation: Evaluation, names: dict[int, str], judge: str) -> EvaluationSummary:
    return EvaluationSummary(
        id=evaluation.id,
        policy=names[evaluation.policy_id],
        against=names[evaluation.against_id],
        training_run_id=evaluation.training_run_id,
        judge=judge,
        judge_run_id=evaluation.judge_run_id,
        n=evaluation.n,
        wins=evaluation.wins,
        ties=evaluation.ties,
        losses=evaluation.losses,
        undecided=evaluation.undecided,
        win_rate=evaluation.win_rate,
        ci_low=evaluation.ci_low,
        ci_high=evaluation.ci_high,
        mean_length={"policy": evaluation.mean_length_policy, "against": evaluation.mean_length_against},
        judge_cost={
            "requests": evaluation.judge_requests,
            "prompt_tokens": evaluation.judge_prompt_tokens,
            "completion_tokens": evaluation.judge_completion_tokens,
            "cost": evaluation.judge_cost,
        },
        created_at=evaluation.created_at.isoformat(),
    )


def list_evaluations(*, session: Session) -> list[EvaluationSummary]:
    """Every evaluation, oldest first."""
    names = dict(session.exec(select(PolicyVersion.id, PolicyVersion.name)).all())
    judges = dict(session.exec(select(Rater.id, Rater.name)).all())
    evaluations = session.exec(select(Evaluation).order_by(Evaluation.id)).all()
    return [summarize(e, names, judges[e.judge_rater_id]) for e in evaluations]


@dataclass(frozen=True)
class LineageNode:
    """A policy in the tree, with the latest evaluation against its parent (None if never)."""

    policy: str
    parent: str | None
    depth: int  # 0 for a root
    training_run_id: int | None
    over_parent: EvaluationSummary | None


def lineage(*, session: Session) -> list[LineageNode]:
    """Every policy in depth-first order from the roots, children in id order."""
    policies = list(session.exec(select(PolicyVersion).order_by(PolicyVersion.id)))
    names = {p.id: p.name for p in policies}
    judges = dict(session.exec(select(Rater.id, Rater.name)).all())
    latest: dict[tuple[int, int], Evaluation] = {}
    for evaluation in session.exec(select(Evaluation).order_by(Evaluation.id)):
        latest[(evaluation.policy_id, evaluation.against_id)] = evaluation
    children: dict[int | None, list[PolicyVersion]] = defaultdict(list)
    for policy in policies:
        parent = policy.parent_id if policy.parent_id in names else None
        children[parent].append(policy)
    nodes: list[LineageNode] = []
    stack = [(policy, 0) for policy in reversed(children[None])]
    seen: set[int] = set()
    while stack:
        policy, depth = stack.pop()
        if policy.id in seen:  # a corrupted cycle must not loop forever
            continue
        seen.add(policy.id)
        evaluation = latest.get((policy.id, policy.parent_id)) if policy.parent_id is not None else None
        nodes.append(LineageNode(
            policy=policy.name,
            parent=names.get(policy.parent_id),
            depth=depth,
            training_run_id=policy.training_run_id,
            over_parent=summarize(evaluation, names, judges[evaluation.judge_rater_id]) if evaluation else None,
        ))
        stack.extend((child, depth + 1) for child in reversed(children[policy.id]))
    return nodes
