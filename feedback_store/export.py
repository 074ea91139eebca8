"""Preference exports in the formats TRL 1.x trainers take, with every row's provenance.

All four exports are TRL's conversational format: `prompt` is the stored chat (a list of
{"role", "content"}), and each completion is a one-message assistant list, so TRL applies
the model's chat template itself.

- DPO    (DPOTrainer):    prompt / chosen / rejected
- reward (RewardTrainer): prompt / chosen / rejected / margin (the trainer subtracts
  `margin` inside its log-sigmoid when the column exists)
- KTO    (KTOTrainer):    prompt / completion / label (bool)
- with `Selection.weighted`, DPO, reward and KTO rows also carry `weight` (`example_weights`):
  the rater weight behind the row's label, scaled to mean 1 over the export; the trainers use
  it as a per-example loss weight
- SFT    (SFTTrainer):    prompt / completion (the loss covers the completion only), from human
  edits, clear winners of comparisons and best-of-n answers (`prefloop generate --best-of N`:
  the best of N samples under a reward, `score` its reward); `Selection.sft_source` picks them
- prompts (PPO rollouts): prompt / prompt_id / source, every stored prompt (no votes involved)

How several votes on one comparison become one row is `Selection`: votes are filtered by
rater kind, then the (optionally rater-weighted) plurality among a / b / tie / both_bad
wins; a draw between categories counts as a tie. `agreement` is the winning category's
share of the weight. Rows below `min_votes` or `min_agreement` are dropped.

Provenance columns ride along in every row (TRL's trainers drop columns they do not use):
comparison_id (or response_id for ratings and edits), n_votes, agreement, rater_kinds and
the policies involved. Gold pairs (feedback_store.gold: a stored answer against a degraded
copy) are never exported, nor ratings of their degraded copies; votes of simulated raters
count only with `include_simulated`. Only `train` prompts are exported: `eval` prompts are held out for
`prefloop eval` (feedback_store.splits), whatever the selection. Rows come in a fixed order (by comparison id, then response id),
so the same database gives the same dataset, and `snapshot` hashes it for a training run.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sqlalchemy import String, select, type_coerce
from sqlalchemy.orm import aliased
from sqlmodel import Session, col

from feedback_store.gold import GOLD_POLICY
from feedback_store.hashing import canonical_json, sha256_text
from feedback_store.models import (
    BEST_OF_N,
    Choice,
    Comparison,
    PolicyVersion,
    Prompt,
    Rater,
    RaterKind,
    Rating,
    Response,
    Vote,
)
from feedback_store.splits import TRAIN

# Category codes of the aggregation arrays.
A, B, TIE, BOTH_BAD = 0, 1, 2, 3
_CHOICE_CODE = {Choice.a: A, Choice.b: B, Choice.tie: TIE, Choice.both_bad: BOTH_BAD}
FORMATS = ("dpo", "kto", "reward", "sft", "prompts")
WEIGHT = "weight"  # the per-example loss weight column of a weighted export
SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class Selection:
    """Which votes count and how several votes on one comparison become one training row."""

    rater_kinds: Literal["human", "judge", "both"] = field(
        default="both",
        metadata={"help": "whose votes count: human annotators, AI judges, or both"},
    )
    import_as: Literal["human", "judge", "exclude"] = field(
        default="human",
        metadata={"help": "votes by the `import` rater (imported datasets) count as this kind, or not at all"},
    )
    method: Literal["majority"] = field(
        default="majority",
        metadata={"help": "aggregation: plurality of a / b / tie / both_bad; a draw between categories is a tie"},
    )
    min_votes: int = field(
        default=1, metadata={"help": "drop comparisons with fewer counted votes than this"}
    )
    min_agreement: float = field(
        default=0.0,
        metadata={"help": "drop comparisons whose winning category has a smaller share of the votes (0-1)"},
    )
    tie_policy: Literal["drop", "half"] = field(
        default="drop",
        metadata={
            "help": "ties: drop them, or (reward export only) emit the pair in both orders with margin 0, "
            "which is the Bradley-Terry loss with a soft label of 1/2. DPO, KTO and SFT always drop ties: "
            "a tie says nothing about which completion to prefer."
        },
    )
    both_bad_policy: Literal["kto_negatives", "drop"] = field(
        default="kto_negatives",
        metadata={
            "help": "comparisons judged 'both bad': in KTO both completions become undesirable examples "
            "(kto_negatives) or are dropped; pairwise exports always drop them"
        },
    )
    weighted: bool = field(
        default=False,
        metadata={"help": "weight each vote by its rater's `weight` (0 silences a rater), and give each DPO, "
                          "reward and KTO example a `weight` column (the weight of the raters who agree with "
                          "its label, mean 1): the trainers use it as a per-example loss weight"},
    )
    include_simulated: bool = field(
        default=False,
        metadata={"help": "also count votes of simulated raters (`prefloop simulate`); never counted otherwise"},
    )
    sft_min_agreement: float = field(
        default=1.0,
        metadata={
            "help": "SFT takes a comparison's winner only when its share of the votes reaches this "
            "(default unanimous) and the comparison passes min_votes"
        },
    )

    sft_source: Literal["all", "labels", "best-of-n"] = field(
        default="all",
        metadata={
            "help": "SFT examples from: labels (human edits and clear comparison winners), best-of-n (answers "
            "`prefloop generate --best-of` kept under a reward: rejection-sampling fine-tuning), or all. "
            "Best-of-n answers have no votes: rater and vote selections do not apply to them"
        },
    )

    def __post_init__(self) -> None:
        for name, allowed in (
            ("sft_source", ("all", "labels", "best-of-n")),
            ("rater_kinds", ("human", "judge", "both")),
            ("import_as", ("human", "judge", "exclude")),
            ("method", ("majority",)),
            ("tie_policy", ("drop", "half")),
            ("both_bad_policy", ("kto_negatives", "drop")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Selection.{name} must be one of {allowed} (got {getattr(self, name)!r})")
        if self.min_votes < 1:
            raise ValueError(f"Selection.min_votes must be at least 1 (got {self.min_votes})")
        for name in ("min_agreement", "sft_min_agreement"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Selection.{name} must be between 0 and 1 (got {getattr(self, name)})")

    def counted_kinds(self) -> set[RaterKind]:
        kinds = {"human": {RaterKind.human}, "judge": {RaterKind.judge}}.get(
            self.rater_kinds, {RaterKind.human, RaterKind.judge}
        )
        if self.import_as != "exclude" and RaterKind(self.import_as) in kinds:
            kinds = kinds | {RaterKind.imported}
        if self.include_simulated:
            kinds = kinds | {RaterKind.simulated}
        return kinds

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


# --------------------------------------------------------------------------- aggregation


@dataclass
class Outcomes:
    """Per-comparison aggregates, as parallel numpy arrays ordered by comparison id."""

    comparison_id: np.ndarray  # int64
    outcome: np.ndarray  # A / B / TIE / BOTH_BAD
    n_votes: np.ndarray  # int64, votes counted (unweighted)
    agreement: np.ndarray  # float64, winning category's share of the weight
    margin: np.ndarray  # float64, mean strength of the winning side's votes (0 when none recorded)
    rater_kinds: list[str]  # e.g. "human,judge"
    support: np.ndarray  # float64, summed weight of the votes for the outcome (a draw: of each drawn side)

    def mask(self, categories: Sequence[int], min_votes: int, min_agreement: float) -> np.ndarray:
        return (
            np.isin(self.outcome, categories)
            & (self.n_votes >= min_votes)
            & (self.agreement >= min_agreement - 1e-12)
        )


# Enum columns are read as their stored names (no per-row Enum construction: 100k votes).
_KIND_BY_STORED = {kind.name: kind.value for kind in RaterKind}
_CHOICE_BY_STORED = {choice.name: _CHOICE_CODE[choice] for choice in Choice}


def _kind_name(kind: Any) -> str:
    return RaterKind(kind).value


def _core_rows(session: Session, statement) -> list[tuple]:
    """Plain tuples through Core: the ORM's row loading costs more than the query itself here."""
    return session.connection().execute(statement).all()


