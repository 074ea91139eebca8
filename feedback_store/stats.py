"""Statistics over the store: counts, agreement, position bias, throughput, leaderboard, judge vs human.

`compute_stats(session=...)` reads the votes with one query (columns, not ORM objects) and
does everything else with numpy, so 100,000 votes take well under a second or two. Every
part is also a plain function of `VoteColumns`, testable without a database.

Labels: agreement uses the four vote choices as nominal categories. Judge-vs-human
collapses "both bad" into "tie", because a judge's verdict ([[A]] / [[B]] / [[C]]) has no
"both bad" and would otherwise disagree by construction. Following MT-Bench, judge-vs-human
agreement is over every (judge vote, human vote) pair on a comparison both labelled.

Simulated raters (`prefloop simulate`) are left out of every section unless its kinds name
`simulated` (`prefloop stats --include-simulated` adds it everywhere); the counts show them
apart in `votes_by_kind`. Votes on gold pairs (feedback_store.gold) count only for `raters`
(feedback_store.rater_quality: accuracy on gold), never for agreement, position bias,
throughput, the leaderboard or judge-vs-human.

The leaderboard can be style-controlled (`LeaderboardConfig(style_control=True)`, `prefloop
stats --style-control`: feedback_store.style), is also given per prompt tag
(`leaderboard_by_tag`, raw ratings), and `length_bias` says how often the longer response wins,
for judge votes and for human votes on the same comparisons (those voted by both).

NaN marks an undefined statistic in the dataclasses; `Stats.to_dict()` turns it into None.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import binom
from sqlalchemy import String, cast, func, select
from sqlmodel import Session

from feedback_store.agreement import (
    cohen_kappa_from_confusion,
    fleiss_kappa,
    krippendorff_alpha_from_counts,
    percent_agreement_from_confusion,
)
from feedback_store.app_settings import quality_threshold
from feedback_store.evaluations import EvaluationSummary, list_evaluations
from feedback_store.leaderboard import Leaderboard, LeaderboardConfig, bradley_terry_leaderboard
from feedback_store.models import (
    Comparison,
    PolicyVersion,
    Prompt,
    RaterKind,
    Rating,
    Response,
)
from feedback_store.rater_quality import RaterQuality, rater_quality
from feedback_store.vote_table import CHOICES, RaterTable, VoteColumns, load_raters, load_votes

JUDGE_CATEGORIES = ("a", "b", "tie")  # both_bad folded into tie
KINDS = tuple(kind.value for kind in RaterKind)
DEFAULT_KINDS = tuple(kind for kind in KINDS if kind != RaterKind.simulated.value)  # simulated: only when asked


@dataclass(frozen=True)
class StatsConfig:
    min_overlap: int = field(
        default=5, metadata={"help": "comparisons two raters must share for their pairwise Cohen's kappa to be listed"}
    )
    agreement_kinds: tuple[str, ...] = field(
        default=("human",), metadata={"help": "rater kinds whose votes count for inter-annotator agreement"}
    )
    leaderboard_kinds: tuple[str, ...] = field(
        default=DEFAULT_KINDS, metadata={"help": "rater kinds whose votes count for the leaderboard"}
    )
    rater_kinds: tuple[str, ...] = field(
        default=DEFAULT_KINDS,
        metadata={"help": "rater kinds listed per rater (position bias, throughput, raters' quality)"},
    )
    quality_threshold: float | None = field(
        default=None,
        metadata={"help": "raters whose quality score is below this are flagged (below_threshold); "
                          "default: the admin's app setting rater_quality_threshold (0.7 unless set)"},
    )
    min_gold: int = field(
        default=10, metadata={"help": "gold votes a rater needs before gold accuracy is its quality score"}
    )
    idle_gap_s: float = field(
        default=600.0, metadata={"help": "a gap between two votes longer than this is a break, not active time"}
    )
    leaderboard: LeaderboardConfig = field(default_factory=LeaderboardConfig)

    def __post_init__(self) -> None:
        for name in ("agreement_kinds", "leaderboard_kinds", "rater_kinds"):
            unknown = set(getattr(self, name)) - set(KINDS)
            if unknown:
                raise ValueError(f"{name}: unknown rater kind {sorted(unknown)[0]!r} (known: {', '.join(KINDS)})")
        if self.min_overlap < 1:
            raise ValueError("min_overlap must be at least 1")


# ---- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    prompts: int
    responses: int
    comparisons: int
    votes: int
    ratings: int
    raters: int
    policies: int
    raters_by_kind: dict[str, int]
    votes_by_kind: dict[str, int]


@dataclass(frozen=True)
class PairAgreement:
    rater_a: str
    rater_b: str
    n: int  # comparisons both rated
    percent_agreement: float
    kappa: float


@dataclass(frozen=True)
class Agreement:
    categories: list[str]
    raters: int  # raters with at least one vote counted
    items_multi: int  # comparisons with two or more of their votes
    percent_agreement: float  # over every pair of votes on the same comparison
    pairwise: list[PairAgreement]  # Cohen's kappa per pair of raters with enough overlap
    mean_pairwise_kappa: float  # weighted by overlap
    fleiss_kappa: float
    fleiss_items: int
    fleiss_raters_per_item: int  # the most common number of raters per comparison
    krippendorff_alpha: float
    krippendorff_items: int


@dataclass(frozen=True)
class PositionBias:
    rater: str
    kind: str
    n: int  # decisive votes with a known left side
    left_picks: int
    left_rate: float
    p_value: float  # two-sided binomial test against 0.5


@dataclass(frozen=True)
class Throughput:
    rater: str
    kind: str
    votes: int
    active_hours: float
    votes_per_hour: float  # over active time (gaps longer than idle_gap_s are breaks)
    median_time_spent_ms: float


@dataclass(frozen=True)
class JudgeAgreement:
    judge: str
    n_comparisons: int
    n_pairs: int
    percent_agreement: float
    kappa: float
    decisive_agreement: float  # over pairs where both said a or b


@dataclass(frozen=True)
class JudgeVsHuman:
    categories: list[str]
    n_comparisons: int
    n_pairs: int
    percent_agreement: float
    kappa: float
    decisive_agreement: float
    by_judge: list[JudgeAgreement]


@dataclass(frozen=True)
class LongerWins:
    rater: str  # 'judge' / 'human' (every vote of that kind), or a judge's name
    votes: int  # decisive votes (a or b) on pairs whose two responses differ in length
    longer_wins: int
    rate: float  # longer_wins / votes
    p_value: float  # two-sided binomial test against 0.5
    ties: int  # tie / both-bad votes on those pairs, not counted in the rate


@dataclass(frozen=True)
class LengthBias:
    """How often the longer response wins, on comparisons voted by both a judge and a human
    (the same pairs for both, so the rates are comparable); lengths in characters."""

    n_comparisons: int  # comparisons voted by both kinds whose responses differ in length
    equal_length: int  # comparisons voted by both kinds left out: responses of the same length
    judge: LongerWins
    human: LongerWins
    by_judge: list[LongerWins]
    length_unit: str = "characters"


@dataclass(frozen=True)
class Stats:
    counts: Counts
    agreement: Agreement
    position_bias: list[PositionBias]
    throughput: list[Throughput]
    leaderboard: Leaderboard
    judge_vs_human: JudgeVsHuman
    evaluations: list[EvaluationSummary] = field(default_factory=list)  # `prefloop eval` results, oldest first
    raters: list[RaterQuality] = field(default_factory=list)  # annotator quality (feedback_store.rater_quality)
    leaderboard_by_tag: dict[str, Leaderboard] = field(default_factory=dict)  # raw ratings per prompt tag
    length_bias: LengthBias | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict: `leaderboard` is the list of ratings (with `controlled_rating` and its
        interval when style control is on, the style coefficients then in `leaderboard_style_control`);
        the matrices sit in `win_rate`; `leaderboard_by_tag` maps each prompt tag to its ratings."""
        board = self.leaderboard.to_dict()
        style = board.pop("style_control", None)
        result = {
            "counts": asdict(self.counts),
            "agreement": asdict(self.agreement),
            "position_bias": [asdict(row) for row in self.position_bias],
            "throughput": [asdict(row) for row in self.throughput],
            "leaderboard": board.pop("ratings"),
            "win_rate": board,
            "judge_vs_human": asdict(self.judge_vs_human),
            "evaluations": [evaluation.to_dict() for evaluation in self.evaluations],
            "raters": [row.to_dict() for row in self.raters],
            "leaderboard_by_tag": {tag: [row.to_dict() for row in tagged.ratings]
                                   for tag, tagged in self.leaderboard_by_tag.items()},
            "length_bias": asdict(self.length_bias) if self.length_bias is not None else None,
        }
        if style is not None:
            result["leaderboard_style_control"] = style
        return _json_safe(result)


