"""Simulated annotators, in the manner of AlpacaFarm's: rule-following raters with known noise.

Each simulated rater is a `Rater` of kind `simulated` (named
"sim:<rule>:noise=<P>:left=<Q>:<i>" by `make_raters`). Per pair it:

1. takes the next pair from the same queue the app uses (feedback_store.queue.
   next_comparison_for, which reserves it and picks the left side at random), or, when
   feedback_store.gold.gold_due says so, a gold pair (feedback_store.gold.next_gold_for), as
   the app will;
2. applies its rule to the pair as shown (left = first): a rubric judge rule
   (labeling.judge.rubric: `shorter`, `longer`, `no-refusal`, chains like
   "no-refusal,shorter", or "module:function"), or a reward model's scores (`reward_scorer`,
   the higher score wins);
3. flips a decisive verdict (left <-> right) with probability `noise` (a tie stays a tie);
4. with probability `left_bias`, picks the left response whatever the rule said;
5. votes through feedback_store.votes.record_vote, with an idempotency key per (rater, pair)
   ("sim:<rater>:<comparison>") like the app's per-submission key: a retried submission
   returns the stored vote and counts nothing twice.

So with left bias Q the expected left-pick rate is Q + (1 - Q) / 2 on pairs the rule decides
at random with respect to position. Votes also carry a made-up `time_spent_ms` (log-normal,
median `median_time_ms`). Simulated votes do not count as human votes (the queue's overlap is
about humans) and stay out of exports and statistics unless asked for by name.

Everything is drawn from one `random.Random(seed)`, so a run on the same store is repeatable.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlmodel import Session

from feedback_store.models import Choice, Rater, RaterKind

Rule = Callable[[Sequence[dict], str, str], str]  # (conversation, first, second) -> "A" | "B" | "C"


@dataclass(frozen=True)
class SimulatedRater:
    name: str
    rule: str = "shorter"
    noise: float = 0.0
    left_bias: float = 0.0

    def __post_init__(self) -> None:
        for label, value in (("noise", self.noise), ("left_bias", self.left_bias)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{label} must be between 0 and 1 (got {value})")


@dataclass
class SimulationReport:
    votes: dict[str, int] = field(default_factory=dict)  # rater name -> votes cast in this run
    gold_votes: dict[str, int] = field(default_factory=dict)
    flips: dict[str, int] = field(default_factory=dict)  # verdicts flipped by noise
    left_forced: dict[str, int] = field(default_factory=dict)  # votes decided by left bias

    @property
    def total(self) -> int:
        return sum(self.votes.values())


def get_or_create_simulated(name: str, *, session: Session) -> Rater:
    from feedback_store.raters import get_rater

    rater = get_rater(name, session=session)
    if rater is not None:
        if rater.kind != RaterKind.simulated:
            raise ValueError(f"{name!r} is a {RaterKind(rater.kind).value} rater, not a simulated one")
        return rater
    rater = Rater(name=name, kind=RaterKind.simulated)
    session.add(rater)
    session.flush()
    return rater


def reward_model_rule(scorer) -> Rule:
    """A rule from a reward model (alignment.reward_scoring.RewardScorer or anything with
    `score_batch(prompts, responses)`): the response with the higher score wins, equal is a tie."""

    def rule(conversation: Sequence[dict], first: str, second: str) -> str:
        one, two = scorer.score_batch([list(conversation)] * 2, [first, second])
        return "A" if one > two else "B" if two > one else "C"

    return rule


def load_reward_run_rule(engine, run_id: int) -> Rule:
    """The reward model of finished reward run `run_id` as a rule (loads torch and the model)."""
    from alignment.reward_scoring import RewardScorer
    from alignment.training.ppo_reward import reward_run_path

    return reward_model_rule(RewardScorer.load(reward_run_path(engine, run_id)))


def simulated_vote(rule: Rule, conversation: Sequence[dict], left: str, right: str, rater: SimulatedRater,
                   rng: random.Random) -> tuple[str, bool, bool]:
    """("left" | "right" | "tie", flipped by noise, forced left by bias). Always draws two numbers,
    so one rater's stream does not depend on what the rule said."""
    forced, flip = rng.random() < rater.left_bias, rng.random() < rater.noise
    letter = rule(conversation, left, right)
    verdict = {"A": "left", "B": "right"}.get(letter, "tie")
    flipped = flip and verdict != "tie"
    if flipped:
        verdict = "right" if verdict == "left" else "left"
    if forced:
        return "left", flipped, True
    return verdict, flipped, False


