"""The annotation state machine both feedback pages run (labeling/app/annotation_flow.py):
the same idempotency, stale-key, failure/retry, skip and session rules, checked once for the
pairwise page and once for the single-response page, on a real store."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from sqlmodel import func, select

from feedback_store.db import engine_for, session_scope
from feedback_store.models import Assignment, Rating, Vote
from labeling.app import annotate, single
from labeling.app.annotation_flow import AnnotationFlow, PageEvents
from labeling.app.auth import caller_for
from labeling.app.state import AppConfig, AppState
from labeling.app.ui import text_input
from tests.app_support import seed_pairs, seed_users


@dataclass(frozen=True)
class Page:
    name: str
    flow: AnnotationFlow
    extras: object  # the page's optional inputs, as sent with a choice
    choice: str
    record: type  # what a save writes
    next_statement: str  # a word of the statement that takes the next item, after the save

    def rows(self, state) -> list:
        with session_scope(state.engine) as s:
            return list(s.exec(select(self.record)))


PAGES = {
    "pairs": Page(
        "pairs",
        annotate.PAIRS,
        annotate.VoteExtras(None, "my reason"),
        "left",
        Vote,
        "INSERT INTO assignment",
    ),
    "cards": Page(
        "cards", single.CARDS, single.RatingExtras("my comment"), "down", Rating, "NOT IN"
    ),
}


@pytest.fixture(params=list(PAGES))
def page(request) -> Page:
    return PAGES[request.param]


@pytest.fixture
def state(sqlite_url, tmp_path):
    engine = engine_for(sqlite_url)
    seed_users(engine, ["bob", "carol"])
    seed_pairs(engine, 2)
    return AppState.create(AppConfig(db_url=sqlite_url, job_dir=tmp_path / "jobs"), engine=engine)


def test_both_pages_run_the_shared_machine(state, monkeypatch):
    calls = []
    real = AnnotationFlow.submit

    def spy(self, *args, **kwargs):
        calls.append(type(self.mode).__name__)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AnnotationFlow, "submit", spy)
    bob = caller_for(state, "bob")
    desk, _ = annotate.open_desk(state, None, bob)
    annotate.submit(state, desk, bob, "left", desk.slot.key)
    tray, _ = single.open_tray(state, None, bob)
    single.rate(state, tray, bob, "up", tray.card.key)
    assert calls == ["Pairs", "Cards"]
    assert isinstance(desk, annotate.Desk) and isinstance(tray, single.Tray)


def test_a_double_submit_records_once_and_a_stale_key_records_nothing(state, page):
    bob = caller_for(state, "bob")
    sitting, screen = page.flow.open(state, None, bob)
    key = screen.key
    assert screen.has_item and key == sitting.item.key
    sitting, screen = page.flow.submit(state, sitting, bob, page.choice, key, page.extras)
    assert "Saved" in screen.status and screen.clear_inputs and screen.key != key
    sitting, again = page.flow.submit(state, sitting, bob, page.choice, key, page.extras)
    assert "Already saved" in again.status and len(page.rows(state)) == 1
    on_screen = sitting.item.key
    sitting, stale = page.flow.submit(
        state, sitting, bob, page.choice, "a-key-from-another-tab", page.extras
    )
    assert "nothing was saved" in stale.status and stale.key == on_screen == sitting.item.key
    assert len(page.rows(state)) == 1


def test_a_sitting_of_another_rater_or_page_is_not_used(state, page):
    bob, carol = caller_for(state, "bob"), caller_for(state, "carol")
    bobs, _ = page.flow.open(state, None, bob)
    sitting, screen = page.flow.submit(state, bobs, carol, page.choice, bobs.item.key, page.extras)
    assert (
        sitting is not bobs
        and sitting.rater_id == carol.id
        and "nothing was saved" in screen.status
    )
    other_page = PAGES["cards" if page.name == "pairs" else "pairs"]
    foreign, _ = other_page.flow.open(state, None, bob)
    sitting, screen = page.flow.submit(
        state, foreign, bob, page.choice, foreign.item.key, page.extras
    )
    assert isinstance(sitting, page.flow.mode.sitting_type) and "nothing was saved" in screen.status
    assert page.rows(state) == [] and other_page.rows(state) == []


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_save_and_the_next_item_are_one_transaction_and_retry_records_once(
    request, store, page, tmp_path
):
    """The database fails on the statement that takes the next item, after the judgement was
    written: neither is kept, the item and its key stay on screen, Retry saves once."""
    url = request.getfixturevalue(f"{store}_url")
    engine = engine_for(url)
    seed_users(engine, ["bob"])
    seed_pairs(engine, 2)
    state = AppState.create(AppConfig(db_url=url, job_dir=tmp_path / "jobs"), engine=engine)
    bob = caller_for(state, "bob")
    sitting, screen = page.flow.open(state, None, bob)
    item, key = sitting.item, screen.key
    broken, seen = [True], []

    def fail_next_item(conn, cursor, statement, parameters, context, executemany):
        seen.append(statement)
        if broken[0] and page.next_statement in statement:
            raise OperationalError(statement, parameters, Exception("the database went away"))

    event.listen(engine, "before_cursor_execute", fail_next_item)
    try:
        sitting, screen = page.flow.submit(state, sitting, bob, page.choice, key, page.extras)
        assert screen.failed and "NOT recorded" in screen.status
        assert screen.key is None and screen.screen_html is None and not screen.clear_inputs
        assert sitting.item is item and sitting.failed_choice == page.choice
        if page.name == "cards":  # (a vote is written on the driver cursor, which has no events)
            assert any(s.startswith("INSERT INTO rating") for s in seen[:-1]), (
                "failed before the write"
            )
        assert page.rows(state) == []  # the judgement went with the failed next item
        with session_scope(engine) as s:  # and only the pair on screen is reserved
            held = s.exec(
                select(Assignment.comparison_id).where(Assignment.rater_id == bob.id)
            ).all()
        assert held == ([item.comparison_id] if page.name == "pairs" else [])

        broken[0] = False
        sitting, screen = page.flow.retry(state, sitting, bob, key, page.extras)
        assert "Saved" in screen.status and not screen.failed and sitting.item.key != key
        sitting, screen = page.flow.retry(
            state, sitting, bob, key, page.extras
        )  # nothing left to retry
        sitting, screen = page.flow.submit(state, sitting, bob, page.choice, key, page.extras)
        assert "Already saved" in screen.status
    finally:
        event.remove(engine, "before_cursor_execute", fail_next_item)
    [row] = page.rows(state)
    assert row.idempotency_key == key
    assert (row.rationale if page.name == "pairs" else row.comment) in ("my reason", "my comment")
    with session_scope(engine) as s:
        assert s.exec(select(func.count()).select_from(Assignment)).one() == (
            1 if page.name == "pairs" else 0
        )


def test_skip_moves_on_and_skipped_items_come_back_on_request(state, page):
    bob = caller_for(state, "bob")
    sitting, _ = page.flow.open(state, None, bob)
    seen = set()
    while sitting.item is not None:
        seen.add(sitting.item.item_id)
        sitting, screen = page.flow.skip(state, sitting, bob, sitting.item.key)
        assert "Skipped" in screen.status and screen.clear_inputs
    assert not screen.has_item and "pf-nothing" in screen.screen_html and sitting.skipped == seen
    sitting, screen = page.flow.skip(
        state, sitting, bob, "a-stale-key"
    )  # nothing on screen to skip
    assert screen.status == "" and not screen.has_item
    sitting, screen = page.flow.open(state, sitting, bob, forget_skipped=True)
    assert screen.has_item and sitting.item.item_id in seen and not sitting.skipped
    assert page.rows(state) == []


def test_refused_text_stores_nothing_and_keeps_the_item(state, page):
    bob = caller_for(state, "bob")
    sitting, _screen = page.flow.open(state, None, bob)
    events = PageEvents(state, page.flow, cleared=("",))
    outputs = events.run(
        lambda caller: page.flow.submit(
            state, sitting, caller, page.choice, text_input("k" * 101, "key"), page.extras
        ),
        SimpleNamespace(username="bob"),
        sitting,
    )
    held, _html, key, _progress, status, cleared = outputs
    assert held is sitting and "Not saved: the key" in status
    assert not isinstance(key, str) and not isinstance(cleared, str)  # kept as they are on screen
    assert page.rows(state) == []
