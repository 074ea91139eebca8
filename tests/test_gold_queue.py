"""Gold pairs in a human's queue: the ordinary queue never serves them; the pairwise page (and a
vote's next pair) mixes them in at the gold rate, and nothing the page sends tells them apart;
the single-response page never deals a degraded copy."""

from __future__ import annotations

import random
import re

import pytest
from sqlmodel import select

from feedback_store.app_settings import set_gold_rate, set_target_overlap
from feedback_store.catalog import add_comparison, add_prompt, add_response, get_or_create_policy
from feedback_store.db import engine_for, session_scope
from feedback_store.gold import GOLD_POLICY, next_pair_for
from feedback_store.models import Assignment, Comparison, Rater, RaterKind, Response, Vote
from feedback_store.queue import next_comparison_for, next_response_for, open_comparisons
from feedback_store.sittings import record_vote_and_next
from feedback_store.votes import record_vote
from labeling.app import annotate
from labeling.app.annotation_flow import AnnotationFlow, PageEvents
from labeling.app.auth import caller_for
from labeling.app.state import AppConfig, AppState
from tests.app_support import seed_users


def make_store(session, n_ordinary: int, n_gold: int) -> tuple[list[int], list[int]]:
    """Ordinary pairs and gold pairs (a stored answer against a degraded copy of the gold policy),
    built directly: what the queue sees of a gold pair is its `gold_winner`."""
    policy = get_or_create_policy("base", session=session, base_model="tiny")
    other = get_or_create_policy("tuned", session=session, base_model="tiny")
    degraded = get_or_create_policy(GOLD_POLICY, session=session, base_model="none")
    ordinary, gold = [], []
    for i in range(n_ordinary + n_gold):
        prompt, _ = add_prompt(f"Question {i}: how do I boil an egg?", session=session, source="test")
        first, _ = add_response(prompt.id, policy.id, f"Answer {i}: put it in water, then wait seven minutes.",
                                session=session)
        is_gold = i >= n_ordinary
        text = f"Answer {i}: put it in" if is_gold else f"Answer {i}: boil it for 7 minutes."
        second, _ = add_response(prompt.id, (degraded if is_gold else other).id, text, session=session)
        comparison, _ = add_comparison(first, second, session=session, source="gold:truncated" if is_gold else "test")
        if is_gold:
            comparison.gold_winner = "a" if comparison.response_a_id == first.id else "b"
            comparison.gold_kind = "truncated"
            comparison.priority = 100  # even at the head of the queue order, never served by it
            session.add(comparison)
            gold.append(comparison.id)
        else:
            ordinary.append(comparison.id)
    session.flush()
    return ordinary, gold


def human(session, name: str) -> int:
    rater = Rater(name=name, kind=RaterKind.human)
    session.add(rater)
    session.flush()
    return rater.id


def test_the_ordinary_queue_never_serves_a_gold_pair(db_url):
    engine = engine_for(db_url)
    with session_scope(engine) as s:
        ordinary, _ = make_store(s, 6, 4)
        bob = human(s, "bob")
        set_gold_rate(1.0, session=s)  # the queue itself ignores the rate: it never deals gold
        assert open_comparisons(bob, session=s) == 6  # "pairs left" counts ordinary pairs only
        served = []
        while (assignment := next_comparison_for(bob, session=s)) is not None:
            served.append(assignment.comparison_id)
            record_vote(assignment.comparison_id, bob, "a", session=s, left_response_id=assignment.left_response_id)
        assert sorted(served) == sorted(ordinary)
        assert open_comparisons(bob, session=s) == 0


def test_gold_pairs_are_dealt_at_the_gold_rate(sqlite_url):
    engine = engine_for(sqlite_url)
    with session_scope(engine) as s:
        _, gold = make_store(s, 400, 120)
        bob = human(s, "bob")
        set_gold_rate(0.2, session=s)
        rng = random.Random(11)
        served: list[int] = []
        assignment = next_pair_for(bob, session=s, rng=rng)
        for _ in range(300):
            served.append(assignment.comparison_id)
            _, assignment = record_vote_and_next(
                assignment.comparison_id, bob, "a", session=s, left_response_id=assignment.left_response_id, rng=rng
            )
        gold_served = [c for c in served if c in set(gold)]
        assert len(set(served)) == len(served)  # nothing twice
        # 300 draws at p = 0.2: sd 0.023; a fixed seed makes it exact, the bound is 3 sd.
        assert abs(len(gold_served) / len(served) - 0.2) < 0.07, len(gold_served)
        # Votes on gold pairs are stored like any other (they feed rater quality).
        gold_votes = s.exec(select(Vote).where(Vote.rater_id == bob, Vote.comparison_id.in_(gold_served))).all()
        assert len(gold_votes) == len(gold_served)

        set_gold_rate(0.0, session=s)
        rng = random.Random(3)
        for _ in range(50):
            _, assignment = record_vote_and_next(
                assignment.comparison_id, bob, "b", session=s, left_response_id=assignment.left_response_id, rng=rng
            )
            assert assignment.comparison_id not in set(gold)


