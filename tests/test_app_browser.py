"""End to end: a real `prefloop serve` subprocess, driven by headless Debian Chromium through
Playwright, and by raw HTTP calls to the Gradio API that bypass the page."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlmodel import select

from feedback_store.app_settings import set_target_overlap
from feedback_store.db import engine_for, session_scope
from feedback_store.models import Comparison, Rater, Role, Vote
from feedback_store.queue import target_overlap
from tests.app_support import (
    PASSWORD,
    REPO,
    AppClient,
    migrated_sqlite,
    seed_pairs,
    seed_users,
    start_serve,
)

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
ANNOTATORS = ["bob", "carol", "dave", "eve", "frank", "gina", "hank"]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    root = tmp_path_factory.mktemp("app")
    url = migrated_sqlite(root / "prefloop.db")
    engine = engine_for(url)
    seed_users(engine, ANNOTATORS, ["alice"])
    ids = seed_pairs(engine, 8, xss_first=True)
    with session_scope(engine) as session:
        set_target_overlap(len(ANNOTATORS) + 1, session=session)  # every annotator sees every pair
        session.get(Comparison, ids[0]).priority = 10  # the XSS pair comes first for everyone
    server = start_serve(url, root)
    yield {"url": server.url, "engine": engine, "xss_comparison": ids[0], "server": server}
    server.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(20_000)
    yield page
    context.close()


def sign_in(page, url: str, name: str) -> None:
    page.goto(url)
    page.fill("input[type=text]", name)
    page.fill("input[type=password]", PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_selector("#pf-who b")
    wait_for_key(page, "")


def current_key(page) -> str:
    return page.evaluate("document.querySelector('#pf-key textarea, #pf-key input').value")


def wait_for_key(page, old: str) -> str:
    page.wait_for_function(
        "old => { const box = document.querySelector('#pf-key textarea, #pf-key input');"
        " return box && box.value && box.value !== old; }",
        arg=old,
    )
    return current_key(page)


def votes_of(app, name: str) -> list[Vote]:
    with session_scope(app["engine"]) as session:
        rater = session.exec(select(Rater).where(Rater.name == name)).one()
        return list(session.exec(select(Vote).where(Vote.rater_id == rater.id).order_by(Vote.id)))


def picked(vote: Vote, app) -> int:
    with session_scope(app["engine"]) as session:
        comparison = session.get(Comparison, vote.comparison_id)
    return comparison.response_a_id if vote.choice.value == "a" else comparison.response_b_id


def test_sign_in_and_vote_with_mouse_and_keyboard(app, page, tmp_path):
    sign_in(page, app["url"], "bob")
    assert page.inner_text("#pf-who").startswith("Signed in as bob")
    assert (
        page.is_hidden("#pf-tab-admin-button") or not page.get_by_role("tab", name="Admin").count()
    )
    key = current_key(page)
    shot = tmp_path / "annotate.png"
    page.screenshot(path=str(shot), full_page=True)
    (REPO / "test-output").mkdir(exist_ok=True)
    shutil.copy(shot, REPO / "test-output" / "annotate.png")

    page.click("#pf-vote-left")  # the mouse
    key = wait_for_key(page, key)
    page.click("body")
    page.keyboard.press("2")  # the keyboard: B is better
    key = wait_for_key(page, key)
    page.keyboard.press("3")  # tie
    wait_for_key(page, key)
    assert "Saved" in page.inner_text("#pf-status")

    first, second, third = votes_of(app, "bob")
    assert picked(first, app) == first.left_response_id  # "A" is whatever was shown on the left
    assert picked(second, app) != second.left_response_id
    assert third.choice.value == "tie"
    assert len({first.comparison_id, second.comparison_id, third.comparison_id}) == 3
    assert "3" in page.inner_text("#pf-progress")


def test_html_in_a_response_is_shown_as_text_and_never_runs(app, page):
    sign_in(page, app["url"], "carol")
    sides = page.inner_text("#pf-left") + page.inner_text("#pf-right")
    assert "<script>window.__xss=1</script>" in sides and 'onerror="window.__xss=1"' in sides
    for side in ("#pf-left", "#pf-right"):
        assert page.locator(f"{side} script, {side} img, {side} iframe").count() == 0
        assert page.locator(f"{side} a[href^='javascript']").count() == 0
    page.wait_for_timeout(500)
    assert page.evaluate("typeof window.__xss") == "undefined"
    page.click("#pf-vote-right")
    wait_for_key(page, "")
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert votes_of(app, "carol")[0].comparison_id == app["xss_comparison"]


def test_double_click_and_key_repeat_record_once(app, page):
    sign_in(page, app["url"], "dave")
    key = current_key(page)
    page.dblclick("#pf-vote-left")
    key = wait_for_key(page, key)
    page.wait_for_timeout(800)
    assert len(votes_of(app, "dave")) == 1
    # Two clicks fired in the same tick, before the page can react to the first.
    page.evaluate(
        "() => { const b = document.querySelector('#pf-vote-right'); b.click(); b.click(); }"
    )
    wait_for_key(page, key)
    page.wait_for_timeout(800)
    assert len(votes_of(app, "dave")) == 2


def test_an_empty_queue_shows_a_message_and_a_way_back(app, page, tmp_path):
    sign_in(page, app["url"], "hank")
    assert (
        page.is_hidden("#pf-again")
        and page.is_hidden("#pf-retry")
        and page.is_visible("#pf-vote-left")
    )
    key = current_key(page)
    for _ in range(8):  # skip every pair, with the keyboard
        page.keyboard.press("s")
        page.wait_for_function(
            "old => document.querySelector('#pf-key textarea, #pf-key input').value !== old",
            arg=key,
        )
        key = current_key(page)
    assert key == ""
    assert "Nothing left to rank" in page.inner_text("#pf-screen")
    assert (
        page.is_visible("#pf-again")
        and page.is_hidden("#pf-vote-left")
        and page.is_hidden("#pf-skip")
    )
    page.screenshot(path=str(tmp_path / "empty.png"), full_page=True)
    shutil.copy(tmp_path / "empty.png", REPO / "test-output" / "empty.png")
    page.click("#pf-again")
    wait_for_key(page, "")
    assert page.is_visible("#pf-vote-left") and page.is_hidden("#pf-again")
    # A failed save puts Retry next to its message (the stylesheet keys on the status markup).
    page.evaluate(
        "document.querySelector('#pf-status').insertAdjacentHTML('beforeend',"
        " '<div class=\"pf-status pf-error pf-failed\">Save failed</div>')"
    )
    assert page.is_visible("#pf-retry")
    assert votes_of(app, "hank") == []


def test_single_response_mode_with_keyboard(app, page):
    sign_in(page, app["url"], "gina")
    page.get_by_role("tab", name="Rate single responses").click()
    page.wait_for_function("document.querySelector('#pf1-key textarea, #pf1-key input')?.value")
    page.screenshot(path=str(REPO / "test-output" / "single.png"), full_page=True)
    page.fill("#pf1-comment textarea", "clear and short")
    page.click("#pf1-response")
    page.keyboard.press("u")
    page.wait_for_function("document.querySelector('#pf1-status')?.innerText.includes('Saved')")
    from feedback_store.models import Rating

    with session_scope(app["engine"]) as session:
        gina = session.exec(select(Rater).where(Rater.name == "gina")).one()
        [rating] = session.exec(select(Rating).where(Rating.rater_id == gina.id)).all()
    assert rating.thumbs_up and rating.comment == "clear and short"


def test_http_api_cannot_act_as_someone_else_or_as_an_admin(app, tmp_path):
    anonymous = AppClient(app["url"])
    event, payload = anonymous.call("open_pairs")
    assert event == "http_error" and payload.startswith("401")

    bob = AppClient(app["url"])
    assert bob.login("bob").status_code == 200
    event, outputs = bob.call("open_pairs")
    bobs_key = outputs[2]
    before = len(votes_of(app, "bob"))
    # Bob's session hash is his: signed in as eve, it neither takes events nor shows his stream.
    eve_on_bobs = AppClient(app["url"], session_hash=bob.session_hash)
    assert eve_on_bobs.login("eve").status_code == 200
    event, payload = eve_on_bobs.call("vote_left", bobs_key, None, "", "")
    assert event == "http_error" and payload.startswith("403")
    for path in ("/gradio_api/queue/data", f"/gradio_api/heartbeat/{bob.session_hash}"):
        # (a short timeout: a stream let through would never end)
        assert eve_on_bobs.http.get(path, params={"session_hash": bob.session_hash}, timeout=10).status_code == 403
    # An odd cookie beside her login (one a strict cookie parser gives up on) changes nothing.
    odd = 'a b=1; foo="bar; ' + "; ".join(f"{k}={v}" for k, v in eve_on_bobs.http.cookies.items())
    refused = eve_on_bobs.http.get("/gradio_api/queue/data", params={"session_hash": bob.session_hash},
                                   headers={"Cookie": odd}, timeout=10)
    assert refused.status_code == 403
    eve_on_bobs.close()
    eve = AppClient(app["url"])
    assert eve.login("eve").status_code == 200
    event, outputs = eve.call("vote_left", bobs_key, None, "", "")  # bob's key, from her session
    assert event == "complete" and "nothing was saved" in outputs[4]
    assert len(votes_of(app, "bob")) == before and votes_of(app, "eve") == []
    # Her own pair, her own vote: recorded under her name whatever she sends.
    event, outputs = eve.call("open_pairs")
    event, outputs = eve.call("vote_left", outputs[2], None, "", "")
    assert (
        event == "complete"
        and len(votes_of(app, "eve")) == 1
        and len(votes_of(app, "bob")) == before
    )

    refused = {
        "admin_save_user": ("eve", "new password!", "admin"),
        "admin_set_overlap": (1,),
        "admin_set_guidelines": ("pwned",),
        "admin_start_job": ("train", "--help"),
        "admin_export": ("dpo",),
        "admin_deactivate_user": ("alice",),
        "admin_job_tick": (None,),
        "dashboard": (),
    }
    for api_name, args in refused.items():
        event, payload = eve.call(api_name, *args)
        assert event == "error", api_name
    event, outputs = eve.call("admin_open")
    assert event == "complete" and outputs[0]["data"] == []  # no user list for an annotator
    with session_scope(app["engine"]) as session:
        eve_row = session.exec(select(Rater).where(Rater.name == "eve")).one()
        assert eve_row.role == Role.annotator
        assert session.exec(select(Rater).where(Rater.name == "alice")).one().active
        assert target_overlap(session=session) == len(ANNOTATORS) + 1
    # The direct (queue-skipping) route is closed too.
    assert eve.http.post("/gradio_api/run/admin_set_overlap", json={"data": [1]}).status_code == 404
    for client in (anonymous, bob, eve):
        client.close()


def test_failed_logins_are_rate_limited(app):
    client = AppClient(app["url"])
    codes = [client.login("frank", "wrong password").status_code for _ in range(5)]
    assert codes == [400] * 5
    locked = client.login("frank", PASSWORD)
    assert locked.status_code == 429 and "Too many failed logins" in locked.text
    other = AppClient(app["url"])
    assert other.login("alice").status_code == 200  # only frank is locked out
    client.close()
    other.close()


def test_admin_sees_dashboard_and_runs_a_job(app, page, tmp_path):
    sign_in(page, app["url"], "alice")
    page.get_by_role("tab", name="Admin").click()
    page.fill("#pf-admin-args textarea, #pf-admin-args input", "--no-such-option")
    page.click("#pf-admin-start")
    page.wait_for_function("document.body.innerText.includes('unrecognized arguments: --no-such-option')",
                           timeout=30_000)
    page.fill("#pf-admin-args textarea, #pf-admin-args input", "--backend openai")  # no --endpoint
    page.click("#pf-admin-start")
    page.wait_for_function("document.body.innerText.includes('name an endpoint with --endpoint NAME')",
                           timeout=30_000)
    page.fill("#pf-admin-args textarea, #pf-admin-args input", "--policy default,default")
    page.click("#pf-admin-start")
    page.wait_for_function("document.body.innerText.includes('failed (exit 2)')", timeout=60_000)
    assert "prefloop" in page.inner_text("body")
    page.get_by_role("tab", name="Dashboard").click()
    page.wait_for_selector("#pf-dash-leaderboard img[src^='data:image']", timeout=60_000)
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    shutil.copy(tmp_path / "dashboard.png", REPO / "test-output" / "dashboard.png")