def _json_safe(value):
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


# ---- the statistics -------------------------------------------------------------------------


def count_rows(raters: RaterTable, votes: VoteColumns, *, session: Session) -> Counts:
    def count(model) -> int:
        return int(session.execute(select(func.count()).select_from(model)).scalar_one())

    kinds = np.array(raters.kinds, dtype=object)
    voted_kinds = kinds[votes.rater] if len(votes) else np.zeros(0, dtype=object)
    return Counts(
        prompts=count(Prompt),
        responses=count(Response),
        comparisons=count(Comparison),
        votes=len(votes),
        ratings=count(Rating),
        raters=len(raters.ids),
        policies=count(PolicyVersion),
        # simulated raters are listed only where there are some
        raters_by_kind={kind: int((kinds == kind).sum()) for kind in KINDS
                        if kind in DEFAULT_KINDS or (kinds == kind).any()},
        votes_by_kind={kind: int((voted_kinds == kind).sum()) for kind in KINDS
                       if kind in DEFAULT_KINDS or (kinds == kind).any()},
    )


def _vote_pairs(comparison: np.ndarray, rater: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) of votes on the same comparison, with rater[i] < rater[j]."""
    order = np.lexsort((rater, comparison))
    sorted_comparison = comparison[order]
    firsts, seconds = [], []
    for offset in range(1, len(order)):
        same = sorted_comparison[:-offset] == sorted_comparison[offset:]
        if not same.any():
            break  # groups are contiguous: no pair this far apart means none farther either
        where = np.flatnonzero(same)
        firsts.append(order[where])
        seconds.append(order[where + offset])
    if not firsts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(firsts), np.concatenate(seconds)


def _comparison_counts(comparison: np.ndarray, labels: np.ndarray, n_categories: int) -> np.ndarray:
    _, item = np.unique(comparison, return_inverse=True)
    n_items = int(item.max()) + 1 if len(item) else 0
    return np.bincount(item * n_categories + labels, minlength=n_items * n_categories).reshape(n_items, n_categories)


def agreement_stats(votes: VoteColumns, raters: RaterTable, config: StatsConfig = StatsConfig()) -> Agreement:
    votes = votes.subset(raters.of_kinds(config.agreement_kinds)[votes.rater]) if len(votes) else votes
    c = len(CHOICES)
    first, second = _vote_pairs(votes.comparison, votes.rater)
    r1, r2 = votes.rater[first], votes.rater[second]
    pair_key, pair_index = np.unique(r1 * len(raters.ids) + r2, return_inverse=True)
    confusions = np.bincount(
        pair_index * c * c + votes.choice[first] * c + votes.choice[second], minlength=len(pair_key) * c * c
    ).reshape(len(pair_key), c, c)
    overlap = confusions.sum(axis=(1, 2))
    kappas = np.atleast_1d(cohen_kappa_from_confusion(confusions))
    agreements = np.atleast_1d(percent_agreement_from_confusion(confusions))
    listed = np.flatnonzero(overlap >= config.min_overlap)
    pairwise = [
        PairAgreement(
            raters.names[pair_key[k] // len(raters.ids)],
            raters.names[pair_key[k] % len(raters.ids)],
            int(overlap[k]),
            float(agreements[k]),
            float(kappas[k]),
        )
        for k in listed
    ]
    defined = listed[~np.isnan(kappas[listed])]
    mean_kappa = float(np.average(kappas[defined], weights=overlap[defined])) if len(defined) else math.nan

    counts = _comparison_counts(votes.comparison, votes.choice, c)
    per_item = counts.sum(axis=1)
    multi = per_item[per_item >= 2]
    if len(multi):
        sizes, frequency = np.unique(multi, return_counts=True)
        m = int(sizes[np.flatnonzero(frequency == frequency.max())[-1]])  # most common; the larger on a tie
        fleiss_rows = counts[per_item == m]
        fleiss = fleiss_kappa(fleiss_rows)
    else:
        m, fleiss_rows, fleiss = 0, counts[:0], math.nan
    return Agreement(
        categories=list(CHOICES),
        raters=len(np.unique(votes.rater)),
        items_multi=len(multi),
        percent_agreement=float(percent_agreement_from_confusion(confusions.sum(axis=0))),
        pairwise=pairwise,
        mean_pairwise_kappa=mean_kappa,
        fleiss_kappa=fleiss,
        fleiss_items=len(fleiss_rows),
        fleiss_raters_per_item=m,
        krippendorff_alpha=krippendorff_alpha_from_counts(counts),
        krippendorff_items=len(multi),
    )


def two_sided_fair_coin_p(k: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Two-sided binomial-test p-values against p = 0.5, for many (k, n) at once.

    At p = 0.5 the distribution is symmetric, so scipy.stats.binomtest's two-sided p-value
    (the mass of outcomes no likelier than k) is 2 * P(X <= min(k, n - k)), capped at 1."""
    k, n = np.asarray(k), np.asarray(n)
    return np.minimum(1.0, 2 * binom.cdf(np.minimum(k, n - k), n, 0.5))


