"""The app's handlers called directly, on a real SQLite store: votes, idempotency, edits,
skips, failures and retries, single-response ratings, identity and admin checks."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from fastapi import HTTPException
from sqlmodel import select

from feedback_store.db import engine_for, make_engine, session_scope
from feedback_store.models import (
    Assignment,
    Choice,
    Comparison,
    Rating,
    Response,
    Role,
    Vote,
)
from feedback_store.raters import get_rater
from labeling.app import annotate, single
from labeling.app.auth import (
    AccessDenied,
    LoginLimiter,
    admin_for,
    caller_for,
    make_auth,
)
from labeling.app.state import AppConfig, AppState
from tests.app_support import PASSWORD, seed_pairs, seed_users


@pytest.fixture
def state(db_url, tmp_path):
    """The app's state on a real store: an SQLite file, and the PostgreSQL server when there is one."""
    engine = engine_for(db_url)
    seed_users(engine, ["bob", "carol"], ["alice"])
    return AppState.create(AppConfig(db_url=db_url, job_dir=tmp_path / "jobs"), engine=engine)


def caller(state, name):
    return caller_for(state, name)


def votes(state):
    with session_scope(state.engine) as session:
        return list(session.exec(select(Vote).order_by(Vote.id)))


def test_vote_records_the_choice_in_canonical_order_and_moves_on(state):
    seed_pairs(state.engine, 3)
    bob = caller(state, "bob")
    desk, screen = annotate.open_desk(state, None, bob)
    assert screen.has_pair and screen.key == desk.slot.key
    assert "Question" in screen.screen_html and 'id="pf-left"' in screen.screen_html
    first = desk.slot
    desk, screen = annotate.submit(
        state, desk, bob, "left", first.key, "clearly better", " because "
    )

    [vote] = votes(state)
    assert vote.rater_id == bob.id and vote.comparison_id == first.comparison_id
    # "left" is whichever response was on the left: mapped to the canonical a/b.
    assert vote.choice == (Choice.a if first.left_id == first.a_id else Choice.b)
    assert vote.left_response_id == first.left_id
    assert vote.strength == 2 and vote.rationale == "because"
    assert vote.idempotency_key == first.key and vote.time_spent_ms >= 0
    assert "Saved" in screen.status and screen.clear_inputs
    assert desk.slot.comparison_id != first.comparison_id and screen.key != first.key
    assert screen.progress_md.startswith("**1** done today · **2** pairs left")


def test_double_submit_and_stale_keys_record_once(state):
    seed_pairs(state.engine, 3)
    bob = caller(state, "bob")
    desk, _ = annotate.open_desk(state, None, bob)
    key = desk.slot.key
    desk, _ = annotate.submit(state, desk, bob, "right", key)
    desk, screen = annotate.submit(
        state, desk, bob, "left", key
    )  # the second click of a double click
    assert "Already saved" in screen.status
    assert len(votes(state)) == 1 and votes(state)[0].idempotency_key == key

    desk, screen = annotate.submit(state, desk, bob, "left", "a-key-from-another-tab")
    assert "nothing was saved" in screen.status and len(votes(state)) == 1
    assert screen.key == desk.slot.key  # the current pair is shown again


def test_a_desk_of_another_rater_is_not_used(state):
    seed_pairs(state.engine, 3)
    bob, carol = caller(state, "bob"), caller(state, "carol")
    bobs_desk, _ = annotate.open_desk(state, None, bob)
    # Carol sends Bob's session state and Bob's key: she gets a desk of her own and nothing is written.
    desk, screen = annotate.submit(state, bobs_desk, carol, "left", bobs_desk.slot.key)
    assert desk.rater_id == carol.id and "nothing was saved" in screen.status
    assert votes(state) == []


def test_strength_only_qualifies_a_preference(state):
    seed_pairs(state.engine, 3)
    bob = caller(state, "bob")
    desk, _ = annotate.open_desk(state, None, bob)
    desk, _ = annotate.submit(state, desk, bob, "tie", desk.slot.key, "clearly better")
    assert votes(state)[0].choice == Choice.tie and votes(state)[0].strength is None
    desk, screen = annotate.submit(state, desk, bob, "left", desk.slot.key, "enormously better")
    assert "Not saved" in screen.status and len(votes(state)) == 1 and not screen.failed
    desk, screen = annotate.submit(state, desk, bob, "sideways", desk.slot.key)
    assert "Not saved" in screen.status and len(votes(state)) == 1


