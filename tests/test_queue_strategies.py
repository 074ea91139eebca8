"""Queue-order strategies (feedback_store.queue_strategies, `prefloop queue prioritize`): each writes
priorities that next_comparison_for then honours; the admin tab's queue, gold and quality controls."""

from __future__ import annotations

import itertools

import pytest
from sqlmodel import select

from feedback_store import queue_strategies as qs
from feedback_store.app_settings import gold_rate, quality_threshold
from feedback_store.catalog import add_comparison, add_prompt, add_response, get_or_create_policy
from feedback_store.db import engine_for, session_scope
from feedback_store.gold import GOLD_PRIORITY
from feedback_store.judge_runs import start_judge_run
from feedback_store.models import Comparison, JudgeCall
from feedback_store.queue import next_comparison_for
from feedback_store.raters import get_or_create_judge, get_or_create_local_user, get_rater
from feedback_store.votes import record_vote
from labeling.cli.queue_command import prioritize


def build(engine, policies: list[str], n_prompts: int, *, same_policy: bool = False) -> dict:
    """Each prompt answered by every policy (twice by the first with `same_policy`: its second
    answer is labelled "<policy>2"), all pairs compared. Returns {(label, label, prompt index):
    comparison id}, labels in sorted order."""
    ids = {}
    with session_scope(engine) as s:
        made = {name: get_or_create_policy(name, session=s, base_model="tiny") for name in policies}
        for i in range(n_prompts):
            prompt, _ = add_prompt(f"question {i}", session=s)
            responses = [(name, add_response(prompt.id, made[name].id, f"{name} answers {i}", session=s)[0])
                         for name in policies]
            if same_policy:
                extra = add_response(prompt.id, made[policies[0]].id, f"{policies[0]} again {i}", session=s)[0]
                responses.append((f"{policies[0]}2", extra))
            for (p, rp), (q, rq) in itertools.combinations(responses, 2):
                comparison, _ = add_comparison(rp, rq, session=s)
                ids[(*sorted((p, q)), i)] = comparison.id
    return ids


def served_order(engine, rater_id: int, n: int) -> list[int]:
    """The next n pairs the queue would hand this rater (each skipped in turn)."""
    seen: list[int] = []
    for _ in range(n):
        with session_scope(engine) as s:
            assignment = next_comparison_for(rater_id, session=s, exclude=seen)
        if assignment is None:
            break
        seen.append(assignment.comparison_id)
    return seen


def priorities(engine) -> dict[int, int]:
    with session_scope(engine) as s:
        return dict(s.exec(select(Comparison.id, Comparison.priority)).all())


def set_priorities(engine, values: dict[int, int]) -> None:
    with session_scope(engine) as s:
        for cid, p in values.items():
            s.get(Comparison, cid).priority = p


def test_fewest_votes_resets_rankings_keeps_raised_and_gold(engine):
    ids = list(build(engine, ["a", "b"], 6).values())
    set_priorities(engine, {ids[0]: -7, ids[1]: -3, ids[2]: 10, ids[3]: 5, ids[4]: GOLD_PRIORITY})
    with session_scope(engine) as s:
        s.get(Comparison, ids[4]).gold_winner = "a"
        alice = get_or_create_local_user("alice", session=s).id
    assert prioritize(engine, "fewest-votes")["pairs"] == 2
    got = priorities(engine)
    assert [got[i] for i in ids] == [0, 0, 10, 5, GOLD_PRIORITY, 0]
    assert served_order(engine, alice, 2) == [ids[2], ids[3]]  # raised first, then fewest votes
    prioritize(engine, "fewest-votes", reset_raised=True)
    got = priorities(engine)
    assert [got[i] for i in ids] == [0, 0, 0, 0, GOLD_PRIORITY, 0]
    with session_scope(engine) as s:
        assert qs.current_strategy(session=s) == "fewest-votes"


def test_uncertainty_serves_the_smallest_margins_first(engine):
    ids = list(build(engine, ["a", "b"], 8).values())
    margins = {cid: m for cid, m in zip(ids, [3.0, -0.1, 2.0, 0.05, -1.0, float("nan"), 0.5, -4.0])}
    set_priorities(engine, {ids[7]: 10})  # a judge's doubt stays ahead of any ranking
    with session_scope(engine) as s:
        alice = get_or_create_local_user("alice", session=s).id
    seen_pairs = []

    def fake_scorer(pairs):
        seen_pairs.extend(p.comparison_id for p in pairs)
        assert all(p.text_a and p.text_b for p in pairs)
        return {p.comparison_id: margins[p.comparison_id] for p in pairs}

    outcome = prioritize(engine, "uncertainty", margin_source=fake_scorer)
    assert outcome["pairs"] == 6 and sorted(seen_pairs) == sorted(ids[:7])  # the raised one is not in the band
    got = priorities(engine)
    assert got[ids[3]] == -1 and got[ids[1]] == -2 and got[ids[5]] == 0  # no margin: left where it was
    # Served: the raised pair, the unranked (new) one, then |margin| ascending.
    assert served_order(engine, alice, 8) == [ids[7], ids[5], ids[3], ids[1], ids[6], ids[4], ids[2], ids[0]]


