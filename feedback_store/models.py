"""Every table of the store, in one place.

Choices in a `Vote` always refer to the comparison's canonical order (`response_a_id` <
`response_b_id`), never to screen position; `left_response_id` records what the rater saw
on the left, which is what position-bias statistics need.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Any, Optional

from sqlalchemy import JSON, CheckConstraint, Column, Index, String, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _json(default: Any = None, nullable: bool = False) -> Any:
    factory = (lambda: type(default)()) if default is not None else None
    if factory is None:
        return Field(default=None, sa_column=Column(JSON, nullable=nullable))
    return Field(default_factory=factory, sa_column=Column(JSON, nullable=nullable))


class RaterKind(str, Enum):
    human = "human"
    judge = "judge"
    imported = "import"
    # A rule-following stand-in annotator (`prefloop simulate`, labeling.simulate): its votes
    # are left out of exports and statistics unless a selection asks for them by name.
    simulated = "simulated"


class Role(str, Enum):
    annotator = "annotator"
    admin = "admin"


class Choice(str, Enum):
    a = "a"
    b = "b"
    tie = "tie"
    both_bad = "both_bad"


class RunStatus(str, Enum):
    running = "running"
    done = "done"
    failed = "failed"
    aborted = "aborted"


class Rater(SQLModel, table=True):
    """A human annotator, a judge (model + template version) or an import source."""

    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True)
    kind: RaterKind = Field(default=RaterKind.human)
    role: Optional[Role] = None
    password_hash: Optional[str] = None
    judge_model: Optional[str] = None
    judge_template_version: Optional[str] = None
    weight: float = 1.0
    active: bool = True
    created_at: datetime = Field(default_factory=utcnow)


class Prompt(SQLModel, table=True):
    id: Optional[int] = Field(default=None, primary_key=True)
    messages: list = _json(default=[])  # chat messages: [{"role": ..., "content": ...}]
    content_hash: str = Field(index=True, unique=True)  # sha256 of canonical messages JSON
    source: Optional[str] = None
    tags: list = _json(default=[])
    # train: exports and labelling pairs draw from it; eval: held out for `prefloop eval`.
    # The server default only serves rows written before the column existed (migration 0003);
    # the store always writes the split itself (feedback_store.splits.default_split).
    split: str = Field(
        default="train",
        sa_column=Column(
            String, CheckConstraint("split IN ('train', 'eval')", name="ck_prompt_split"),
            nullable=False, server_default="train",
        ),
    )
    created_at: datetime = Field(default_factory=utcnow)


class PolicyVersion(SQLModel, table=True):
    """A model that produces responses: base model id + optional adapter, with lineage."""

    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True)
    base_model: str
    adapter_path: Optional[str] = None
    parent_id: Optional[int] = Field(default=None, foreign_key="policyversion.id")
    training_run_id: Optional[int] = Field(default=None, foreign_key="trainingrun.id")
    description: Optional[str] = None
    created_at: datetime = Field(default_factory=utcnow)


class Response(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("prompt_id", "policy_id", "text_hash"),)

    id: Optional[int] = Field(default=None, primary_key=True)
    prompt_id: int = Field(foreign_key="prompt.id", index=True)
    policy_id: int = Field(foreign_key="policyversion.id", index=True)
    text: str = Field(sa_column=Column(Text, nullable=False))
    text_hash: str
    generation_params: dict = _json(default={})
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    # A human edit of another response (the app's "edit the better answer").
    edited_from_id: Optional[int] = Field(default=None, foreign_key="response.id")
    author_rater_id: Optional[int] = Field(default=None, foreign_key="rater.id")
    # A response kept as an SFT example by a machine selection, and how: 'best-of-n'
    # (`prefloop generate --best-of N`: the best of N samples under a reward, whose score is
    # `reward_score`). NULL for ordinary samples, which are what comparisons pair.
    sft_source: Optional[str] = None
    reward_score: Optional[float] = None
    created_at: datetime = Field(default_factory=utcnow)


# How `prefloop generate --best-of N` marks the answers it keeps (Response.sft_source).
BEST_OF_N = "best-of-n"


# A comparison the ordinary queue may serve: no gold pair, none the judge settled. The
# predicate of ix_comparison_queue and, word for word, part of the queue's statement.
QUEUE_INDEX_WHERE = "gold_winner IS NULL AND settled_by IS NULL"
GOLD_INDEX_WHERE = "gold_winner IS NOT NULL"

# The policy of gold pairs' degraded copies (feedback_store.gold): never dealt as a card.
GOLD_POLICY = "gold:degraded"


class Comparison(SQLModel, table=True):
    """An unordered pair of responses to one prompt, stored with response_a_id < response_b_id."""

    __table_args__ = (
        UniqueConstraint("response_a_id", "response_b_id"),
        # The annotation queue walks this index in order and stops at the first free pair. It is
        # partial: gold pairs and pairs the judge settled are never in the ordinary queue, so
        # the walk does not pass them (the queue's statement repeats the predicate word for
        # word, which is what lets SQLite's planner use a partial index).
        Index(
            "ix_comparison_queue", text("priority DESC"), "human_votes", "id",
            sqlite_where=text(QUEUE_INDEX_WHERE), postgresql_where=text(QUEUE_INDEX_WHERE),
        ),
        # Gold pairs only: a full index on gold_winner would offer SQLite's planner (which has no
        # statistics unless ANALYZE ran) the queue's `gold_winner IS NULL` as an indexed
        # equality, and it would take that over the queue's ordered walk.
        Index(
            "ix_comparison_gold_winner", "gold_winner",
            sqlite_where=text(GOLD_INDEX_WHERE), postgresql_where=text(GOLD_INDEX_WHERE),
        ),
    )

    id: Optional[int] = Field(default=None, primary_key=True)
    prompt_id: int = Field(foreign_key="prompt.id", index=True)
    response_a_id: int = Field(foreign_key="response.id")
    response_b_id: int = Field(foreign_key="response.id")
    # Higher is served first to humans (e.g. judge-inconsistent pairs: "judge first, humans on doubt").
    priority: int = 0
    # Votes by human raters, kept in step by record_vote: the queue's "fewest votes first".
    human_votes: int = 0
    source: Optional[str] = None
    # A gold pair (feedback_store.gold): a stored answer against a degraded copy of it, whose
    # winner is known ('a' or 'b', canonical order); NULL for every ordinary pair. Gold pairs
    # measure raters: exports and the leaderboard leave them out.
    gold_winner: Optional[str] = Field(
        default=None,
        sa_column=Column(
            String, CheckConstraint("gold_winner IN ('a', 'b')", name="ck_comparison_gold_winner"),
            nullable=True,
        ),
    )
    gold_kind: Optional[str] = None  # how the loser was degraded: truncated | other_prompt | shuffled | refusal
    # Judge-first (`prefloop judge --judge-first`): the id of the judge rater whose confident
    # verdict (both orders agree, confidence at or above the threshold) counts as this pair's
    # label, so the pair left the human queue; NULL while people should see it. A human vote
    # cast anyway (a reservation held when it was settled) is stored and counted as usual.
    # No foreign key: SQLite drops a column in place only when no constraint names it, and a
    # rebuild of `comparison`, which every vote references, is what the migrations avoid.
    settled_by: Optional[int] = None
    created_at: datetime = Field(default_factory=utcnow)


class Vote(SQLModel, table=True):
    __table_args__ = (
        UniqueConstraint("comparison_id", "rater_id"),
        Index("ix_vote_rater_created", "rater_id", "created_at"),
    )

    id: Optional[int] = Field(default=None, primary_key=True)
    comparison_id: int = Field(foreign_key="comparison.id", index=True)
    rater_id: int = Field(foreign_key="rater.id")
    choice: Choice
    strength: Optional[int] = None  # 1 = slightly better, 2 = clearly better
    rationale: Optional[str] = Field(default=None, sa_column=Column(Text))
    left_response_id: Optional[int] = Field(default=None, foreign_key="response.id")
    time_spent_ms: Optional[int] = None
    confidence: Optional[float] = None  # judge confidence from logprobs, when known
    idempotency_key: Optional[str] = Field(default=None, unique=True)
    revision: int = 1
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class VoteRevision(SQLModel, table=True):
    """A superseded state of a vote: a changed vote keeps its history here."""

    id: Optional[int] = Field(default=None, primary_key=True)
    vote_id: int = Field(foreign_key="vote.id", index=True)
    revision: int
    choice: Choice
    strength: Optional[int] = None
    rationale: Optional[str] = Field(default=None, sa_column=Column(Text))
    left_response_id: Optional[int] = None
    time_spent_ms: Optional[int] = None
    idempotency_key: Optional[str] = Field(default=None, index=True)  # retries of old keys look here
    recorded_at: datetime  # when this superseded state had been recorded
    replaced_at: datetime = Field(default_factory=utcnow)


class Rating(SQLModel, table=True):
    """A thumbs up/down on a single response: the unpaired signal KTO consumes."""

    __table_args__ = (UniqueConstraint("response_id", "rater_id"),)

    id: Optional[int] = Field(default=None, primary_key=True)
    response_id: int = Field(foreign_key="response.id", index=True)
    rater_id: int = Field(foreign_key="rater.id", index=True)
    thumbs_up: bool
    comment: Optional[str] = Field(default=None, sa_column=Column(Text))
    idempotency_key: Optional[str] = Field(default=None, unique=True)
    created_at: datetime = Field(default_factory=utcnow)


class Assignment(SQLModel, table=True):
    """A short reservation of a comparison for a rater, with the side shown on the left."""

    __table_args__ = (UniqueConstraint("comparison_id", "rater_id"),)

    id: Optional[int] = Field(default=None, primary_key=True)
    comparison_id: int = Field(foreign_key="comparison.id", index=True)
    rater_id: int = Field(foreign_key="rater.id", index=True)
    left_response_id: int = Field(foreign_key="response.id")
    reserved_until: datetime = Field(index=True)
    created_at: datetime = Field(default_factory=utcnow)


class TrainingRun(SQLModel, table=True):
    id: Optional[int] = Field(default=None, primary_key=True)
    kind: str = Field(index=True)  # sft | reward | dpo | kto | ppo
    status: RunStatus = Field(default=RunStatus.running, index=True)
    config: dict = _json(default={})
    snapshot_hash: Optional[str] = None
    snapshot_ids: dict = _json(default={})  # {"comparison_ids": [...], "rating_ids": [...], ...}
    git_commit: Optional[str] = None
    seed: Optional[int] = None
    metrics: dict = _json(default={})  # final metrics
    output_path: Optional[str] = None
    error: Optional[str] = Field(default=None, sa_column=Column(Text))
    base_model: Optional[str] = None
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: Optional[datetime] = None


class RunMetric(SQLModel, table=True):
    """One logged value of a training run's metric at a step (the curves on the dashboard)."""

    id: Optional[int] = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="trainingrun.id", index=True)
    step: int
    name: str
    value: float
    logged_at: datetime = Field(default_factory=utcnow)