def test_an_edit_becomes_a_response_and_a_pair_it_wins(state):
    seed_pairs(state.engine, 2)
    bob = caller(state, "bob")
    desk, _ = annotate.open_desk(state, None, bob)
    slot = desk.slot
    desk, screen = annotate.submit(
        state, desk, bob, "right", slot.key, None, "", "A much better answer."
    )
    assert "Saved" in screen.status
    with session_scope(state.engine) as session:
        edited = session.exec(select(Response).where(Response.edited_from_id.is_not(None))).one()
        assert edited.edited_from_id == slot.right_id and edited.author_rater_id == bob.id
        assert edited.text == "A much better answer." and edited.prompt_id == slot.prompt_id
        pair = session.exec(select(Comparison).where(Comparison.source == "human-edit")).one()
        assert {pair.response_a_id, pair.response_b_id} == {edited.id, slot.right_id}
        edit_vote = session.exec(select(Vote).where(Vote.comparison_id == pair.id)).one()
        winner = pair.response_a_id if edit_vote.choice == Choice.a else pair.response_b_id
        assert winner == edited.id and edit_vote.rater_id == bob.id


def test_an_edit_without_a_source_saves_nothing(state):
    seed_pairs(state.engine, 2)
    bob = caller(state, "bob")
    desk, _ = annotate.open_desk(state, None, bob)
    desk, screen = annotate.submit(
        state, desk, bob, "both_bad", desk.slot.key, None, "", "Better text"
    )
    assert (
        "Not saved" in screen.status and votes(state) == []
    )  # the vote is not kept without its edit
    # Starting the edit from one side gives it a source; "both bad" plus an edit is then fine.
    desk, text = annotate.start_edit(state, desk, bob, "left", desk.slot.key)
    assert text.startswith("Answer")
    desk, screen = annotate.submit(
        state, desk, bob, "both_bad", desk.slot.key, None, "", text + " Fixed."
    )
    assert "Saved" in screen.status and len(votes(state)) == 2


def test_skip_releases_the_pair_and_the_queue_never_goes_blank(state):
    seed_pairs(state.engine, 2)
    bob = caller(state, "bob")
    desk, _ = annotate.open_desk(state, None, bob)
    first = desk.slot.comparison_id
    desk, screen = annotate.skip(state, desk, bob, desk.slot.key)
    assert desk.slot.comparison_id != first and "Skipped" in screen.status
    with session_scope(state.engine) as session:
        held = session.exec(
            select(Assignment.comparison_id).where(Assignment.rater_id == bob.id)
        ).all()
    assert held == [desk.slot.comparison_id]
    desk, screen = annotate.skip(state, desk, bob, desk.slot.key)
    assert (
        not screen.has_pair
        and "skipped 2 pair" in screen.screen_html
        and "pf-nothing" in screen.screen_html
    )
    desk, screen = annotate.show_skipped_again(state, desk, bob)
    assert screen.has_pair


def test_empty_store_shows_a_message_not_a_blank_page(state):
    desk, screen = annotate.open_desk(state, None, caller(state, "bob"))
    assert (
        not screen.has_pair and "Nothing left to rank" in screen.screen_html and screen.progress_md
    )


def test_a_failed_save_says_so_and_retry_records_once(sqlite_url, tmp_path):
    engine = make_engine(sqlite_url, busy_timeout_ms=200)
    seed_users(engine, ["bob"])
    seed_pairs(engine, 2)
    state = AppState.create(AppConfig(db_url=sqlite_url, job_dir=tmp_path), engine=engine)
    bob = caller(state, "bob")
    desk, _ = annotate.open_desk(state, None, bob)
    key = desk.slot.key

    blocker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database past our busy timeout
    try:
        desk, screen = annotate.submit(state, desk, bob, "left", key, None, "my reason")
        assert screen.failed and "NOT recorded" in screen.status
        assert (
            screen.key is None and screen.screen_html is None
        )  # the pair and its key stay on screen
        assert not screen.clear_inputs  # the rationale stays for the retry
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert votes(state) == []
    desk, screen = annotate.retry(state, desk, bob, key, None, "my reason")
    assert "Saved" in screen.status and not screen.failed
    desk, screen = annotate.retry(state, desk, bob, key, None, "my reason")
    [vote] = votes(state)
    assert vote.idempotency_key == key and vote.rationale == "my reason"
    engine.dispose()