def test_uncertainty_scores_with_a_reward_scorer_through_alignment():
    from alignment.queue_scoring import dpo_margins, reward_margins
    from feedback_store.judge_runs import PairTexts

    class Scorer:
        def score_batch(self, prompts, responses, batch_size=16):
            return [float(len(r)) for r in responses]

    class Policy:
        def logprobs(self, prompts, responses, adapter=True):
            return [(-1.0 if adapter else -2.0) * len(r) for r in responses]

    pairs = [PairTexts(1, [{"role": "user", "content": "q"}], "long answer", "short"),
             PairTexts(2, [{"role": "user", "content": "q"}], "x", "yy")]
    assert reward_margins(Scorer(), pairs) == {1: 6.0, 2: -1.0}
    # implicit reward: beta * (policy - reference) = 0.1 * len, so margins are 0.1 * length gaps
    assert dpo_margins(Policy(), pairs, beta=0.1) == pytest.approx({1: 0.6, 2: -0.1})


def _judge_calls(engine, verdicts: dict[int, tuple[str, str, float | None]]) -> None:
    with session_scope(engine) as s:
        judge = get_or_create_judge("tiny", "v1", session=s)
        run = start_judge_run(judge.id, "rubric", "tiny", "v1", {}, session=s)
        for cid, (ab, ba, confidence) in verdicts.items():
            for order, verdict in (("ab", ab), ("ba", ba)):
                s.add(JudgeCall(judge_run_id=run.id, comparison_id=cid, order=order, status="ok",
                                verdict=verdict, confidence=confidence))


def test_judge_doubt_raises_inconsistent_and_unsure_pairs(engine):
    ids = list(build(engine, ["a", "b"], 5).values())
    _judge_calls(engine, {ids[1]: ("a", "b", 0.9),  # inconsistent across orders
                          ids[2]: ("a", "a", 0.6),  # unsure
                          ids[3]: ("b", "b", 0.95)})  # confident: left alone
    with session_scope(engine) as s:
        alice = get_or_create_local_user("alice", session=s).id
    outcome = prioritize(engine, "judge-doubt")
    assert outcome["pairs"] == 2 and "2 of 3 judged" in outcome["message"]
    got = priorities(engine)
    assert [got[i] for i in ids] == [0, 10, 10, 0, 0]
    assert served_order(engine, alice, 3) == [ids[1], ids[2], ids[0]]


def test_uncertainty_spreads_a_batch_over_prompts(engine):
    # Three policies: three pairs per prompt. Prompt 0 holds the three smallest margins.
    ids = build(engine, ["a", "b", "c"], 3)
    margins = {ids[("a", "b", 0)]: 0.01, ids[("a", "c", 0)]: 0.02, ids[("b", "c", 0)]: 0.03,
               ids[("a", "b", 1)]: 0.5, ids[("a", "c", 1)]: 0.6, ids[("b", "c", 1)]: 0.7,
               ids[("a", "b", 2)]: -0.4, ids[("a", "c", 2)]: 2.0, ids[("b", "c", 2)]: 3.0}
    with session_scope(engine) as s:
        alice = get_or_create_local_user("alice", session=s).id
    outcome = prioritize(engine, "uncertainty", margin_source=lambda pairs: margins)
    assert outcome["pairs"] == 9 and "spread over prompts" in outcome["message"]
    by_margin = sorted(margins, key=lambda cid: abs(margins[cid]))
    # Each prompt's closest pair (by |margin|), then each prompt's second, then the third.
    expected = [by_margin[i] for i in (0, 3, 4, 1, 5, 7, 2, 6, 8)]
    assert served_order(engine, alice, 9) == expected
    prioritize(engine, "uncertainty", margin_source=lambda pairs: margins, spread_prompts=False)
    got = priorities(engine)  # (alice holds every pair now: read the priorities instead)
    assert sorted(by_margin, key=got.get, reverse=True) == by_margin and got[by_margin[0]] == -1


