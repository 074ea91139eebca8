"""Gold pairs: comparisons whose winner is known, made from stored responses, to measure raters.

A gold pair puts a stored answer against a degraded copy of it, so the real answer is the
better one by construction. Four degradations (`DEGRADATIONS`):

- `truncated`    the answer cut off mid-sentence, between 35 % and 65 % of its words;
- `other_prompt` the answer some other prompt got (on topic it is not);
- `shuffled`     the answer's sentences in another order (needs three or more sentences);
- `refusal`      a canned refusal ("I'm sorry, but I can't help with that.").

Sources are responses to `train` prompts of at least `MIN_WORDS` words that are not refusals
themselves and not degraded copies; a source is used once per degradation. The degraded copy
is stored as a response of the policy `GOLD_POLICY` ("gold:degraded"), never of a real
policy, and the pair as a comparison with `gold_winner` ('a' or 'b', the canonical side of
the real answer), `gold_kind` and source "gold:<kind>".

What keeps gold pairs out of everything else: exports skip comparisons with a gold winner
and ratings of gold-policy responses (feedback_store.export); statistics leave gold votes out
of agreement, position bias, throughput, the leaderboard and judge-vs-human, and use them only
for the per-rater accuracy of feedback_store.rater_quality. The ordinary queue
(feedback_store.queue) never serves them; they are stored at `GOLD_PRIORITY`, which queue
strategies leave alone. The single-response page never deals a degraded copy.

Serving: `next_pair_for` is how the pairwise page deals (a vote's next pair included,
feedback_store.sittings.record_vote_and_next): the rater's live reservation if any (a reload shows
the same pair), else a gold pair when `gold_due` says so, else the ordinary queue's next pair.
`gold_due(rater_id, session=...)` says whether this rater's next pair should be a gold one: at
the admin-set rate `gold_rate` (app setting `GOLD_RATE_SETTING`, default 1 in 20), drawn at
random per call so a rater cannot count to the next one, and only while a gold pair the rater
has not voted on exists. `next_gold_for` reserves one like `next_comparison_for` does (an
`Assignment` with a random left side), so `pair_view`, `record_vote` and the page treat it like
any other pair: nothing on the rater's screen tells them apart.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import exists, func, insert
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from feedback_store.app_settings import DEFAULT_GOLD_RATE, GOLD_RATE_SETTING, gold_rate  # noqa: F401
from feedback_store.catalog import add_comparison, add_response, get_or_create_policy
from feedback_store.models import (
    GOLD_POLICY,
    AppSetting,
    Assignment,
    Comparison,
    PolicyVersion,
    Prompt,
    Response,
    Vote,
    utcnow,
)
from feedback_store.queue import (
    DEFAULT_RESERVATION,
    held_assignment,
    ordinary_open,
    reserve_next_open,
)
from feedback_store.splits import TRAIN
from feedback_store.text import is_refusal

__all__ = ["GOLD_POLICY"]  # re-exported: its home is feedback_store.models (the queue needs it too)
GOLD_SOURCE_PREFIX = "gold:"
GOLD_PRIORITY = -1_000_000  # below every queue strategy's band (the ordinary queue never serves gold pairs)
DEGRADATIONS = ("truncated", "other_prompt", "shuffled", "refusal")
REFUSAL_TEXT = "I'm sorry, but I can't help with that."
MIN_WORDS = 8

GOLD_RESERVATION = timedelta(minutes=5)

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


# ---- degradations (pure functions of text) ---------------------------------------------------


def truncate_mid_sentence(text: str, rng: random.Random) -> str | None:
    """The text cut after 35-65 % of its words, at a word that does not end a sentence."""
    words = text.split()
    if len(words) < MIN_WORDS:
        return None
    low, high = max(2, int(len(words) * 0.35)), max(3, int(len(words) * 0.65))
    cuts = [k for k in range(low, high + 1) if not words[k - 1].endswith((".", "!", "?", ":"))]
    if not cuts:
        return None
    cut = " ".join(words[: rng.choice(cuts)]).rstrip(",;-")
    return cut if cut and cut != text.strip() else None


def shuffle_sentences(text: str, rng: random.Random) -> str | None:
    """The text's sentences in another order (None with fewer than three sentences)."""
    sentences = [s for s in _SENTENCE.split(text.strip()) if s]
    if len(sentences) < 3:
        return None
    for _ in range(20):
        order = sentences[:]
        rng.shuffle(order)
        if order != sentences:
            return " ".join(order)
    return None