def simulate(
    engine,
    raters: Sequence[SimulatedRater],
    *,
    votes_per_rater: int,
    seed: int = 0,
    rule: Rule | None = None,
    median_time_ms: float = 8000.0,
    use_gold: bool = True,
) -> SimulationReport:
    """Each rater in turn takes up to `votes_per_rater` pairs from the queue (fewer when it runs
    dry) and votes on them; one transaction per vote, as the app commits each submission.
    `rule` overrides the raters' rule names (e.g. a reward model's rule)."""
    from feedback_store.db import session_scope
    from feedback_store.gold import gold_due, next_gold_for
    from feedback_store.queue import next_comparison_for, pair_view
    from feedback_store.votes import record_vote
    from labeling.judge.rubric import resolve_rule

    if votes_per_rater < 0:
        raise ValueError("votes_per_rater must not be negative")
    rules = {spec.rule: rule or resolve_rule(spec.rule) for spec in raters}
    report = SimulationReport()
    with session_scope(engine) as session:
        ids = {spec.name: get_or_create_simulated(spec.name, session=session).id for spec in raters}
    for spec in raters:
        rater_rng = random.Random(f"{seed}:{spec.name}")  # each rater its own stream
        rater_id, done = ids[spec.name], 0
        for name in ("votes", "gold_votes", "flips", "left_forced"):
            getattr(report, name)[spec.name] = 0
        while done < votes_per_rater:
            with session_scope(engine) as session:
                assignment = None
                gold = use_gold and gold_due(rater_id, session, rng=rater_rng)
                if gold:
                    assignment = next_gold_for(rater_id, session, rng=rater_rng)
                if assignment is None:
                    gold = False
                    assignment = next_comparison_for(rater_id, session=session, rng=rater_rng)
                if assignment is None and use_gold:
                    assignment = next_gold_for(rater_id, session, rng=rater_rng)
                    gold = assignment is not None
                if assignment is None:
                    break
                view = pair_view(assignment, session=session)
                verdict, flipped, forced = simulated_vote(
                    rules[spec.rule], view.prompt.messages, view.left.text, view.right.text, spec, rater_rng
                )
                choice = Choice.tie if verdict == "tie" else (
                    Choice.a if (view.left if verdict == "left" else view.right).id
                    == view.comparison.response_a_id else Choice.b
                )
                time_ms = int(rater_rng.lognormvariate(math.log(median_time_ms), 0.5))
                record_vote(view.comparison.id, rater_id, choice, session=session,
                            left_response_id=view.left.id, time_spent_ms=time_ms,
                            idempotency_key=f"sim:{spec.name}:{view.comparison.id}")
            done += 1
            report.votes[spec.name] += 1
            report.gold_votes[spec.name] += int(gold)
            report.flips[spec.name] += int(flipped)
            report.left_forced[spec.name] += int(forced)
    return report


def make_raters(n: int, *, rule: str = "shorter", noise: float = 0.0, left_bias: float = 0.0,
                prefix: str | None = None) -> list[SimulatedRater]:
    """n raters alike, named "<prefix><i>"; the default prefix "sim:<rule>:noise=P:left=Q:" keeps
    raters of different settings apart across runs (the same settings continue the same raters)."""
    prefix = prefix if prefix is not None else f"sim:{rule}:noise={noise:g}:left={left_bias:g}:"
    return [SimulatedRater(f"{prefix}{i}", rule=rule, noise=noise, left_bias=left_bias) for i in range(1, n + 1)]