def test_margin_order_without_prompts_is_plain_ascending_abs_margin():
    margins = {1: 0.3, 2: -0.1, 3: float("nan"), 4: 0.2, 5: -0.2}
    assert qs.margin_order(margins) == [2, 4, 5, 1]  # NaN left out, equal |margin| by id
    assert qs.margin_order(margins, {1: 7, 2: 7, 4: 7, 5: 8}) == [2, 5, 4, 1]


def test_arena_serves_the_widest_gain_first_and_same_policy_pairs_last(engine):
    # "close" and "near" are about equal and compared 20 times; "far" loses 19 in 20 to each.
    ids = build(engine, ["close", "far", "near"], 20, same_policy=True)
    with session_scope(engine) as s:
        judge = get_or_create_judge("tiny", "v1", session=s).id  # judge votes count, fill no human slot
        alice = get_or_create_local_user("alice", session=s).id
        for i in range(20):
            record_vote(ids[("close", "near", i)], judge, "a" if i % 2 else "b", session=s)
            for other in ("close", "near"):
                cid = ids[("close", "far", i)] if other == "close" else ids[("far", "near", i)]
                far_wins = i == 0
                far_is_a = other == "near"  # responses are made in order close, far, near
                record_vote(cid, judge, "a" if far_wins == far_is_a else "b", session=s)
    outcome = prioritize(engine, "arena")
    with session_scope(engine) as s:
        inputs = qs.arena_inputs(session=s)
        order = qs.arena(session=s)
    assert inputs.pair_votes == {("close", "far"): 20, ("close", "near"): 20, ("far", "near"): 20}
    assert inputs.ratings["far"] < inputs.ratings["close"] - 300
    # "far" has the widest interval (its votes are nearly all one way: little information each),
    # so the first votes go to it.
    first = max(order.weights, key=order.weights.get)
    assert "far" in first and "far" in outcome["message"].split("first:")[1].split(",")[0]
    same = {ids[("close", "close2", i)] for i in range(20)}
    served = served_order(engine, alice, 100)
    assert len(served) == 100 and not same & set(served)  # same-policy pairs last
    got = priorities(engine)
    assert all(got[c] == qs.USELESS_PRIORITY for c in same)


def _pairs(spec):
    """OpenPairs numbered in order from [(policy a, policy b), ...]."""
    return [qs.OpenPair(i, 0, a, b) for i, (a, b) in enumerate(spec)]


def test_arena_prefers_pairs_compared_rarely():
    names = {1: "x", 2: "y", 3: "z"}
    pairs = _pairs([(1, 2)] * 4 + [(1, 3)] * 4 + [(2, 3)] * 4)
    order = qs.arena_order(pairs, names, {"x": 1000, "y": 1000, "z": 1000},
                           {("x", "y"): 30, ("x", "z"): 5, ("y", "z"): 5})
    assert order.weights[("x", "z")] > order.weights[("x", "y")]
    assert order.ranked[:2] in ([4, 8], [8, 4]) and set(order.ranked) == set(range(12))


def test_arena_serves_an_unrated_policy_first_and_the_least_voted_comparisons_first():
    names = {1: "x", 2: "y", 3: "z"}
    pairs = _pairs([(1, 2)] * 3 + [(1, 3)] * 3)
    order = qs.arena_order(pairs, names, {"x": 1000, "y": 1010}, {("x", "y"): 30},
                           comparison_votes={3: 2, 4: 1})
    assert order.ranked[0] == 5  # z has no rating and no votes; its comparison without votes first
    assert order.ranked.index(4) < order.ranked.index(3)  # fewer votes first within the policy pair
    assert qs.arena_order(_pairs([(1, 1)]), names, {}).useless == [0]


def test_the_cli_lists_the_stores_strategies():
    from labeling.cli import queue_command

    assert queue_command.STRATEGIES == qs.STRATEGIES and queue_command.DOUBT_PRIORITY == qs.DOUBT_PRIORITY


def test_an_unknown_strategy_is_refused(engine):
    with pytest.raises(ValueError, match="unknown queue strategy"):
        prioritize(engine, "random")


# ---- the admin tab ------------------------------------------------------------------------


@pytest.fixture
def state(db_url, tmp_path):
    from labeling.app.state import AppConfig, AppState
    from labeling.cli.job_commands import JOB_COMMAND_LINE
    from tests.app_support import seed_users

    engine = engine_for(db_url)
    seed_users(engine, ["bob"], ["alice"])
    return AppState.create(AppConfig(db_url=db_url, job_dir=tmp_path / "jobs"), engine=engine,
                           command_line=JOB_COMMAND_LINE)