def test_gold_is_never_dealt_alone_and_a_reload_shows_the_same_pair(sqlite_url):
    engine = engine_for(sqlite_url)
    with session_scope(engine) as s:
        ordinary, gold = make_store(s, 2, 3)
        bob = human(s, "bob")
        set_gold_rate(1.0, session=s)
        rng = random.Random(0)
        first = next_pair_for(bob, session=s, rng=rng)
        assert first.comparison_id in gold
        assert next_pair_for(bob, session=s, rng=rng).comparison_id == first.comparison_id  # held
        # Skipped in this sitting: not dealt again (another gold pair is).
        again = next_pair_for(bob, session=s, rng=rng, exclude={first.comparison_id})
        assert again.comparison_id in gold and again.comparison_id != first.comparison_id
        # Once no ordinary pair is open for bob, no gold pair either.
        for cid in ordinary:
            record_vote(cid, bob, "a", session=s)
        s.execute(Assignment.__table__.delete().where(Assignment.rater_id == bob))
        assert next_pair_for(bob, session=s, rng=rng) is None


def test_single_response_cards_never_deal_a_degraded_copy(db_url):
    engine = engine_for(db_url)
    with session_scope(engine) as s:
        make_store(s, 2, 2)
        bob = human(s, "bob")
        dealt = []
        while (response := next_response_for(bob, session=s, exclude=dealt)) is not None:
            dealt.append(response.id)
        policies = {r.policy_id for r in s.exec(select(Response).where(Response.id.in_(dealt)))}
        gold_policy = get_or_create_policy(GOLD_POLICY, session=s)
        assert len(dealt) == 6 and gold_policy.id not in policies


# ---- what the annotator's browser receives --------------------------------------------------


@pytest.fixture
def state(sqlite_url, tmp_path):
    engine = engine_for(sqlite_url)
    seed_users(engine, ["bob"], ["alice"])
    with session_scope(engine) as s:
        make_store(s, 3, 3)
        set_target_overlap(1, session=s)
    return AppState.create(AppConfig(db_url=sqlite_url, job_dir=tmp_path / "jobs"), engine=engine)


def _shape(value):
    """A value with the texts of the screen taken out: what is left must not depend on gold."""
    if isinstance(value, str):
        value = re.sub(r'(id="pf-(?:prompt|left|right)">).*?(</div>(?:</section>|<div class="pf-sides">))',
                       r"\1TEXT\2", value, flags=re.DOTALL)
        value = re.sub(r"\b[0-9a-f]{32}\b", "KEY", value)  # the idempotency key
        value = re.sub(r"\d+", "N", value)  # counts
        return ("str", value)
    return (type(value).__name__,)


def test_a_gold_pair_and_an_ordinary_pair_send_the_same_shape(state):
    bob = caller_for(state, "bob")
    with session_scope(state.engine) as s:
        gold = {c.id for c in s.exec(select(Comparison).where(Comparison.gold_winner.is_not(None)))}
    outputs = {}
    for rate, kind in ((1.0, "gold"), (0.0, "ordinary")):
        with session_scope(state.engine) as s:
            set_gold_rate(rate, session=s)
        flow = AnnotationFlow(annotate.Pairs(rng=random.Random(1)))
        events = PageEvents(state, flow, cleared=(None, "", ""))
        desk, screen = flow.open(state, None, bob)
        assert (desk.slot.comparison_id in gold) == (kind == "gold")
        # What a vote's event sends back too: the next pair is dealt the same way.
        opened = events.updates(desk, screen)
        desk, screen = flow.submit(state, desk, bob, "left", desk.slot.key, annotate.VoteExtras())
        assert "Saved" in screen.status
        outputs[kind] = (opened, events.updates(desk, screen))
        with session_scope(state.engine) as s:  # the next round starts from an empty desk
            s.execute(Assignment.__table__.delete())
    for gold_event, ordinary_event in zip(outputs["gold"], outputs["ordinary"]):
        assert len(gold_event) == len(ordinary_event)
        # Index 0 is the server-side gr.State (never sent); the rest goes to the browser.
        for g, o in zip(gold_event[1:], ordinary_event[1:]):
            assert _shape(g) == _shape(o)
        sent = " ".join(str(v) for v in gold_event[1:]).lower()
        assert "gold" not in sent and "degraded" not in sent


def test_export_counts_simulated_votes_only_when_asked(sqlite_url, tmp_path, capsys):
    from labeling.cli import main as cli_main

    engine = engine_for(sqlite_url)
    with session_scope(engine) as s:
        ordinary, _ = make_store(s, 20, 0)
        sim = Rater(name="sim-1", kind=RaterKind.simulated)
        s.add(sim)
        s.flush()
        for cid in ordinary:
            record_vote(cid, sim.id, "a", session=s)
    counts = {}
    for extra in ([], ["--include-simulated"]):
        out = tmp_path / f"dpo{len(extra)}.jsonl"
        assert cli_main(["export", "dpo", "--db", sqlite_url, "--out", str(out), *extra]) == 0
        counts[bool(extra)] = len(out.read_text().splitlines())
    assert counts[False] == 0 and counts[True] > 0  # (eval prompts are held out either way)
    assert "wrote" in capsys.readouterr().out