def position_bias_stats(votes: VoteColumns, raters: RaterTable) -> list[PositionBias]:
    """Per rater: how often the response shown on the left was picked, among decisive votes."""
    decisive = (votes.choice <= 1) & (votes.choice >= 0) & (votes.left >= 0)
    picked = np.where(votes.choice == 0, votes.response_a, votes.response_b)
    left_pick = decisive & (picked == votes.left)
    n = np.bincount(votes.rater[decisive], minlength=len(raters.ids))
    k = np.bincount(votes.rater[left_pick], minlength=len(raters.ids))
    listed = np.flatnonzero(n)
    p_values = two_sided_fair_coin_p(k[listed], n[listed])
    return [
        PositionBias(raters.names[r], raters.kinds[r], int(n[r]), int(k[r]), float(k[r] / n[r]), float(p))
        for r, p in zip(listed, p_values)
    ]


def throughput_stats(votes: VoteColumns, raters: RaterTable, config: StatsConfig = StatsConfig()) -> list[Throughput]:
    order = np.lexsort((votes.created_s, votes.rater))
    rater, created, spent = votes.rater[order], votes.created_s[order], votes.time_spent_ms[order]
    gaps = np.diff(created)
    active_gap = (rater[1:] == rater[:-1]) & (gaps <= config.idle_gap_s)
    # Within a stretch of activity, k votes span k - 1 gaps: the rate is (active gaps) / (their time).
    n_gaps = np.bincount(rater[1:][active_gap], minlength=len(raters.ids))
    seconds = np.bincount(rater[1:][active_gap], weights=gaps[active_gap], minlength=len(raters.ids))
    n_votes = np.bincount(rater, minlength=len(raters.ids))
    starts = np.concatenate([[0], np.cumsum(n_votes)])
    rows = []
    for r in np.flatnonzero(n_votes):
        own = spent[starts[r] : starts[r + 1]]
        own = own[~np.isnan(own)]
        rows.append(
            Throughput(
                rater=raters.names[r],
                kind=raters.kinds[r],
                votes=int(n_votes[r]),
                active_hours=float(seconds[r] / 3600),
                votes_per_hour=float(n_gaps[r] / seconds[r] * 3600) if seconds[r] > 0 else math.nan,
                median_time_spent_ms=float(np.median(own)) if len(own) else math.nan,
            )
        )
    return rows