# ---- making gold pairs -----------------------------------------------------------------------


@dataclass
class GoldReport:
    made: list[int] = field(default_factory=list)  # ids of the new gold comparisons
    by_kind: dict[str, int] = field(default_factory=dict)
    candidates: int = 0  # source responses considered usable


def _sources(session: Session) -> list[tuple[int, int, str]]:
    """(response id, prompt id, text) of usable source answers, in id order."""
    rows = session.exec(
        select(Response.id, Response.prompt_id, Response.text)
        .join(Prompt, Prompt.id == Response.prompt_id)
        .join(PolicyVersion, PolicyVersion.id == Response.policy_id)
        .where(Prompt.split == TRAIN, PolicyVersion.name != GOLD_POLICY)
        .order_by(Response.id)
    ).all()
    return [(rid, pid, text) for rid, pid, text in rows if len(text.split()) >= MIN_WORDS and not is_refusal(text)]


def make_gold_pairs(
    *, session: Session, count: int = 20, seed: int = 0, kinds: Sequence[str] = DEGRADATIONS
) -> GoldReport:
    """Make up to `count` new gold pairs from stored responses (fewer when sources run out).

    Deterministic for a seed and a store; rerunning finds the pairs it made before, counts
    them as not new, and goes on to further sources."""
    unknown = set(kinds) - set(DEGRADATIONS)
    if unknown or not kinds:
        raise ValueError(f"unknown degradation {sorted(unknown)[0] if unknown else '(none)'!r} "
                         f"(known: {', '.join(DEGRADATIONS)})")
    if count < 0:
        raise ValueError("count must not be negative")
    rng = random.Random(seed)
    sources = _sources(session)
    report = GoldReport(candidates=len(sources))
    if not sources or count == 0:
        return report
    policy = get_or_create_policy(GOLD_POLICY, session=session, base_model="none",
                                  description="degraded copies of stored answers (gold pairs)")
    order = list(range(len(sources)))
    rng.shuffle(order)
    for position, index in enumerate(order):
        if len(report.made) >= count:
            break
        rid, pid, text = sources[index]
        for kind in rng.sample(list(kinds), len(kinds)):  # a random applicable degradation
            degraded = _degrade(kind, text, pid, sources, rng)
            if degraded is None or degraded.strip() == text.strip():
                continue
            made = _store_pair(session, policy, rid, pid, kind, degraded)
            if made is not None:
                report.made.append(made.id)
                report.by_kind[kind] = report.by_kind.get(kind, 0) + 1
                break
    return report


def _degrade(kind: str, text: str, prompt_id: int, sources, rng: random.Random) -> str | None:
    if kind == "truncated":
        return truncate_mid_sentence(text, rng)
    if kind == "shuffled":
        return shuffle_sentences(text, rng)
    if kind == "refusal":
        return REFUSAL_TEXT
    others = [t for _, p, t in sources if p != prompt_id and t.strip() != text.strip()]
    return rng.choice(others) if others else None


def _store_pair(session: Session, policy: PolicyVersion, source_id: int, prompt_id: int, kind: str,
                degraded: str) -> Comparison | None:
    source = session.get(Response, source_id)
    copy, _ = add_response(prompt_id, policy.id, degraded, session=session,
                           generation_params={"gold_degradation": kind, "degraded_from": source_id})
    comparison, created = add_comparison(source, copy, session=session, source=GOLD_SOURCE_PREFIX + kind,
                                         priority=GOLD_PRIORITY)
    if not created:
        return None
    comparison.gold_winner = "a" if comparison.response_a_id == source_id else "b"
    comparison.gold_kind = kind
    session.add(comparison)
    session.flush()
    return comparison


def gold_comparisons(*, session: Session) -> list[Comparison]:
    return list(session.exec(select(Comparison).where(col(Comparison.gold_winner).is_not(None))
                             .order_by(Comparison.id)))


# ---- serving gold pairs ----------------------------------------------------------------------


def _open_gold(rater_id: int, exclude: Collection[int] = ()):
    voted = exists().where(Vote.comparison_id == Comparison.id, Vote.rater_id == rater_id)
    query = sa_select(Comparison.id, Comparison.response_a_id, Comparison.response_b_id).where(
        col(Comparison.gold_winner).is_not(None), ~voted
    )
    if exclude:
        query = query.where(col(Comparison.id).not_in(list(exclude)))
    return query.order_by(Comparison.id)