class JudgeRun(SQLModel, table=True):
    """One `prefloop judge` invocation, with its cost ledger."""

    id: Optional[int] = Field(default=None, primary_key=True)
    rater_id: int = Field(foreign_key="rater.id", index=True)
    backend: str
    model: str
    template_version: str
    config: dict = _json(default={})
    status: RunStatus = Field(default=RunStatus.running)
    n_requests: int = 0
    n_decided: int = 0
    n_inconsistent: int = 0
    n_failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Optional[float] = None
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: Optional[datetime] = None


class JudgeCall(SQLModel, table=True):
    """One judge request (one comparison in one order): its verdict or why it failed."""

    id: Optional[int] = Field(default=None, primary_key=True)
    judge_run_id: int = Field(foreign_key="judgerun.id", index=True)
    comparison_id: int = Field(foreign_key="comparison.id", index=True)
    order: str  # "ab" (response_a shown first) or "ba"
    status: str  # ok | parse_error | http_error | timeout | empty
    verdict: Optional[str] = None  # a | b | tie, in canonical order
    confidence: Optional[float] = None
    raw_text: Optional[str] = Field(default=None, sa_column=Column(Text))
    error: Optional[str] = Field(default=None, sa_column=Column(Text))
    attempts: int = 1
    prompt_tokens: int = 0
    completion_tokens: int = 0
    created_at: datetime = Field(default_factory=utcnow)


