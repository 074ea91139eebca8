"""Many writers at once on one SQLite file / one PostgreSQL server: nothing lost, nothing doubled.

Writers are threads in this process and threads in spawned processes (each with its own
engine), all starting at the same moment. They deliberately collide: the same
(comparison, rater) is hit by retries carrying the same idempotency key, by changes of mind
carrying new keys and by key-less submissions, all at the same time.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest
from sqlalchemy import func
from sqlmodel import select

from feedback_store.db import session_scope
from feedback_store.models import AppSetting, Comparison, Rater, RaterKind, Vote, VoteRevision
from feedback_store.queue import OVERLAP_SETTING
from feedback_store.raters import get_or_create_judge, get_or_create_local_user
from tests.store_factories import make_comparisons
from tests.store_workers import QueueTask, VoteTask, run_everywhere, start_process_pool

PROCESSES, THREADS = 2, 4  # 12 concurrent writers on 2 cores: plenty of interleaving


@pytest.fixture(scope="module")
def process_pool():
    """Spawned once for the module: starting a Python process costs seconds here."""
    pool = start_process_pool(PROCESSES)
    yield pool
    pool.shutdown(cancel_futures=True)


def make_raters(session, humans: int, judges: int = 0) -> list[int]:
    raters = [get_or_create_local_user(f"annotator{i}", session=session) for i in range(humans)]
    raters += [get_or_create_judge(f"model{i}", "v1", session=session) for i in range(judges)]
    return [r.id for r in raters]


def colliding_vote_tasks(comparison_ids, rater_ids, seed=7) -> list[VoteTask]:
    """For every (comparison, rater): three retries of one keyed vote and a key-less copy of it;
    for every other pair also two changes of mind with their own keys."""
    tasks = []
    for c in comparison_ids:
        for r in rater_ids:
            tasks += [VoteTask(c, r, "a", f"{c}-{r}-first")] * 3 + [VoteTask(c, r, "a", None)]
            if (c + r) % 2:
                tasks += [VoteTask(c, r, "b", f"{c}-{r}-b"), VoteTask(c, r, "tie", f"{c}-{r}-tie")]
    random.Random(seed).shuffle(tasks)
    return tasks


def test_concurrent_votes_are_neither_lost_nor_doubled(engine, db_url, process_pool):
    with session_scope(engine) as s:
        comparison_ids = [c.id for c in make_comparisons(s, 10)]
        rater_ids = make_raters(s, humans=5, judges=1)
    tasks = colliding_vote_tasks(comparison_ids, rater_ids)

    results, errors = run_everywhere(db_url, tasks, pool=process_pool, processes=PROCESSES, threads=THREADS)

    assert errors == []
    assert len(results) == len(tasks)
    vote_id_of_pair: dict[tuple[int, int], set[int]] = defaultdict(set)
    for task, vote_id, comparison_id, rater_id in results:
        assert (comparison_id, rater_id) == (task.comparison_id, task.rater_id)
        vote_id_of_pair[comparison_id, rater_id].add(vote_id)
    assert all(len(ids) == 1 for ids in vote_id_of_pair.values()), "one pair answered with two votes"

    submitted = {(t.comparison_id, t.rater_id, t.key): t.choice for t in tasks}
    with session_scope(engine) as s:
        votes = s.exec(select(Vote)).all()
        assert len(votes) == len(comparison_ids) * len(rater_ids)
        assert Counter((v.comparison_id, v.rater_id) for v in votes).most_common(1)[0][1] == 1
        revisions = defaultdict(list)
        for revision in s.exec(select(VoteRevision).order_by(VoteRevision.revision)):
            revisions[revision.vote_id].append(revision)
        recorded_keys = []
        for v in votes:
            history = revisions[v.id]
            # Revisions are numbered 1..n with no gap or repeat; the vote is revision n + 1.
            assert [h.revision for h in history] == list(range(1, v.revision)), f"vote {v.id}"
            for state in [*history, v]:
                # Every stored state is one that some writer submitted, with its own key.
                assert submitted[v.comparison_id, v.rater_id, state.idempotency_key] == state.choice.value
                if state.idempotency_key is not None:
                    recorded_keys.append(state.idempotency_key)
            for earlier, later in zip(history, history[1:]):
                assert earlier.replaced_at <= later.recorded_at <= later.replaced_at
        # A retry never re-applies its key: each key is recorded at most once.
        assert Counter(recorded_keys).most_common(1)[0][1] == 1

        humans = (
            select(Vote.comparison_id, func.count())
            .join(Rater, Rater.id == Vote.rater_id)
            .where(Rater.kind == RaterKind.human)
            .group_by(Vote.comparison_id)
        )
        human_votes = dict(s.exec(humans).all())
        for comparison in s.exec(select(Comparison)):
            assert comparison.human_votes == human_votes.get(comparison.id, 0) == 5


def test_concurrent_raters_never_share_a_comparison_at_overlap_one(engine, db_url, process_pool):
    with session_scope(engine) as s:
        comparison_ids = [c.id for c in make_comparisons(s, 30)]
        rater_ids = make_raters(s, humans=(PROCESSES + 1) * THREADS)
        s.add(AppSetting(key=OVERLAP_SETTING, value=1))
    tasks = [QueueTask(r, vote_every=1 + i % 3) for i, r in enumerate(rater_ids)]

    results, errors = run_everywhere(db_url, tasks, pool=process_pool, processes=PROCESSES, threads=THREADS)

    assert errors == []
    handed = Counter(c for _, comparison_ids_for_rater in results for c in comparison_ids_for_rater)
    shared = {c: n for c, n in handed.items() if n > 1}
    assert shared == {}, f"comparisons handed to several raters at once: {shared}"
    assert sorted(handed) == comparison_ids  # and every slot did go to someone
    with session_scope(engine) as s:
        assert all(c.human_votes <= 1 for c in s.exec(select(Comparison)))


def test_repeated_retries_of_one_vote_from_everywhere(engine, db_url, process_pool):
    """The worst case for one row: every writer hammers the same (comparison, rater)."""
    with session_scope(engine) as s:
        (comparison_id,) = [c.id for c in make_comparisons(s, 1)]
        (rater_id,) = make_raters(s, humans=1)
    tasks = [VoteTask(comparison_id, rater_id, choice, f"{choice}-key") for choice in ("a", "b")] * 36
    random.Random(3).shuffle(tasks)

    results, errors = run_everywhere(db_url, tasks, pool=process_pool, processes=PROCESSES, threads=THREADS)

    assert errors == []
    assert len({vote_id for _, vote_id, _, _ in results}) == 1
    with session_scope(engine) as s:
        (vote,) = s.exec(select(Vote)).all()
        history = s.exec(select(VoteRevision).order_by(VoteRevision.revision)).all()
        assert s.get(Comparison, comparison_id).human_votes == 1
    # Two keys: at most one change of mind is ever recorded, whatever the interleaving.
    assert vote.revision == len(history) + 1 <= 2
    assert [h.revision for h in history] == list(range(1, vote.revision))
