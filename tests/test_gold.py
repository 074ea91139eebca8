"""Gold pairs (feedback_store.gold): the known winner is the real answer, they never reach an
export or the leaderboard, and the queue's hooks (gold_due, next_gold_for) serve them."""

from __future__ import annotations

import random

import pytest
from sqlmodel import select

from feedback_store.app_settings import DEFAULT_GOLD_RATE, set_gold_rate
from feedback_store.db import engine_for, session_scope
from feedback_store.export import export_dpo, export_kto
from feedback_store.gold import (
    GOLD_POLICY,
    REFUSAL_TEXT,
    gold_comparisons,
    gold_due,
    make_gold_pairs,
    next_gold_for,
    shuffle_sentences,
    truncate_mid_sentence,
)
from feedback_store.models import PolicyVersion, Rater, RaterKind, Response
from feedback_store.stats import compute_stats
from feedback_store.votes import record_rating, record_vote
from tests.test_simulate import make_pairs


def test_degradations():
    rng = random.Random(0)
    text = "One two three four. Five six seven eight. Nine ten eleven twelve."
    cut = truncate_mid_sentence(text, rng)
    assert text.startswith(cut) and len(cut) < len(text) and not cut.endswith(".")
    shuffled = shuffle_sentences(text, rng)
    assert shuffled != text and sorted(shuffled.split(". ")) != [] and len(shuffled) == len(text)
    assert shuffle_sentences("Only one. Two.", rng) is None
    assert truncate_mid_sentence("too short", rng) is None


def test_gold_pairs_know_their_winner(session):
    make_pairs(session, 12)
    report = make_gold_pairs(session=session, count=8, seed=1)
    assert len(report.made) == 8 and sum(report.by_kind.values()) == 8
    gold_policy = session.exec(select(PolicyVersion).where(PolicyVersion.name == GOLD_POLICY)).one()
    answers_elsewhere = {}
    for r in session.exec(select(Response).where(Response.policy_id != gold_policy.id)):
        answers_elsewhere.setdefault(r.text, set()).add(r.prompt_id)
    golds = gold_comparisons(session=session)
    assert [g.id for g in golds] == report.made
    for pair in golds:
        a, b = session.get(Response, pair.response_a_id), session.get(Response, pair.response_b_id)
        real, copy = (a, b) if pair.gold_winner == "a" else (b, a)
        assert real.policy_id != gold_policy.id and copy.policy_id == gold_policy.id
        # (a copy is one response per prompt and text: two answers refused alike share one)
        assert copy.generation_params["gold_degradation"] == pair.gold_kind
        assert pair.source == f"gold:{pair.gold_kind}" and pair.priority < 0
        if pair.gold_kind == "truncated":
            assert real.text.startswith(copy.text) and len(copy.text) < len(real.text)
        elif pair.gold_kind == "shuffled":
            assert copy.text != real.text and sorted(copy.text) == sorted(real.text.replace("  ", " "))
        elif pair.gold_kind == "refusal":
            assert copy.text == REFUSAL_TEXT
        else:
            assert pair.gold_kind == "other_prompt"
            assert answers_elsewhere[copy.text] - {pair.prompt_id}  # another prompt's answer
    # A rerun with the same seed finds those and makes new ones from further answers.
    more = make_gold_pairs(session=session, count=4, seed=1)
    assert len(more.made) == 4 and not set(more.made) & set(report.made)
    with pytest.raises(ValueError, match="unknown degradation"):
        make_gold_pairs(session=session, kinds=["reversed"])


def test_gold_pairs_are_never_exported_nor_ranked(session):
    make_pairs(session, 6)
    make_gold_pairs(session=session, count=4, seed=0, kinds=["truncated", "refusal"])
    human = Rater(name="alice", kind=RaterKind.human)
    session.add(human)
    session.flush()
    golds = {g.id: g for g in gold_comparisons(session=session)}
    from feedback_store.models import Comparison

    for pair in session.exec(select(Comparison)):
        record_vote(pair.id, human.id, pair.gold_winner or "a", session=session)
        copy_id = pair.response_b_id if pair.gold_winner == "a" else pair.response_a_id
        if pair.id in golds:
            record_rating(copy_id, human.id, False, session=session)
    dpo = export_dpo(session=session)
    assert len(dpo) == 6 and not set(dpo["comparison_id"]) & set(golds)
    assert GOLD_POLICY not in set(dpo["chosen_policy"]) | set(dpo["rejected_policy"])
    kto = export_kto(session=session)
    assert GOLD_POLICY not in set(kto["policy"])
    stats = compute_stats(session=session)
    assert GOLD_POLICY not in [r.policy for r in stats.leaderboard.ratings]
    assert sum(r.n for r in stats.leaderboard.ratings) == 2 * 6  # the six ordinary votes only
    quality = {row.rater: row for row in stats.raters}["alice"]
    assert (quality.gold_n, quality.gold_correct, quality.gold_accuracy) == (4, 4, 1.0)


def test_gold_due_and_next_gold_for(sqlite_url):
    engine = engine_for(sqlite_url)
    with session_scope(engine) as s:
        make_pairs(s, 6)
        make_gold_pairs(session=s, count=3, seed=0)
        rater = Rater(name="bob", kind=RaterKind.human)
        s.add(rater)
        s.flush()
        rid = rater.id
        rng = random.Random(5)
        due = sum(gold_due(rid, s, rng=rng) for _ in range(4000))
        assert abs(due / 4000 - DEFAULT_GOLD_RATE) < 0.015  # 1 in 20 by default
        set_gold_rate(0.0, session=s)
        assert not any(gold_due(rid, s, rng=rng) for _ in range(200))
        set_gold_rate(1.0, session=s)
        assert gold_due(rid, s, rng=rng)
        first = next_gold_for(rid, s, rng=rng)
        assert first.comparison_id in {g.id for g in gold_comparisons(session=s)}
        assert next_gold_for(rid, s, rng=rng).comparison_id == first.comparison_id  # held: a reload
        seen = set()
        while (assignment := next_gold_for(rid, s, rng=rng)) is not None:
            seen.add(assignment.comparison_id)
            record_vote(assignment.comparison_id, rid, "a", session=s, left_response_id=assignment.left_response_id)
        assert len(seen) == 3
        assert not gold_due(rid, s, rng=rng)  # nothing left for bob
        with pytest.raises(ValueError):
            set_gold_rate(2, session=s)