def _judge_agreement(name: str, confusion: np.ndarray, n_comparisons: int) -> JudgeAgreement:
    return JudgeAgreement(
        judge=name,
        n_comparisons=n_comparisons,
        n_pairs=int(confusion.sum()),
        percent_agreement=float(percent_agreement_from_confusion(confusion)),
        kappa=float(cohen_kappa_from_confusion(confusion)),
        decisive_agreement=float(percent_agreement_from_confusion(confusion[:2, :2])),
    )


def judge_vs_human_stats(votes: VoteColumns, raters: RaterTable) -> JudgeVsHuman:
    c = len(JUDGE_CATEGORIES)
    labels = np.minimum(votes.choice, 2)  # both_bad -> tie
    is_judge = raters.of_kinds({RaterKind.judge.value})[votes.rater]
    is_human = raters.of_kinds({RaterKind.human.value})[votes.rater]
    judge_idx, human_idx = np.flatnonzero(is_judge), np.flatnonzero(is_human)
    human_idx = human_idx[np.argsort(votes.comparison[human_idx], kind="stable")]
    human_comparisons = votes.comparison[human_idx]
    # Every (judge vote, human vote) pair on the same comparison.
    lo = np.searchsorted(human_comparisons, votes.comparison[judge_idx], side="left")
    hi = np.searchsorted(human_comparisons, votes.comparison[judge_idx], side="right")
    matches = hi - lo
    pair_judge = np.repeat(judge_idx, matches)
    offsets = np.arange(matches.sum()) - np.repeat(np.cumsum(matches) - matches, matches)
    pair_human = human_idx[np.repeat(lo, matches) + offsets]

    judge_rater = votes.rater[pair_judge]
    judges, judge_of_pair = np.unique(judge_rater, return_inverse=True)
    confusions = np.bincount(
        judge_of_pair * c * c + labels[pair_judge] * c + labels[pair_human], minlength=len(judges) * c * c
    ).reshape(len(judges), c, c)
    by_judge = [
        _judge_agreement(
            raters.names[r], confusions[j], len(np.unique(votes.comparison[pair_judge[judge_of_pair == j]]))
        )
        for j, r in enumerate(judges)
    ]
    overall = _judge_agreement("all", confusions.sum(axis=0), len(np.unique(votes.comparison[pair_judge])))
    return JudgeVsHuman(
        categories=list(JUDGE_CATEGORIES),
        n_comparisons=overall.n_comparisons,
        n_pairs=overall.n_pairs,
        percent_agreement=overall.percent_agreement,
        kappa=overall.kappa,
        decisive_agreement=overall.decisive_agreement,
        by_judge=by_judge,
    )