def test_admin_controls_store_their_settings(state):
    from labeling.app import admin
    from labeling.app.auth import caller_for

    alice = caller_for(state, "alice")
    ids = build(state.engine, ["a", "b"], 4)
    with session_scope(state.engine) as s:
        bob = get_rater("bob", session=s).id
        for cid in list(ids.values())[:3]:
            record_vote(cid, bob, "a", session=s)
    assert "fewest-votes" in admin.run_queue_strategy(state, alice, "fewest-votes")
    assert "arena" in admin.run_queue_strategy(state, alice, "arena")
    with session_scope(state.engine) as s:
        assert qs.current_strategy(session=s) == "arena"
    with pytest.raises(admin.AdminError, match="strategy must be one of"):
        admin.run_queue_strategy(state, alice, "random")
    admin.save_gold_rate(state, alice, 0.2)
    admin.save_quality_threshold(state, alice, 0.55)
    with session_scope(state.engine) as s:
        assert gold_rate(session=s) == 0.2 and quality_threshold(session=s) == 0.55
    with pytest.raises(admin.AdminError, match="between 0 and 1"):
        admin.save_gold_rate(state, alice, 1.5)
    with pytest.raises(admin.AdminError, match="between 0 and 1"):
        admin.save_quality_threshold(state, alice, -0.1)
    assert admin.save_rater_weight(state, alice, "bob", 0.25) == "bob: weight 0.25"
    with session_scope(state.engine) as s:
        assert get_rater("bob", session=s).weight == 0.25
    with pytest.raises(admin.AdminError, match="no rater"):
        admin.save_rater_weight(state, alice, "nobody", 1)
    with pytest.raises(admin.AdminError, match=">= 0"):
        admin.save_rater_weight(state, alice, "bob", -1)
    table = admin.rater_quality_table(state, alice)
    assert [row[0] for row in table] == ["bob"] and table[0][2] == 3 and table[0][7] == "0.250"
    assert "raters weighted" in admin.auto_rater_weights(state, alice)


def test_admin_controls_refuse_annotators(state):
    from labeling.app import admin
    from labeling.app.auth import caller_for

    bob = caller_for(state, "bob")
    for action, args in ((admin.run_queue_strategy, ("fewest-votes",)), (admin.save_gold_rate, (0.5,)),
                         (admin.save_quality_threshold, (0.5,)), (admin.rater_quality_table, ()),
                         (admin.save_rater_weight, ("bob", 5)), (admin.auto_rater_weights, ())):
        with pytest.raises(admin.AdminError, match="not an admin"):
            action(state, bob, *args)
    with session_scope(state.engine) as s:
        assert gold_rate(session=s) == pytest.approx(1 / 20) and get_rater("bob", session=s).weight == 1.0


def test_queue_cli(sqlite_url):
    import subprocess
    import sys

    from tests.app_support import REPO

    build(engine_for(sqlite_url), ["a", "b"], 3)
    cli = [sys.executable, "-c", "import sys; from labeling.cli import main; sys.exit(main(sys.argv[1:]))"]
    done = subprocess.run([*cli, "queue", "prioritize", "--by", "arena", "--db", sqlite_url],
                          capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert done.returncode == 0 and "arena: 3 open pairs ranked" in done.stdout, done.stderr
    shown = subprocess.run([*cli, "queue", "show", "--db", sqlite_url], capture_output=True, text=True, cwd=REPO,
                           timeout=120, check=False)
    assert "strategy: arena" in shown.stdout and "ranked 3" in shown.stdout
    refused = subprocess.run([*cli, "queue", "prioritize", "--by", "arena", "--reward-run", "1", "--db", sqlite_url],
                             capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert refused.returncode == 2 and "--by uncertainty" in refused.stderr


def test_pairs_the_judge_settled_are_not_ranked(engine):
    """`judge --judge-first` took these pairs out of the human queue: no strategy ranks them."""
    ids = list(build(engine, ["a", "b"], 4).values())
    with session_scope(engine) as s:
        judge = get_or_create_judge("judge-model", "v1", session=s).id
        s.get(Comparison, ids[0]).settled_by = judge
    with session_scope(engine) as s:
        assert ids[0] not in {pair.comparison_id for pair in qs.open_pairs(session=s)}
    seen = []
    prioritize(engine, "uncertainty", margin_source=lambda pairs: seen.extend(p.comparison_id for p in pairs) or {})
    assert sorted(seen) == sorted(ids[1:])