class Evaluation(SQLModel, table=True):
    """One `prefloop eval`: a policy judged against another on eval prompts, both orders each.

    Its own table rather than a JSON field of TrainingRun: a policy is evaluated many times
    (against its parent, the base, a rival), concurrent evaluations insert rows instead of
    rewriting one document, and a policy with no training run can be evaluated too. The row
    points at the policy's training run, which is where the lineage view looks it up."""

    id: Optional[int] = Field(default=None, primary_key=True)
    policy_id: int = Field(foreign_key="policyversion.id", index=True)
    against_id: int = Field(foreign_key="policyversion.id")
    training_run_id: Optional[int] = Field(default=None, foreign_key="trainingrun.id", index=True)
    judge_rater_id: int = Field(foreign_key="rater.id")
    judge_run_id: Optional[int] = Field(default=None, foreign_key="judgerun.id")
    n: int  # prompts with a decided judgement
    wins: int
    ties: int
    losses: int
    undecided: int = 0  # prompts whose judgement failed
    win_rate: float  # ties count half
    ci_low: float
    ci_high: float
    mean_length_policy: float  # characters, over the judged responses
    mean_length_against: float
    judge_requests: int = 0
    judge_prompt_tokens: int = 0
    judge_completion_tokens: int = 0
    judge_cost: Optional[float] = None
    prompt_ids: list = _json(default=[])
    comparison_ids: list = _json(default=[])
    config: dict = _json(default={})
    created_at: datetime = Field(default_factory=utcnow)