def test_single_response_ratings(state):
    seed_pairs(state.engine, 1)
    bob = caller(state, "bob")
    tray, screen = single.open_tray(state, None, bob)
    first = tray.card
    tray, screen = single.rate(state, tray, bob, "down", first.key, " too long ")
    tray, again = single.rate(state, tray, bob, "up", first.key)  # double click: same key
    assert "Already saved" in again.status
    tray, screen = single.skip(state, tray, bob, tray.card.key)
    assert not screen.has_card  # two responses: one rated, one skipped
    tray, screen = single.open_tray(state, tray, bob, forget_skipped=True)
    assert screen.has_card and tray.card.response_id != first.response_id
    with session_scope(state.engine) as session:
        [rating] = session.exec(select(Rating)).all()
    assert (rating.response_id, rating.rater_id, rating.thumbs_up, rating.comment) == (
        first.response_id,
        bob.id,
        False,
        "too long",
    )


def test_identity_comes_from_the_server_side_account(state, tmp_path):
    with pytest.raises(AccessDenied):
        caller_for(state, None)
    with pytest.raises(AccessDenied):
        caller_for(state, "mallory")
    with pytest.raises(AccessDenied):
        admin_for(state, "bob")
    assert admin_for(state, "alice").role == Role.admin
    with session_scope(state.engine) as session:
        get_rater("carol", session=session).active = False
    with pytest.raises(AccessDenied):
        caller_for(state, "carol")
    local = AppState.create(
        AppConfig(db_url=state.config.db_url, single_user="me", job_dir=tmp_path), engine=state.engine
    )
    assert caller_for(local, None).name == "me" and caller_for(local, "bob").name == "me"
    assert caller_for(local, None).is_admin


def test_login_limiter_holds_an_account_back_wherever_guesses_come_from():
    now = [1000.0]
    limiter = LoginLimiter(
        max_failures=3, max_failures_per_address=5, window_s=60, clock=lambda: now[0]
    )
    for _ in range(3):
        assert limiter.retry_after("bob", "1.2.3.4") == 0
        limiter.failed("bob", "1.2.3.4")
    assert limiter.retry_after("Bob ", "1.2.3.4") == pytest.approx(1.0)
    assert limiter.retry_after("bob", "5.6.7.8") == pytest.approx(1.0)  # a new address buys nothing
    limiter.failed("carol", "1.2.3.4")
    limiter.failed("dave", "1.2.3.4")
    assert limiter.retry_after("erin", "1.2.3.4") > 0  # a spray of names from one address
    now[0] += 61
    assert limiter.retry_after("bob", "1.2.3.4") == 0
    limiter.failed("bob", "1.2.3.4")
    limiter.succeeded("bob", "1.2.3.4")
    assert limiter.retry_after("bob", "1.2.3.4") == 0


def test_auth_callable_checks_passwords_and_locks_out(state):
    auth = make_auth(state)
    assert asyncio.run(auth("bob", PASSWORD)) is True
    for _ in range(state.config.max_failed_logins):
        assert asyncio.run(auth("bob", "wrong password")) is False
    with pytest.raises(HTTPException) as locked:
        asyncio.run(auth("bob", PASSWORD))  # even the right password waits out the lockout
    assert locked.value.status_code == 429
    assert asyncio.run(auth("carol", PASSWORD)) is True


def test_account_changes_apply_once_the_identity_cache_expires(sqlite_url, tmp_path):
    engine = engine_for(sqlite_url)
    seed_users(engine, ["bob"])
    state = AppState.create(
        AppConfig(db_url=sqlite_url, job_dir=tmp_path, identity_cache_s=0.2), engine=engine
    )
    assert caller_for(state, "bob").role == Role.annotator
    with session_scope(engine) as session:
        get_rater("bob", session=session).role = Role.admin
    assert caller_for(state, "bob").role == Role.annotator  # still the cached account
    import time

    time.sleep(0.25)
    assert caller_for(state, "bob").is_admin
    with session_scope(engine) as session:
        get_rater("bob", session=session).active = False
    time.sleep(0.25)
    with pytest.raises(AccessDenied):
        caller_for(state, "bob")


@pytest.mark.parametrize("field", ["rationale", "comment", "edit", "key"])
def test_client_text_the_store_cannot_hold_is_refused_with_the_fields_name(field):
    from labeling.app.ui import TEXT_LIMITS, TextRefused, text_input

    assert text_input("fine, thanks \u05e9\u05dc\u05d5\u05dd \u200b", field) == "fine, thanks \u05e9\u05dc\u05d5\u05dd \u200b"
    assert text_input(None, field) is None and text_input(42, field) is None
    for bad, why in (("edited \ud800 answer", "surrogate"), ("a\x00b", "NUL"), ("x" * (TEXT_LIMITS[field] + 1), "limit")):
        with pytest.raises(TextRefused, match=why) as refused:
            text_input(bad, field)
        assert field in str(refused.value)