def aggregate_votes(*, session: Session, selection: Selection = Selection()) -> Outcomes:
    """One outcome per comparison that has counted votes: a single query, then numpy."""
    kinds = selection.counted_kinds()
    rows = _core_rows(
        session,
        select(Vote.comparison_id, type_coerce(Vote.choice, String), Vote.strength,
               type_coerce(Rater.kind, String), Rater.weight)
        .join(Rater, Rater.id == Vote.rater_id)
        .join(Comparison, Comparison.id == Vote.comparison_id)
        .join(Prompt, Prompt.id == Comparison.prompt_id)
        .where(col(Rater.kind).in_(list(kinds)), Prompt.split == TRAIN, col(Comparison.gold_winner).is_(None))
        .order_by(Vote.comparison_id, Vote.id),  # a fixed summation order: identical floats every run
    )
    if not rows:
        empty_i, empty_f = np.zeros(0, np.int64), np.zeros(0, np.float64)
        return Outcomes(empty_i, empty_i.copy(), empty_i.copy(), empty_f, empty_f.copy(), [], empty_f.copy())

    ids_col, choice_col, strength_col, kind_col, weight_col = zip(*rows)
    comparison_ids = np.array(ids_col, np.int64)
    codes = np.array([_CHOICE_BY_STORED[c] for c in choice_col], np.int64)
    strength = np.array([np.nan if v is None else v for v in strength_col], np.float64)
    weights = np.array(weight_col, np.float64) if selection.weighted else np.ones(len(rows))
    kind_names = sorted({_KIND_BY_STORED[k] for k in set(kind_col)})
    kind_index = {stored: kind_names.index(value) for stored, value in _KIND_BY_STORED.items() if value in kind_names}
    kind_codes = np.array([kind_index[k] for k in kind_col], np.int64)

    unique_ids, group = np.unique(comparison_ids, return_inverse=True)
    n = len(unique_ids)
    totals = np.zeros((n, 4))
    for category in (A, B, TIE, BOTH_BAD):
        totals[:, category] = np.bincount(group, weights=weights * (codes == category), minlength=n)
    weight_sum = totals.sum(axis=1)
    best = totals.max(axis=1)
    winner = totals.argmax(axis=1)
    # A draw between categories (a vs b, or a vs tie, ...) decides nothing: it is a tie.
    drawn = (np.isclose(totals, best[:, None]) & (best[:, None] > 0)).sum(axis=1) > 1
    outcome = np.where(drawn, TIE, winner)
    with np.errstate(invalid="ignore", divide="ignore"):
        agreement = np.where(weight_sum > 0, best / weight_sum, 0.0)
    # Weight 0 everywhere (all raters silenced): nothing was said.
    n_votes = np.bincount(group, minlength=n)
    n_votes = np.where(weight_sum > 0, n_votes, 0)

    # Margin: weighted mean strength of the votes for the winning side that recorded one.
    on_winner = (codes == outcome[group]) & ~np.isnan(strength) & np.isin(outcome[group], (A, B))
    strength_sum = np.bincount(group, weights=np.where(on_winner, strength * weights, 0.0), minlength=n)
    strength_weight = np.bincount(group, weights=np.where(on_winner, weights, 0.0), minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        margin = np.where(strength_weight > 0, strength_sum / strength_weight, 0.0)

    present = np.zeros((n, len(kind_names)), bool)
    present[group, kind_codes] = True
    rater_kinds = [",".join(k for k, p in zip(kind_names, row) if p) for row in present]
    return Outcomes(unique_ids, outcome, n_votes, agreement, margin, rater_kinds, best)


# --------------------------------------------------------------------------- loading text


@dataclass(frozen=True)
class _PairText:
    prompt: list[dict]
    a_id: int
    b_id: int
    a_text: str
    b_text: str
    a_policy: str
    b_policy: str


def _chunks(values: Sequence[int], size: int = 5000):  # bound parameters per IN (...), under every limit
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _pair_texts(comparison_ids: Sequence[int], *, session: Session) -> dict[int, _PairText]:
    """Prompt, both response texts and policy names for the kept comparisons."""
    ra, rb = aliased(Response), aliased(Response)
    pa, pb = aliased(PolicyVersion), aliased(PolicyVersion)
    rows = []
    for chunk in _chunks([int(i) for i in comparison_ids]):
        rows.extend(
            _core_rows(
                session,
                select(Comparison.id, Comparison.prompt_id, ra.id, rb.id, ra.text, rb.text, pa.name, pb.name)
                .join(ra, ra.id == Comparison.response_a_id)
                .join(rb, rb.id == Comparison.response_b_id)
                .join(pa, pa.id == ra.policy_id)
                .join(pb, pb.id == rb.policy_id)
                .where(col(Comparison.id).in_(chunk)),
            )
        )
    prompts = _prompts({r[1] for r in rows}, session=session)
    return {r[0]: _PairText(prompts[r[1]], r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows}


def _prompts(prompt_ids, *, session: Session) -> dict[int, list[dict]]:
    found = {}
    for chunk in _chunks(sorted(prompt_ids)):
        found.update(_core_rows(session, select(Prompt.id, Prompt.messages).where(col(Prompt.id).in_(chunk))))
    return {k: [{"role": m["role"], "content": m["content"]} for m in v] for k, v in found.items()}


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# --------------------------------------------------------------------------- datasets


def _features(kind: str, weighted: bool = False):
    from datasets import Features, List, Value

    chat = List({"role": Value("string"), "content": Value("string")})
    provenance = {
        "n_votes": Value("int64"),
        "agreement": Value("float64"),
        "rater_kinds": Value("string"),
    }
    pair = {
        "comparison_id": Value("int64"),
        "chosen_response_id": Value("int64"),
        "rejected_response_id": Value("int64"),
        "chosen_policy": Value("string"),
        "rejected_policy": Value("string"),
    }
    single = {
        "source": Value("string"),  # "comparison" | "rating" (KTO); "edit" | "winner" | "best-of-n" (SFT)
        "comparison_id": Value("int64"),
        "response_id": Value("int64"),
        "policy": Value("string"),
    }
    spec = {
        "dpo": {"prompt": chat, "chosen": chat, "rejected": chat, **pair, **provenance},
        "reward": {"prompt": chat, "chosen": chat, "rejected": chat, "margin": Value("float64"), **pair,
                   **provenance},
        "kto": {"prompt": chat, "completion": chat, "label": Value("bool"), **single, **provenance},
        "sft": {"prompt": chat, "completion": chat, **single, **provenance, "score": Value("float64")},
        "prompts": {"prompt": chat, "prompt_id": Value("int64"), "source": Value("string")},
    }[kind]
    if weighted:
        spec = {**spec, WEIGHT: Value("float64")}
    return Features(spec)


def _dataset(kind: str, rows: list[dict], weighted: bool = False):
    """Columns straight into Arrow (datasets' own per-example encoding is ~10x slower). weighted:
    the rows carry the raw `weight` of their raters, scaled here to mean 1 (`example_weights`)."""
    import pyarrow as pa
    from datasets import Dataset
    from datasets.info import DatasetInfo
    from datasets.table import InMemoryTable

    features = _features(kind, weighted)
    if weighted:
        scaled = example_weights(np.array([row[WEIGHT] for row in rows], np.float64))
        for row, value in zip(rows, scaled.tolist()):
            row[WEIGHT] = value
    table = pa.Table.from_pydict({name: [row[name] for row in rows] for name in features},
                                 schema=features.arrow_schema)
    return Dataset(InMemoryTable(table), info=DatasetInfo(features=features))


def example_weights(support: np.ndarray) -> np.ndarray:
    """Each example's loss weight: the summed weight of the raters who agree with its label
    (`support`), divided by the mean over the export.

    Why divide by the mean: the trainers average the weighted per-example losses over a batch,
    so weights of mean 1 keep the loss on the scale it has unweighted. The learning rate, the
    logged loss and its comparison with unweighted runs keep their meaning whatever unit the
    rater weights are in (raters at 1/2/3 or at 10/20/30 train the same); only the ratios
    between examples count. An export where every example weighs 0 cannot be scaled: it is
    left as it is, and training refuses it (alignment.training.common.check_weights)."""
    if len(support) == 0 or not support.sum() > 0:
        return support
    return support / support.mean()


def _pair_rows(outcomes: Outcomes, keep: np.ndarray, texts: dict[int, _PairText], *, mirror_ties: bool,
               with_margin: bool, weighted: bool = False) -> list[dict]:
    rows = []
    for i in np.flatnonzero(keep):
        cid = int(outcomes.comparison_id[i])
        pair = texts[cid]
        a = (pair.a_id, pair.a_text, pair.a_policy)
        b = (pair.b_id, pair.b_text, pair.b_policy)
        outcome = outcomes.outcome[i]
        if outcome == TIE:
            if not mirror_ties:
                continue
            orders = [(a, b), (b, a)]
        else:
            orders = [(a, b) if outcome == A else (b, a)]
        for chosen, rejected in orders:
            row = {
                "prompt": pair.prompt,
                "chosen": _assistant(chosen[1]),
                "rejected": _assistant(rejected[1]),
                "comparison_id": cid,
                "chosen_response_id": chosen[0],
                "rejected_response_id": rejected[0],
                "chosen_policy": chosen[2],
                "rejected_policy": rejected[2],
                "n_votes": int(outcomes.n_votes[i]),
                "agreement": float(outcomes.agreement[i]),
                "rater_kinds": outcomes.rater_kinds[i],
            }
            if with_margin:
                row["margin"] = 0.0 if outcome == TIE else float(outcomes.margin[i])
            if weighted:  # the raters who agree: with the winner, or with the tie a mirrored pair stands for
                row[WEIGHT] = float(outcomes.support[i])
            rows.append(row)
    return rows


def export_dpo(*, session: Session, selection: Selection = Selection()):
    """prompt / chosen / rejected from decided comparisons (ties and both_bad dropped)."""
    outcomes = aggregate_votes(session=session, selection=selection)
    keep = outcomes.mask((A, B), selection.min_votes, selection.min_agreement)
    texts = _pair_texts(outcomes.comparison_id[keep], session=session)
    rows = _pair_rows(outcomes, keep, texts, mirror_ties=False, with_margin=False, weighted=selection.weighted)
    return _dataset("dpo", rows, selection.weighted)


def export_reward(*, session: Session, selection: Selection = Selection()):
    """prompt / chosen / rejected / margin; margin = mean vote strength (1 slightly, 2 clearly, 0 unknown)."""
    outcomes = aggregate_votes(session=session, selection=selection)
    categories = (A, B, TIE) if selection.tie_policy == "half" else (A, B)
    keep = outcomes.mask(categories, selection.min_votes, selection.min_agreement)
    texts = _pair_texts(outcomes.comparison_id[keep], session=session)
    rows = _pair_rows(outcomes, keep, texts, mirror_ties=True, with_margin=True, weighted=selection.weighted)
    return _dataset("reward", rows, selection.weighted)


def _single_row(prompt, text, label, source, comparison_id, response_id, policy, n_votes, agreement, kinds):
    row = {
        "prompt": prompt,
        "completion": _assistant(text),
        "source": source,
        "comparison_id": comparison_id,
        "response_id": response_id,
        "policy": policy,
        "n_votes": n_votes,
        "agreement": agreement,
        "rater_kinds": kinds,
    }
    if label is not None:
        row["label"] = label
    return row


def export_kto(*, session: Session, selection: Selection = Selection()):
    """prompt / completion / label: winners True and losers False from pairs (both False for
    both_bad unless dropped), then one row per thumbs-rated response by majority of its ratings."""
    outcomes = aggregate_votes(session=session, selection=selection)
    categories = (A, B, BOTH_BAD) if selection.both_bad_policy == "kto_negatives" else (A, B)
    keep = outcomes.mask(categories, selection.min_votes, selection.min_agreement)
    texts = _pair_texts(outcomes.comparison_id[keep], session=session)
    rows = []
    for i in np.flatnonzero(keep):
        cid, outcome = int(outcomes.comparison_id[i]), outcomes.outcome[i]
        pair = texts[cid]
        a = (pair.a_id, pair.a_text, pair.a_policy)
        b = (pair.b_id, pair.b_text, pair.b_policy)
        if outcome == BOTH_BAD:
            labelled = [(a, False), (b, False)]
        else:
            winner, loser = (a, b) if outcome == A else (b, a)
            labelled = [(winner, True), (loser, False)]
        for (rid, text, policy), label in labelled:
            row = _single_row(pair.prompt, text, label, "comparison", cid, rid, policy,
                              int(outcomes.n_votes[i]), float(outcomes.agreement[i]), outcomes.rater_kinds[i])
            if selection.weighted:  # who said a beats b also said b loses to a: both rows weigh the same
                row[WEIGHT] = float(outcomes.support[i])
            rows.append(row)
    rows.extend(_rating_rows(session=session, selection=selection))
    return _dataset("kto", rows, selection.weighted)


def _rating_rows(*, session: Session, selection: Selection) -> list[dict]:
    kinds = selection.counted_kinds()
    ratings = _core_rows(
        session,
        select(Rating.response_id, Rating.thumbs_up, type_coerce(Rater.kind, String), Rater.weight)
        .join(Rater, Rater.id == Rating.rater_id)
        .join(Response, Response.id == Rating.response_id)
        .join(Prompt, Prompt.id == Response.prompt_id)
        .join(PolicyVersion, PolicyVersion.id == Response.policy_id)
        .where(col(Rater.kind).in_(list(kinds)), Prompt.split == TRAIN, PolicyVersion.name != GOLD_POLICY)
        .order_by(Rating.response_id, Rating.id),
    )
    if not ratings:
        return []
    response_ids = np.fromiter((r[0] for r in ratings), np.int64, len(ratings))
    up = np.fromiter((bool(r[1]) for r in ratings), bool, len(ratings))
    weights = (
        np.fromiter((r[3] for r in ratings), np.float64, len(ratings)) if selection.weighted
        else np.ones(len(ratings))
    )
    unique_ids, group = np.unique(response_ids, return_inverse=True)
    up_weight = np.bincount(group, weights=weights * up, minlength=len(unique_ids))
    all_weight = np.bincount(group, weights=weights, minlength=len(unique_ids))
    counts = np.bincount(group, minlength=len(unique_ids))
    kinds_of = [set() for _ in unique_ids]
    for g, r in zip(group, ratings):
        kinds_of[g].add(_KIND_BY_STORED[r[2]])

    keep = []
    for i in range(len(unique_ids)):
        if all_weight[i] <= 0 or np.isclose(up_weight[i] * 2, all_weight[i]):
            continue  # silenced, or as many ups as downs: no label
        share = max(up_weight[i], all_weight[i] - up_weight[i]) / all_weight[i]
        if counts[i] >= selection.min_votes and share >= selection.min_agreement - 1e-12:
            up_wins = bool(up_weight[i] * 2 > all_weight[i])
            keep.append((i, up_wins, float(share), float(up_weight[i] if up_wins else all_weight[i] - up_weight[i])))
    if not keep:
        return []
    response_rows = {}
    for chunk in _chunks([int(unique_ids[i]) for i, *_ in keep]):
        response_rows.update(
            (r[0], r[1:])
            for r in _core_rows(
                session,
                select(Response.id, Response.prompt_id, Response.text, PolicyVersion.name)
                .join(PolicyVersion, PolicyVersion.id == Response.policy_id)
                .where(col(Response.id).in_(chunk)),
            )
        )
    prompts = _prompts({r[0] for r in response_rows.values()}, session=session)
    rows = []
    for i, label, share, support in keep:
        rid = int(unique_ids[i])
        prompt_id, text, policy = response_rows[rid]
        row = _single_row(prompts[prompt_id], text, label, "rating", None, rid, policy, int(counts[i]), share,
                          ",".join(sorted(kinds_of[i])))
        if selection.weighted:  # the raters whose thumb agrees with the label
            row[WEIGHT] = support
        rows.append(row)
    return rows


def export_sft(*, session: Session, selection: Selection = Selection()):
    """prompt / completion from human edits (the edit is the completion), then from clear winners:
    comparisons decided with at least `sft_min_agreement` of the votes (default unanimous), then
    best-of-n answers (`score`: the reward they were kept under; None for the others), each
    response once. `selection.sft_source` takes the labels, the best-of-n answers, or all."""
    rows = _label_rows(session=session, selection=selection) if selection.sft_source != "best-of-n" else []
    seen = {row["response_id"] for row in rows}
    if selection.sft_source != "labels":
        rows += [row for row in _best_of_n_rows(session=session) if row["response_id"] not in seen]
    for row in rows:
        row.setdefault("score", None)
    return _dataset("sft", rows)


def _best_of_n_rows(*, session: Session) -> list[dict]:
    """Answers `prefloop generate --best-of` kept (train prompts, in response id order)."""
    kept = _core_rows(
        session,
        select(Response.id, Response.prompt_id, Response.text, PolicyVersion.name, Response.reward_score)
        .join(PolicyVersion, PolicyVersion.id == Response.policy_id)
        .join(Prompt, Prompt.id == Response.prompt_id)
        .where(Response.sft_source == BEST_OF_N, Prompt.split == TRAIN, PolicyVersion.name != GOLD_POLICY)
        .order_by(Response.id),
    )
    prompts = _prompts({k[1] for k in kept}, session=session)
    rows = []
    for rid, prompt_id, text, policy, score in kept:
        row = _single_row(prompts[prompt_id], text, None, BEST_OF_N, None, rid, policy, None, None, None)
        row["score"] = score
        rows.append(row)
    return rows


def _label_rows(*, session: Session, selection: Selection) -> list[dict]:
    """The SFT rows from labels: edits, then the winners of clear comparisons."""
    rows = _edit_rows(session=session, selection=selection)
    outcomes = aggregate_votes(session=session, selection=selection)
    keep = outcomes.mask((A, B), selection.min_votes, max(selection.min_agreement, selection.sft_min_agreement))
    texts = _pair_texts(outcomes.comparison_id[keep], session=session)
    seen = {row["response_id"] for row in rows}
    for i in np.flatnonzero(keep):
        cid = int(outcomes.comparison_id[i])
        pair = texts[cid]
        rid, text, policy = (
            (pair.a_id, pair.a_text, pair.a_policy) if outcomes.outcome[i] == A
            else (pair.b_id, pair.b_text, pair.b_policy)
        )
        if rid in seen:  # a response that won several comparisons is one SFT example
            continue
        seen.add(rid)
        rows.append(_single_row(pair.prompt, text, None, "winner", cid, rid, policy, int(outcomes.n_votes[i]),
                                float(outcomes.agreement[i]), outcomes.rater_kinds[i]))
    return rows


def _edit_rows(*, session: Session, selection: Selection) -> list[dict]:
    kinds = selection.counted_kinds()
    author = aliased(Rater)
    edits = session.execute(
        select(Response.id, Response.prompt_id, Response.text, PolicyVersion.name, author.kind)
        .join(PolicyVersion, PolicyVersion.id == Response.policy_id)
        .outerjoin(author, author.id == Response.author_rater_id)
        .join(Prompt, Prompt.id == Response.prompt_id)
        .where(col(Response.edited_from_id).is_not(None), Prompt.split == TRAIN)
        .order_by(Response.id)
    ).all()
    # An edit with no recorded author is a human's (the app is the only editor).
    edits = [e for e in edits if (RaterKind(e[4]) if e[4] is not None else RaterKind.human) in kinds]
    prompts = _prompts({e[1] for e in edits}, session=session)
    return [
        _single_row(prompts[prompt_id], text, None, "edit", None, rid, policy, None, None,
                    _kind_name(kind) if kind is not None else RaterKind.human.value)
        for rid, prompt_id, text, policy, kind in edits
    ]


def export_prompts(*, session: Session, selection: Selection = Selection()):
    """Every train prompt in id order, for PPO's rollouts (the policy writes the completions and a
    reward model scores them, so `selection` has nothing to select)."""
    rows = _core_rows(
        session, select(Prompt.id, Prompt.messages, Prompt.source).where(Prompt.split == TRAIN).order_by(Prompt.id)
    )
    return _dataset("prompts", [
        {"prompt": [{"role": m["role"], "content": m["content"]} for m in messages], "prompt_id": pid,
         "source": source}
        for pid, messages, source in rows
    ])


EXPORTERS = {"dpo": export_dpo, "kto": export_kto, "reward": export_reward, "sft": export_sft,
             "prompts": export_prompts}


def export(kind: str, *, session: Session, selection: Selection = Selection()):
    if kind not in EXPORTERS:
        raise ValueError(f"unknown export {kind!r} (expected one of {', '.join(FORMATS)})")
    return EXPORTERS[kind](session=session, selection=selection)


# --------------------------------------------------------------------------- files and snapshots


def check_output_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{path}: the output must end in .jsonl or .parquet (got {path.suffix or 'no extension'!r})")
    return path


def write_dataset(dataset, path: str | Path) -> Path:
    """Write .jsonl (one JSON object per line, UTF-8) or .parquet; atomically, so a crash leaves no half file."""
    path = check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if path.suffix.lower() == ".jsonl":
            _write_jsonl(dataset, tmp)
        else:
            dataset.to_parquet(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_jsonl(dataset, path: str) -> None:
    # json.dumps rather than datasets' to_json: pandas rounds floats to 10 digits and escapes "/".
    import json

    with open(path, "w", encoding="utf-8") as handle:
        for batch in dataset.iter(batch_size=2048):
            names = list(batch)
            for values in zip(*(batch[name] for name in names)):
                handle.write(json.dumps(dict(zip(names, values)), ensure_ascii=False) + "\n")


def snapshot(dataset) -> tuple[dict[str, list[int]], str]:
    """What a training run used: the ids behind its rows and the sha256 of the rows' canonical JSON.

    The ids are the comparisons, and for rows with no comparison (KTO ratings, SFT edits)
    the responses; rows of prompts alone (PPO) add `prompt_ids`. The hash covers every column
    of every row in order, so any change in data, selection or order changes it.
    """
    rows = dataset.to_list()  # honours select/shuffle/split index mappings
    comparison_ids = {row["comparison_id"] for row in rows if row.get("comparison_id") is not None}
    response_ids = {
        row["response_id"] for row in rows if row.get("comparison_id") is None and row.get("response_id") is not None
    }
    ids = {"comparison_ids": sorted(comparison_ids), "response_ids": sorted(response_ids)}
    prompt_ids = {
        row["prompt_id"] for row in rows
        if row.get("prompt_id") is not None and row.get("comparison_id") is None and row.get("response_id") is None
    }
    if prompt_ids:
        ids["prompt_ids"] = sorted(prompt_ids)
    return ids, sha256_text(canonical_json(rows))