# Read on every deal of the pairwise page: one Core statement, no ORM load.
_GOLD_RATE = sa_select(AppSetting.value).where(AppSetting.key == GOLD_RATE_SETTING)


def gold_due(
    rater_id: int, session: Session, *, rng: random.Random | None = None, exclude: Collection[int] = ()
) -> bool:
    """Should this rater's next pair be a gold pair? True with probability `gold_rate` per call,
    and only while a gold pair this rater has not voted on (nor skipped: `exclude`) exists (a
    rate of 0 turns it off)."""
    value = session.connection().execute(_GOLD_RATE).scalar()
    rate = DEFAULT_GOLD_RATE if value is None else float(value)
    if rate <= 0:
        return False
    if (rng or random.SystemRandom()).random() >= rate:
        return False
    return session.execute(sa_select(_open_gold(rater_id, exclude).exists())).scalar()


def next_gold_for(
    rater_id: int,
    session: Session,
    *,
    rng: random.Random | None = None,
    reservation: timedelta = GOLD_RESERVATION,
    exclude: Collection[int] = (),
) -> Assignment | None:
    """Reserve a gold pair this rater has not voted on (a random one, with a random left side)
    and return its assignment, as `next_comparison_for` does; None when none is left. A live
    reservation of this rater for a gold pair is returned again (a reload shows the same pair).
    Gold pairs have no overlap limit: every rater may see each one once. `exclude`: pairs the
    rater skipped in this sitting."""
    rng = rng or random.SystemRandom()
    now = utcnow()
    held = session.exec(
        select(Assignment)
        .join(Comparison, Comparison.id == Assignment.comparison_id)
        .where(Assignment.rater_id == rater_id, Assignment.reserved_until > now,
               col(Comparison.gold_winner).is_not(None), col(Assignment.comparison_id).not_in(list(exclude)))
        .order_by(Assignment.id)
    ).first()
    if held is not None:
        return held
    candidates = session.execute(_open_gold(rater_id, exclude)).all()
    if not candidates:
        return None
    chosen = rng.choice(candidates)
    # A stale reservation of the same pair by this rater would break the unique (comparison, rater).
    session.execute(Assignment.__table__.delete().where(Assignment.rater_id == rater_id,
                                                        Assignment.comparison_id == chosen.id))
    values = {
        "comparison_id": chosen.id,
        "rater_id": rater_id,
        "left_response_id": chosen.response_a_id if rng.random() < 0.5 else chosen.response_b_id,
        "reserved_until": now + reservation,
        "created_at": now,
    }
    new_id = session.execute(insert(Assignment.__table__).returning(Assignment.__table__.c.id), values).scalar_one()
    return Assignment(id=new_id, **values)


def next_pair_for(
    rater_id: int,
    *,
    session: Session,
    reservation: timedelta = DEFAULT_RESERVATION,
    rng: random.Random | None = None,
    exclude: Collection[int] = (),
) -> Assignment | None:
    """The pairwise page's next pair for a rater: their live reservation if any (a reload shows
    the same pair), else a gold pair when `gold_due` says so, else the ordinary queue's next
    pair. Gold pairs are mixed into ordinary work, never dealt alone: with no ordinary pair open
    for the rater, no gold pair either (None), or a gold pair would stand out as the one pair
    that came after "nothing left". The assignment looks the same whichever it is."""
    held = held_assignment(rater_id, session=session, exclude=exclude)
    if held is not None:
        return held
    if gold_due(rater_id, session, rng=rng, exclude=exclude) and ordinary_open(
        rater_id, session=session, exclude=exclude
    ):
        gold = next_gold_for(rater_id, session, rng=rng, reservation=reservation, exclude=exclude)
        if gold is not None:
            return gold
    return reserve_next_open(rater_id, session=session, reservation=reservation, rng=rng, exclude=exclude)


def gold_vote_count(rater_id: int, *, session: Session) -> int:
    return int(session.execute(
        sa_select(func.count()).select_from(Vote).join(Comparison, Comparison.id == Vote.comparison_id)
        .where(Vote.rater_id == rater_id, col(Comparison.gold_winner).is_not(None))
    ).scalar_one())
