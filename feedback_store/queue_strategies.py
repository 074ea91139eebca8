"""Which pair a person sees next: queue-order strategies, written as `Comparison.priority`.

The queue (feedback_store.queue) serves the highest priority first, then the fewest human
votes, then the oldest pair. A strategy does not change the queue: it rewrites the priorities
of the open ordinary pairs once, when it is run (`prefloop queue prioritize --by STRATEGY`, or
the admin tab); re-run it as votes come in (an active order goes stale as it is answered).

Priority bands (higher first):

- > 0: raised on purpose: the judge's doubts (10, `prefloop judge --route-doubts` and the
  `judge-doubt` strategy), a loop round waiting for labels (5, loops.LOOP_PRIORITY), anything
  an admin raised. No strategy lowers these, except `fewest-votes` with `reset_raised=True`.
- 0: the default: pairs no strategy has ranked (e.g. added since the last run) come first
  among the ordinary ones, in fewest-votes order.
- -1 ... -(DEPTH + 1): a strategy's ranking, position i at -(1 + min(i, DEPTH)); the
  positions past DEPTH share one level and fall back on fewest-votes order among themselves.
- -(DEPTH + 2): pairs the strategy found useless (e.g. two responses of the same policy for
  `arena`).
- gold.GOLD_PRIORITY (-1,000,000): gold pairs, never touched here.

Strategies:

- `fewest-votes` (the default order): every ordinary pair back to 0, so fewest votes first.
  Raised priorities (> 0) are kept: they are explicit requests (a waiting loop round, the
  judge's doubts); `reset_raised=True` drops them to 0 as well.
- `uncertainty`: pairs ranked by |margin|, smallest first, where the margin is a reward
  model's score difference (or a policy's DPO implicit reward difference). The store does not
  score anything: the caller (alignment.queue_scoring, through `prefloop queue prioritize`)
  hands `order_by_margin` {comparison id: margin}. Spread over prompts (the default): each
  prompt's most uncertain pair first (smallest |margin| first), then each prompt's second, and
  so on. A batch answered before the next re-run then holds at most one pair per prompt while
  the open prompts last: the pairs of one prompt share responses, and the few closest margins
  of a store often sit on one prompt whose answers are all alike, so a batch of them would
  teach the model one thing many times (batch-mode active learning wants diverse batches).
- `judge-doubt`: what `prefloop judge --route-doubts` does, from the judge calls already
  stored: `judge_call_pairs` gives each judged pair's two calls, the caller decides which are
  doubts (labeling.judge.runner.decide / is_doubt) and `raise_priority` puts them at 10.
- `arena`: as Chatbot Arena samples its battles (Chiang et al. 2024, sec. 5: a pair's weight
  is the expected reduction of the confidence interval from one more vote), here on the
  policies' own ratings: the Bradley-Terry model fitted to the votes (feedback_store.
  leaderboard) gives each vote between policies a and b the Fisher information p(1 - p), p
  their fitted win probability, and the votes so far an information matrix F; the rating
  variances are the diagonal of F^-1 about the mean rating. The ranking is a greedy
  sequential design: the next position goes to a comparison of the policy pair whose vote
  would most reduce sum_a Var(a)^2 (the widest intervals count most), F is updated as if that
  vote were cast (a rank-one update), and so on. Pairs already compared often lose to pairs
  compared rarely (diminishing returns, as Chatbot Arena's sqrt(Var/n) rule), and a policy
  with a wide interval (few votes, or votes nearly all one way: little information each)
  draws votes from every side, which keeps the comparison graph linked. Within a policy pair the
  comparisons with the fewest votes in the ratings come first; pairs within one policy, which
  say nothing about the ratings, come last.

The chosen strategy is also stored as the app setting `queue_strategy` (shown by the admin tab).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import and_, bindparam, case, func, select, update
from sqlalchemy.orm import aliased
from sqlmodel import Session

from feedback_store.models import Comparison, JudgeCall, JudgeRun, Response

STRATEGIES = ("fewest-votes", "uncertainty", "judge-doubt", "arena")
STRATEGY_SETTING = "queue_strategy"
DEFAULT_STRATEGY = "fewest-votes"
DEPTH = 10_000  # ranked positions with a level of their own
USELESS_PRIORITY = -(DEPTH + 2)
DOUBT_PRIORITY = 10  # as labeling.judge.runner.JudgeRunConfig.doubt_priority
# `arena`'s information model: a vote between policies of win probability p carries p(1 - p)
# (at least INFO_FLOOR, so a pair fitted as certain is still worth something), and every
# rating starts with a weak prior (ARENA_PRIOR votes' worth), so an unrated policy has a large
# but finite variance.
INFO_FLOOR = 0.01
ARENA_PRIOR = 0.01


@dataclass(frozen=True)
class OpenPair:
    comparison_id: int
    human_votes: int
    policy_a: int
    policy_b: int
    prompt_id: int | None = None


def _gold_priority() -> int:
    from feedback_store.gold import GOLD_PRIORITY

    return GOLD_PRIORITY


def _ordinary():
    """Ordinary pairs (not gold) in the strategy band (priority <= 0)."""
    return and_(Comparison.gold_winner.is_(None), Comparison.priority <= 0, Comparison.priority > _gold_priority())


def open_pairs(*, session: Session, overlap: int | None = None) -> list[OpenPair]:
    """Ordinary pairs in the strategy band that still want human votes, fewest votes first."""
    from feedback_store.queue import target_overlap

    overlap = overlap or target_overlap(session=session)
    a, b = aliased(Response), aliased(Response)
    rows = session.execute(
        select(Comparison.id, Comparison.human_votes, a.policy_id, b.policy_id, Comparison.prompt_id)
        .join(a, a.id == Comparison.response_a_id)
        .join(b, b.id == Comparison.response_b_id)
        # Pairs the judge settled (`judge --judge-first`) have left the human queue: nothing to rank.
        .where(_ordinary(), Comparison.settled_by.is_(None), Comparison.human_votes < overlap)
        .order_by(Comparison.human_votes, Comparison.id)
    ).all()
    return [OpenPair(*row) for row in rows]


def set_strategy(name: str, *, session: Session) -> None:
    from feedback_store.app_settings import set_setting

    check_strategy(name)
    set_setting(STRATEGY_SETTING, name, session=session)


def current_strategy(*, session: Session) -> str:
    from feedback_store.app_settings import get_setting

    return str(get_setting(STRATEGY_SETTING, DEFAULT_STRATEGY, session=session))


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise ValueError(f"unknown queue strategy {name!r} (known: {', '.join(STRATEGIES)})")
    return name


def write_order(ranked: Sequence[int], *, session: Session, useless: Iterable[int] = ()) -> int:
    """Give `ranked` comparisons (best first) their band positions and `useless` ones the
    bottom of the band; only ordinary pairs in the band are changed. Returns rows written."""
    rows = [{"cid": cid, "p": -(1 + min(i, DEPTH))} for i, cid in enumerate(ranked)]
    rows += [{"cid": cid, "p": USELESS_PRIORITY} for cid in useless]
    if not rows:
        return 0
    table = Comparison.__table__
    statement = (
        update(table)
        .where(table.c.id == bindparam("cid"), table.c.gold_winner.is_(None), table.c.priority <= 0,
               table.c.priority > _gold_priority())
        .values(priority=bindparam("p"))
    )
    session.connection().execute(statement, rows)
    return len(rows)


# ---- the strategies -------------------------------------------------------------------------


def fewest_votes(*, session: Session, reset_raised: bool = False) -> int:
    """Every ordinary pair back to priority 0 (raised ones too with `reset_raised`). Returns rows changed."""
    table = Comparison.__table__
    band = and_(table.c.gold_winner.is_(None), table.c.priority > _gold_priority(), table.c.priority != 0)
    if not reset_raised:
        band = and_(band, table.c.priority < 0)
    result = session.connection().execute(update(table).where(band).values(priority=0))
    set_strategy("fewest-votes", session=session)
    return result.rowcount


def margin_order(margins: Mapping[int, float], prompts: Mapping[int, int] | None = None) -> list[int]:
    """Comparison ids by |margin|, smallest first; with `prompts` ({comparison id: prompt id})
    spread over prompts: every prompt's k-th smallest before any prompt's (k+1)-th. Ties and
    equal ranks go by comparison id. NaN margins are left out."""
    scored = sorted((abs(float(m)), cid) for cid, m in margins.items() if not math.isnan(float(m)))
    if prompts is None:
        return [cid for _, cid in scored]
    seen: dict[int, int] = defaultdict(int)
    keyed = []
    for rank, (_, cid) in enumerate(scored):
        prompt = prompts.get(cid, -cid)  # a pair of unknown prompt is a prompt of its own
        keyed.append((seen[prompt], rank, cid))
        seen[prompt] += 1
    keyed.sort()
    return [cid for _, _, cid in keyed]


def order_by_margin(margins: Mapping[int, float], *, session: Session, spread_prompts: bool = True) -> int:
    """`uncertainty`: open pairs ranked by |margin| (closest to zero first), spread over prompts
    unless `spread_prompts` is False. Pairs without a margin (NaN or missing) keep their
    priority. Returns the number of pairs ranked."""
    pairs = {p.comparison_id: p for p in open_pairs(session=session)}
    wanted = {cid: m for cid, m in margins.items() if cid in pairs}
    prompts = {cid: pairs[cid].prompt_id for cid in wanted} if spread_prompts else None
    ranked = margin_order(wanted, prompts)
    write_order(ranked, session=session)
    set_strategy("uncertainty", session=session)
    return len(ranked)


def raise_priority(comparison_ids: Sequence[int], *, session: Session, priority: int = DOUBT_PRIORITY) -> int:
    """`judge-doubt`: these pairs at `priority` (never lowering one), as --route-doubts does."""
    from feedback_store.loops import prioritize_for_humans

    ids = sorted(set(comparison_ids))
    for start in range(0, len(ids), 900):  # bound parameters per IN (...), under every limit
        prioritize_for_humans(ids[start:start + 900], session=session, priority=priority)
    set_strategy("judge-doubt", session=session)
    return len(ids)


def judge_call_pairs(*, session: Session, open_only: bool = True) -> dict[tuple[int, int], dict]:
    """{(judge rater id, comparison id): {"ab": JudgeCall, "ba": JudgeCall}}: each judge's
    latest successful call in each order, for pairs (still open, by default) it answered in both."""
    wanted = {p.comparison_id for p in open_pairs(session=session)} if open_only else None
    rows = session.execute(
        select(JudgeRun.rater_id, JudgeCall)
        .join(JudgeRun, JudgeRun.id == JudgeCall.judge_run_id)
        .where(JudgeCall.status == "ok")
        .order_by(JudgeCall.id)
    ).all()
    calls: dict[tuple[int, int], dict] = defaultdict(dict)
    for rater_id, call in rows:
        if wanted is None or call.comparison_id in wanted:
            calls[(rater_id, call.comparison_id)][call.order] = call  # later calls win
    return {key: both for key, both in calls.items() if set(both) == {"ab", "ba"}}


@dataclass(frozen=True)
class ArenaOrder:
    ranked: list[int]  # comparison ids, first served first
    useless: list[int]  # same-policy pairs
    weights: dict[tuple[str, str], float]  # policy pair -> expected gain of its next vote (ARENA_OBJECTIVE)


@dataclass(frozen=True)
class ArenaInputs:
    names: dict[int, str]  # policy id -> name
    ratings: dict[str, float]  # rated policies' Bradley-Terry ratings (Elo points)
    intervals: dict[str, tuple[float, float]]  # rated policies' bootstrap intervals (Elo points)
    pair_votes: dict[tuple[str, str], int]  # policy pair (sorted names) -> votes in the ratings
    comparison_votes: dict[int, int]  # comparison id -> votes in the ratings


def _fisher(names: Sequence[str], ratings: Mapping[str, float], pair_votes: Mapping[tuple[str, str], int]):
    """Per-vote information of each policy pair under the fitted ratings and the information
    matrix of the votes so far (plus the gauge and a weak prior, so it is invertible)."""
    from feedback_store.leaderboard import ELO_SCALE

    p = len(names)
    strength = np.array([ratings.get(n, math.nan) for n in names]) / ELO_SCALE
    strength = np.where(np.isnan(strength), np.nanmean(strength) if np.isfinite(strength).any() else 0.0, strength)
    win = 1.0 / (1.0 + np.exp(-(strength[:, None] - strength[None, :])))
    info = np.clip(win * (1.0 - win), INFO_FLOOR, None)
    matrix = np.full((p, p), 1.0 / p) + ARENA_PRIOR * np.eye(p)
    index = {n: i for i, n in enumerate(names)}
    for (a, b), n in pair_votes.items():
        if a in index and b in index and a != b:
            i, j = index[a], index[b]
            d = np.zeros(p)
            d[i], d[j] = 1.0, -1.0
            matrix += n * info[i, j] * np.outer(d, d)
    return info, matrix


def arena_order(pairs: Sequence[OpenPair], policy_names: Mapping[int, str], ratings: Mapping[str, float],
                pair_votes: Mapping[tuple[str, str], int] | None = None,
                comparison_votes: Mapping[int, int] | None = None) -> ArenaOrder:
    """The `arena` ranking of these open pairs: greedy sequential design on the Bradley-Terry
    information (see the module docstring). Within a policy pair, the comparisons with the
    fewest votes in the ratings come first (then fewest human votes, then oldest)."""
    pair_votes, comparison_votes = pair_votes or {}, comparison_votes or {}
    by_policy_pair: dict[tuple[str, str], list[OpenPair]] = defaultdict(list)
    useless = []
    for pair in pairs:
        p, q = policy_names[pair.policy_a], policy_names[pair.policy_b]
        if p == q:
            useless.append(pair.comparison_id)
        else:
            by_policy_pair[tuple(sorted((p, q)))].append(pair)
    if not by_policy_pair:
        return ArenaOrder([], useless, {})
    for members in by_policy_pair.values():
        members.sort(key=lambda o: (comparison_votes.get(o.comparison_id, 0), o.human_votes, o.comparison_id))
    names = sorted({n for key in by_policy_pair for n in key} | set(ratings))
    index = {n: i for i, n in enumerate(names)}
    keys = sorted(by_policy_pair)
    info_matrix, matrix = _fisher(names, ratings, pair_votes)
    cov = np.linalg.inv(matrix)
    d = np.zeros((len(names), len(keys)))
    for k, (a, b) in enumerate(keys):
        d[index[a], k], d[index[b], k] = 1.0, -1.0
    info = np.array([info_matrix[index[a], index[b]] for a, b in keys])
    left = np.array([len(by_policy_pair[key]) for key in keys])
    taken = np.zeros(len(keys), dtype=int)
    ranked, weights = [], {}
    for step in range(min(int(left.sum()), DEPTH)):
        u = cov @ d  # (P, K)
        centred = u - u.mean(axis=0, keepdims=True)
        variance = np.diag(cov) - 2 * cov.mean(axis=1) + cov.mean()  # of each rating about the mean
        drop = info * centred ** 2 / (1.0 + info * (d * u).sum(axis=0))  # (P, K): variance removed by a vote
        gain = (variance[:, None] ** 2 - (variance[:, None] - drop) ** 2).sum(axis=0)
        gain = np.where(taken < left, gain, -np.inf)
        if step == 0:
            weights = {key: float(g) for key, g in zip(keys, gain)}
        k = int(np.argmax(gain))
        ranked.append(by_policy_pair[keys[k]][taken[k]].comparison_id)
        taken[k] += 1
        cov -= info[k] * np.outer(u[:, k], u[:, k]) / (1.0 + info[k] * d[:, k] @ u[:, k])
    rest = [(i, o.comparison_id) for key, t in zip(keys, taken) for i, o in enumerate(by_policy_pair[key][t:])]
    ranked += [cid for _, cid in sorted(rest)]  # past DEPTH: round-robin over the policy pairs
    return ArenaOrder(ranked, useless, weights)


def arena_inputs(*, session: Session, kinds: Sequence[str] | None = None, n_bootstrap: int = 200,
                 seed: int = 0) -> ArenaInputs:
    """What `arena` needs, from the leaderboard of the votes of `kinds` (default: the
    leaderboard's own, all but simulated); gold votes left out."""
    from feedback_store.leaderboard import LeaderboardConfig
    from feedback_store.models import PolicyVersion
    from feedback_store.stats import StatsConfig, leaderboard_stats
    from feedback_store.vote_table import load_raters, load_votes

    config = StatsConfig(leaderboard=LeaderboardConfig(n_bootstrap=n_bootstrap, seed=seed),
                         **({"leaderboard_kinds": tuple(kinds)} if kinds is not None else {}))
    raters = load_raters(session=session)
    votes = load_votes(raters, session=session).without_gold()
    names = dict(session.execute(select(PolicyVersion.id, PolicyVersion.name)).all())
    board = leaderboard_stats(votes, raters, names, config)
    counted = votes.subset(raters.of_kinds(config.leaderboard_kinds)[votes.rater]) if len(votes) else votes
    pair_votes: dict[tuple[str, str], int] = defaultdict(int)
    comparison_votes: dict[int, int] = defaultdict(int)
    for cid, a, b in zip(counted.comparison.tolist(), counted.policy_a.tolist(), counted.policy_b.tolist()):
        comparison_votes[cid] += 1
        if a != b:
            pair_votes[tuple(sorted((names[a], names[b])))] += 1
    return ArenaInputs(names, {r.policy: r.rating for r in board.ratings if not math.isnan(r.rating)},
                       {r.policy: (r.ci_low, r.ci_high) for r in board.ratings}, dict(pair_votes),
                       dict(comparison_votes))


def rating_intervals(*, session: Session, kinds: Sequence[str] | None = None, n_bootstrap: int = 200,
                     seed: int = 0) -> tuple[dict[int, str], dict[str, tuple[float, float]]]:
    """Policy names by id and each rated policy's (ci_low, ci_high), from the leaderboard of
    the votes of `kinds` (default: the leaderboard's own, all but simulated); gold votes left out."""
    inputs = arena_inputs(session=session, kinds=kinds, n_bootstrap=n_bootstrap, seed=seed)
    return inputs.names, inputs.intervals


def arena(*, session: Session, kinds: Sequence[str] | None = None, n_bootstrap: int = 200,
          seed: int = 0) -> ArenaOrder:
    """`arena`: rank the open pairs by the expected gain in the ratings' precision and write the order."""
    inputs = arena_inputs(session=session, kinds=kinds, n_bootstrap=n_bootstrap, seed=seed)
    order = arena_order(open_pairs(session=session), inputs.names, inputs.ratings, inputs.pair_votes,
                        inputs.comparison_votes)
    write_order(order.ranked, session=session, useless=order.useless)
    set_strategy("arena", session=session)
    return order


def priority_counts(*, session: Session) -> dict[str, int]:
    """How many ordinary pairs are raised (> 0), at the default (0), ranked (< 0): for reports."""
    table = Comparison.__table__
    level = case((table.c.priority > 0, 1), (table.c.priority < 0, -1), else_=0)
    rows = session.connection().execute(
        select(level, func.count()).where(table.c.gold_winner.is_(None)).group_by(level)
    ).all()
    names = {1: "raised", 0: "default", -1: "ranked"}
    counts = {name: 0 for name in names.values()}
    for sign, n in rows:
        counts[names[int(sign)]] = int(n)
    return counts