def load_style_features(*, session: Session) -> tuple[np.ndarray, np.ndarray]:
    """(response ids ascending, their style features (n, len(STYLE_FEATURES))) for every response."""
    from feedback_store.style import style_feature_table

    rows = session.execute(select(Response.id, Response.text).order_by(Response.id)).all()
    return np.array([r[0] for r in rows], dtype=np.int64), style_feature_table([r[1] for r in rows])


def _lookup(ids: np.ndarray, table: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    return table[np.searchsorted(ids, wanted)]


def leaderboard_stats(votes: VoteColumns, raters: RaterTable, policy_names: dict[int, str],
                      config: StatsConfig = StatsConfig(), style: tuple[np.ndarray, np.ndarray] | None = None
                      ) -> Leaderboard:
    """`style`: load_style_features's (ids, features), needed when config.leaderboard.style_control."""
    if len(votes):
        votes = votes.subset(raters.of_kinds(config.leaderboard_kinds)[votes.rater])
    ids = np.array(sorted(policy_names), dtype=np.int64)
    style_first = style_second = None
    if config.leaderboard.style_control:
        if style is None:
            raise ValueError("style control needs the responses' style features (load_style_features)")
        style_first = _lookup(*style, votes.response_a)
        style_second = _lookup(*style, votes.response_b)
    return bradley_terry_leaderboard(
        np.searchsorted(ids, votes.policy_a),
        np.searchsorted(ids, votes.policy_b),
        np.array(CHOICES)[votes.choice],
        [policy_names[i] for i in ids],
        config.leaderboard,
        style_first,
        style_second,
    )


def load_comparison_tags(*, session: Session) -> dict[int, list[str]]:
    """Comparison id -> its prompt's tags, for the comparisons whose prompt has any."""
    query = (
        select(Comparison.id, Prompt.tags)
        .join(Prompt, Prompt.id == Comparison.prompt_id)
        # JSON has no equality in PostgreSQL: compare its text (both stores keep it as written, "[]")
        .where(Prompt.tags.is_not(None), cast(Prompt.tags, String) != "[]")
    )
    result = {}
    for comparison_id, tags in session.execute(query).all():
        if isinstance(tags, list) and tags:
            result[int(comparison_id)] = [str(tag) for tag in tags]
    return result


def leaderboard_by_tag_stats(votes: VoteColumns, raters: RaterTable, policy_names: dict[int, str],
                             tags: dict[int, list[str]], config: StatsConfig = StatsConfig()
                             ) -> dict[str, Leaderboard]:
    """A raw (not style-controlled) leaderboard per prompt tag, from the votes on that tag's
    comparisons; a prompt with several tags counts for each. Tags with no ranking left out."""
    by_tag: dict[str, list[int]] = {}
    for comparison_id, comparison_tags in tags.items():
        for tag in dict.fromkeys(comparison_tags):
            by_tag.setdefault(tag, []).append(comparison_id)
    raw = StatsConfig(**{**config.__dict__, "leaderboard": LeaderboardConfig(
        **{**config.leaderboard.__dict__, "style_control": False})})
    boards = {}
    for tag in sorted(by_tag):
        board = leaderboard_stats(votes.subset(np.isin(votes.comparison, by_tag[tag])), raters, policy_names, raw)
        if board.ratings:
            boards[tag] = board
    return boards


def _longer_wins(name: str, decisive_longer: np.ndarray, ties: int) -> LongerWins:
    n, k = len(decisive_longer), int(decisive_longer.sum())
    return LongerWins(rater=name, votes=n, longer_wins=k, rate=k / n if n else math.nan,
                      p_value=float(two_sided_fair_coin_p(k, n)) if n else math.nan, ties=ties)


def length_bias_stats(votes: VoteColumns, raters: RaterTable, lengths: tuple[np.ndarray, np.ndarray] | None
                      ) -> LengthBias:
    """How often the longer response wins, for judge votes and for human votes, on the comparisons
    both kinds voted on (gold pairs are already out of `votes`). `lengths`: (response ids
    ascending, their lengths), needed only where such comparisons exist."""
    is_judge = raters.of_kinds({RaterKind.judge.value})[votes.rater] if len(votes) else np.zeros(0, bool)
    is_human = raters.of_kinds({RaterKind.human.value})[votes.rater] if len(votes) else np.zeros(0, bool)
    shared = np.intersect1d(votes.comparison[is_judge], votes.comparison[is_human])
    on_shared = np.isin(votes.comparison, shared) & (is_judge | is_human)
    if len(shared) and lengths is not None:
        length_a = _lookup(*lengths, votes.response_a)
        length_b = _lookup(*lengths, votes.response_b)
    else:
        length_a = length_b = np.zeros(len(votes))
    differ = length_a != length_b
    equal_length = len(np.unique(votes.comparison[on_shared & ~differ]))
    counted = on_shared & differ
    decisive = counted & (votes.choice >= 0) & (votes.choice <= 1)
    tie = counted & (votes.choice >= 2)
    longer_won = np.where(votes.choice == 0, length_a > length_b, length_b > length_a)

    def row(name: str, mask: np.ndarray) -> LongerWins:
        return _longer_wins(name, longer_won[decisive & mask], int((tie & mask).sum()))

    judges = np.unique(votes.rater[counted & is_judge])
    return LengthBias(
        n_comparisons=len(np.unique(votes.comparison[counted])),
        equal_length=equal_length,
        judge=row("judge", is_judge),
        human=row("human", is_human),
        by_judge=[row(raters.names[r], votes.rater == r) for r in judges],
    )


def load_lengths(*, session: Session) -> tuple[np.ndarray, np.ndarray]:
    """(response ids ascending, their lengths in characters), computed by the database."""
    result = session.connection().execute(select(Response.id, func.length(Response.text)).order_by(Response.id))
    rows = result.cursor.fetchall()  # plain numbers: the DBAPI's tuples, without SQLAlchemy's Row objects
    result.close()
    table = np.array(rows, dtype=np.int64).reshape(len(rows), 2)
    return table[:, 0].copy(), table[:, 1].copy()


def compute_stats(*, session: Session, config: StatsConfig = StatsConfig()) -> Stats:
    raters = load_raters(session=session)
    all_votes = load_votes(raters, session=session)
    votes = all_votes.without_gold()
    listed = votes.subset(raters.of_kinds(config.rater_kinds)[votes.rater]) if len(votes) else votes
    # Judge-vs-human compares judges with humans only; simulated votes are neither.
    policy_names = dict(session.execute(select(PolicyVersion.id, PolicyVersion.name)).all())
    style = load_style_features(session=session) if config.leaderboard.style_control else None
    judges = raters.of_kinds({RaterKind.judge.value})[votes.rater] if len(votes) else np.zeros(0, bool)
    humans = raters.of_kinds({RaterKind.human.value})[votes.rater] if len(votes) else np.zeros(0, bool)
    lengths = None
    if len(np.intersect1d(votes.comparison[judges], votes.comparison[humans])):
        lengths = (style[0], style[1][:, 0].astype(np.int64)) if style is not None else load_lengths(session=session)
    return Stats(
        counts=count_rows(raters, all_votes, session=session),
        agreement=agreement_stats(votes, raters, config),
        position_bias=position_bias_stats(listed, raters),
        throughput=throughput_stats(listed, raters, config),
        leaderboard=leaderboard_stats(votes, raters, policy_names, config, style),
        judge_vs_human=judge_vs_human_stats(votes, raters),
        evaluations=list_evaluations(session=session),
        raters=rater_quality(all_votes, raters, kinds=config.rater_kinds, min_gold=config.min_gold,
                             threshold=(config.quality_threshold if config.quality_threshold is not None
                                        else quality_threshold(session=session))),
        leaderboard_by_tag=leaderboard_by_tag_stats(votes, raters, policy_names, load_comparison_tags(session=session),
                                                    config),
        length_bias=length_bias_stats(votes, raters, lengths),
    )


def stats_dict(*, session: Session, config: StatsConfig = StatsConfig()) -> dict:
    return compute_stats(session=session, config=config).to_dict()