class AppSetting(SQLModel, table=True):
    """Admin-set values shared by every server process (guidelines, target overlap, ...)."""

    key: str = Field(primary_key=True)
    value: Any = Field(default=None, sa_column=Column(JSON))
    updated_at: datetime = Field(default_factory=utcnow)


class LoopRound(SQLModel, table=True):
    """One round of `prefloop loop`: sample pairs from the current policy, label them, train a
    candidate from the current policy, judge it against it on eval prompts, promote or keep.

    `step` is the first step not finished yet; each step writes its outcome here when it ends,
    so a killed loop, rerun, continues at that step."""

    __table_args__ = (UniqueConstraint("loop", "round", name="uq_loopround_loop_round"),)

    id: Optional[int] = Field(default=None, primary_key=True)
    loop: str = Field(index=True)
    round: int
    method: str
    step: str = Field(default="sample")  # sample | label | train | evaluate | done
    start_policy_id: int = Field(foreign_key="policyversion.id")
    comparison_ids: list = _json(default=[])
    training_run_id: Optional[int] = Field(default=None, foreign_key="trainingrun.id")
    candidate_policy_id: Optional[int] = Field(default=None, foreign_key="policyversion.id")
    evaluation_id: Optional[int] = Field(default=None, foreign_key="evaluation.id")
    promoted: Optional[bool] = None
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: Optional[datetime] = None


__all__ = [
    "AppSetting",
    "Assignment",
    "Choice",
    "Comparison",
    "Evaluation",
    "JudgeCall",
    "JudgeRun",
    "LoopRound",
    "PolicyVersion",
    "Prompt",
    "Rater",
    "RaterKind",
    "Rating",
    "Response",
    "Role",
    "RunMetric",
    "RunStatus",
    "TrainingRun",
    "Vote",
    "VoteRevision",
    "utcnow",
]
