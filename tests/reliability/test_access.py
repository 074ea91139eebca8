"""Access, tried as an attacker would: raw HTTP against a real `prefloop serve`, every route
Gradio registers and every event of the app, signed out, as an annotator and as another
annotator, with forged headers and file paths. Each of the review's findings has a test here
that fails on the code before its fix (commit 6cc8575)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlmodel import func, select

from feedback_store.db import engine_for, session_scope
from feedback_store.models import Prompt, Rater, Vote
from feedback_store.raters import create_user
from tests.app_support import (
    PASSWORD,
    REPO,
    AppClient,
    migrated_sqlite,
    page_event_body,
    seed_pairs,
    seed_users,
    start_serve,
)
from tests.reliability.figures import record

ANNOTATORS = ["bob", "eve", "mallory", "trent"]
SECRET = "sk-prefloop-test-secret-4f2a"


ATTACKS: dict[str, int] = {}  # kind -> attempts made and refused (each test asserts the refusal)


@pytest.fixture(scope="module", autouse=True)
def access_figures():
    yield
    if ATTACKS:
        total = sum(ATTACKS.values())
        record("access", attacks_tried=total, attacks_refused=total, **ATTACKS)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("access")
    url = migrated_sqlite(root / "prefloop.db")
    engine = engine_for(url)
    seed_users(engine, ANNOTATORS, ["alice"])
    seed_pairs(engine, 6)
    uploads = root / "gradio-uploads"  # this server's own upload cache, to look into afterwards
    patch = pytest.MonkeyPatch()
    patch.setenv("PREFLOOP_ACCESS_TEST_SECRET", SECRET)  # the server inherits it: must never leak
    patch.setenv("GRADIO_TEMP_DIR", str(uploads))
    served = start_serve(url, root, "--allowed-origin", "https://admin.example.org")
    patch.undo()
    yield {"url": served.url, "engine": engine, "db_path": root / "prefloop.db", "server": served,
           "uploads": uploads}
    served.stop()


def client(server, name: str | None = None, **kwargs) -> AppClient:
    app_client = AppClient(server["url"], **kwargs)
    if name is not None:
        assert app_client.login(name).status_code == 200
    return app_client


def file_data(path: str) -> dict:
    return {"path": path, "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}


# ---- 1. the file-read chain ------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/etc/passwd", "/proc/self/environ", "db"])
def test_an_annotator_cannot_pull_a_server_file_through_an_event_a_deep_link_or_file_route(server, target):
    path = str(server["db_path"]) if target == "db" else target
    eve = client(server, "eve")
    join = eve.http.post(
        "/gradio_api/queue/join",
        json=page_event_body(eve.endpoints()["admin_import"], [file_data(path)], eve.session_hash),
    )
    assert join.status_code == 400 and "not from an upload" in join.text
    # The other steps of the chain are closed on their own too.
    assert eve.http.get("/gradio_api/deep_link", params={"session_hash": eve.session_hash}).status_code == 404
    assert eve.http.get("/config", params={"deep_link": "abc"}).status_code == 400
    for route in (f"/gradio_api/file={path}", f"/gradio_api/file/{path}", f"/file={path}"):
        response = eve.http.get(route)
        assert response.status_code in (403, 404) and "root:" not in response.text
    # Whatever was tried, nothing from the file reached Gradio's cache.
    cached = [p for p in server["uploads"].rglob("*") if p.is_file() and b"root:x:0:0" in p.read_bytes()]
    assert cached == []
    eve.close()
    ATTACKS["file_read_attempts_refused"] = ATTACKS.get("file_read_attempts_refused", 0) + 5


def test_file_paths_hidden_anywhere_in_an_event_are_refused_even_for_an_admin(server):
    alice = client(server, "alice")
    endpoint = alice.endpoints()["admin_import"]
    for sneaky in (
        file_data("/tmp/gradio/../../etc/passwd"),
        {"path": "/etc/passwd"},  # no meta: Gradio may still treat it as a file
        [file_data("/etc/hostname")],
        file_data("relative/../../etc/passwd"),
    ):
        body = page_event_body(endpoint, [sneaky], alice.session_hash)
        assert alice.http.post("/gradio_api/queue/join", json=body).status_code == 400
    alice.close()


def test_an_admins_real_upload_still_imports_and_annotators_cannot_upload(server):
    jsonl = b'{"prompt": "Name a prime number greater than 1000."}\n{"prompt": "What is a monad?"}\n'
    eve = client(server, "eve")
    assert eve.http.post("/gradio_api/upload", files={"files": ("p.jsonl", jsonl)}).status_code == 403
    eve.close()
    alice = client(server, "alice")
    uploaded = alice.http.post("/gradio_api/upload", files={"files": ("p.jsonl", jsonl)})
    assert uploaded.status_code == 200, uploaded.text
    (path,) = uploaded.json()
    event, outputs = alice.call("admin_import", file_data(path))
    assert event == "complete", outputs
    with session_scope(server["engine"]) as session:
        texts = [json.dumps(p.messages) for p in session.exec(select(Prompt))]
    assert any("prime number greater than 1000" in text for text in texts)
    # An admin may download what the app wrote, not any file.
    assert alice.http.get("/gradio_api/file=/etc/passwd").status_code == 403
    alice.close()


# ---- 2. cross-site requests ------------------------------------------------------------------


def test_a_page_on_another_site_cannot_act_with_an_admins_cookie(server):
    alice = client(server, "alice")
    body = page_event_body(
        alice.endpoints()["admin_set_guidelines"], ["pwned by evil.example"], alice.session_hash
    )
    forged = {"Host": "label.example.com", "Origin": "https://evil.example"}
    refused = alice.http.post("/gradio_api/queue/join", json=body, headers=forged)
    assert refused.status_code == 403
    assert "access-control-allow-origin" not in refused.headers
    # A preflight from that page gets no CORS grant either.
    preflight = alice.http.options(
        "/gradio_api/queue/join",
        headers={**forged, "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers
    for headers in (
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "https://label.example.com.evil.example", "Host": "label.example.com"},
        {"Origin": "http://127.0.0.1.evil.example"},
    ):
        assert alice.http.post("/gradio_api/queue/join", json=body, headers=headers).status_code == 403
    # Reading data cross-site is refused too, and so is signing in (login CSRF).
    assert alice.http.get("/config", headers=forged).status_code == 403
    login = httpx.post(server["url"] + "/login", data={"username": "alice", "password": PASSWORD}, headers=forged)
    assert login.status_code == 403
    # The app's own origin, and one the operator allowed, go through.
    same = {"Host": "label.example.com", "Origin": "https://label.example.com", "Sec-Fetch-Site": "same-origin"}
    assert alice.http.get("/config", headers=same).status_code == 200
    assert alice.http.get("/config", headers={"Origin": "https://admin.example.org"}).status_code == 200
    alice.close()
    ATTACKS["cross_site_requests_refused"] = ATTACKS.get("cross_site_requests_refused", 0) + 8


def test_login_cookies_are_samesite_lax_never_none(server):
    response = httpx.post(server["url"] + "/login", data={"username": "bob", "password": PASSWORD})
    cookies = response.headers.get_list("set-cookie")
    assert len(cookies) == 2
    for cookie in cookies:
        assert re.search(r"samesite=lax", cookie, re.IGNORECASE), cookie
        assert not re.search(r"samesite=none", cookie, re.IGNORECASE), cookie
        assert "httponly" in cookie.lower()


# ---- 3. the login lockout --------------------------------------------------------------------


def test_x_forwarded_for_does_not_buy_fresh_guesses(server):
    codes = []
    for attempt in range(7):
        response = httpx.post(
            server["url"] + "/login",
            data={"username": "trent", "password": f"guess {attempt}"},
            headers={"X-Forwarded-For": f"203.0.113.{attempt}", "Forwarded": f"for=198.51.100.{attempt}"},
        )
        codes.append(response.status_code)
    assert codes[:5] == [400] * 5 and 429 in codes[5:], codes
    # The account is held back wherever the guesses come from, with a wait in seconds, not a wall.
    held = httpx.post(server["url"] + "/login", data={"username": "trent", "password": PASSWORD})
    assert held.status_code == 429 and int(held.headers["retry-after"]) <= 60
    ATTACKS["forged_forwarded_logins_refused"] = ATTACKS.get("forged_forwarded_logins_refused", 0) + codes.count(429) + 1


def test_the_limiter_backs_off_per_account_and_per_address():
    from labeling.app.auth import LoginLimiter

    now = [0.0]
    limiter = LoginLimiter(max_failures=3, max_failures_per_address=5, window_s=900, clock=lambda: now[0])
    for i in range(3):
        limiter.failed("victim", f"10.0.0.{i}")  # three addresses, one account
    assert limiter.retry_after("victim", "10.9.9.9") == pytest.approx(1.0)  # 2**0 after the 3rd
    limiter.failed("victim", "10.0.0.9")
    assert limiter.retry_after("victim", "10.9.9.9") == pytest.approx(2.0)  # doubles
    assert limiter.retry_after("someone-else", "10.9.9.9") == 0  # other accounts are unaffected
    for i in range(5):
        limiter.failed(f"user{i}", "192.0.2.1")  # a spray of names from one address
    assert 0 < limiter.retry_after("anyone", "192.0.2.1") <= 2.0  # slowed down, not walled off
    now[0] = 30.0
    assert limiter.retry_after("anyone", "192.0.2.1") == 0
    now[0] = 1000.0
    assert limiter.retry_after("victim", "10.9.9.9") == 0  # the window forgets


def test_forwarded_headers_are_believed_only_from_named_proxies():
    from labeling.app.server import proxy_settings

    assert proxy_settings(None) == {"proxy_headers": False}
    assert proxy_settings("10.0.0.5") == {"proxy_headers": True, "forwarded_allow_ips": "10.0.0.5"}


# ---- 5. sessions, content types and signed-out callers ----------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["Application/JSON", "application/json; charset=utf-8", "APPLICATION/JSON ;charset=UTF-8",
     "application/vnd.api+json", "text/plain", None],
)
def test_another_users_session_hash_is_refused_whatever_the_content_type(server, content_type):
    bob = client(server, "bob")
    bob.call("open_pairs")
    eve = client(server, "eve", session_hash=bob.session_hash)
    body = json.dumps(page_event_body(eve.endpoints()["skip_pair"], ["", ], bob.session_hash))
    headers = {"Content-Type": content_type} if content_type else {}
    response = eve.http.post("/gradio_api/queue/join", content=body, headers=headers)
    if content_type is None:
        response = eve.http.post("/gradio_api/queue/join", content=body.encode(),
                                 headers={"Content-Type": ""})
    assert response.status_code in (403, 422), (content_type, response.status_code, response.text)
    assert response.status_code != 200
    for path, method in (("/gradio_api/cancel", "POST"), ("/gradio_api/reset", "POST")):
        payload = json.dumps({"session_hash": bob.session_hash, "event_id": "x", "fn_index": 0})
        answer = eve.http.request(method, path, content=payload, headers=headers)
        assert answer.status_code in (403, 422), (path, answer.status_code)
    bob.close()
    eve.close()


def gradio_routes() -> list[tuple[str, str]]:
    """(method, path) of every route the installed Gradio registers, from its OpenAPI schema
    (not a list kept here), placeholders filled in."""
    import gradio.routes

    schema = gradio.routes.App.create_app(_blank_blocks()).openapi()
    routes = set()
    for path, operations in schema["paths"].items():
        filled = re.sub(r"\{[^}]+\}", "x", path).replace("file=x", "file=/etc/passwd")
        routes.update((method.upper(), filled) for method in operations)
    return sorted(routes)


def _blank_blocks():
    import gradio as gr

    with gr.Blocks() as blocks:
        gr.Markdown("x")
    return blocks


# Signed in, an annotator's own page reads its config and streams (queue data, heartbeats,
# cancel, reset): tested against other users' session hashes above.
OWN_PAGE = {("GET", "/config"), ("GET", "/config/"), ("GET", "/gradio_api/queue/data"),
            ("POST", "/gradio_api/queue/join"), ("GET", "/gradio_api/heartbeat/x"),
            ("POST", "/gradio_api/cancel"), ("POST", "/gradio_api/reset"), ("POST", "/gradio_api/reset/"),
            ("GET", "/gradio_api/startup-events")}
PUBLIC = {("GET", "/"), ("HEAD", "/"), ("POST", "/login"), ("POST", "/login/"), ("GET", "/logout"),
          ("GET", "/favicon.ico"), ("GET", "/robots.txt"), ("GET", "/theme.css"),
          ("GET", "/gradio_api/theme.css"), ("GET", "/assets/x"), ("GET", "/static/x"), ("GET", "/svelte/x")}


def test_every_gradio_route_refuses_signed_out_callers_and_unused_routes_do_not_exist(server):
    routes = gradio_routes()
    assert len(routes) > 40  # the test sees Gradio's whole surface, not a handful
    anonymous = httpx.Client(base_url=server["url"], timeout=10)
    eve = client(server, "eve")
    tried = 0
    for method, path in routes:
        if (method, path) in PUBLIC:
            continue
        for who, http in (("anonymous", anonymous), ("annotator", eve.http)):
            if who == "annotator" and (method, path) in OWN_PAGE:
                continue  # what her own page uses
            # Streamed, and only the head read: a stream let through would never end.
            with http.stream(method, path) as response:
                head = b"" if response.status_code == 200 else response.read()
            tried += 1
            allowed = (401, 404) if who == "anonymous" else (403, 404)
            assert response.status_code in allowed, (who, method, path, response.status_code, head[:200])
            assert b"root:x:0:0" not in head
    anonymous.close()
    eve.close()
    ATTACKS["route_attempts_refused"] = ATTACKS.get("route_attempts_refused", 0) + tried


def test_every_event_refuses_signed_out_callers_and_admin_events_refuse_annotators(server):
    alice = client(server, "alice")
    endpoints = alice.endpoints()
    assert len(endpoints) >= 20
    anonymous = AppClient(server["url"])
    anonymous._endpoints = endpoints  # it cannot read the config itself: use the admin's copy
    eve = client(server, "eve")
    tried = 0
    for api_name, (fn_index, is_state) in endpoints.items():
        args = [None] * sum(not s for s in is_state)
        event, payload = anonymous.call(api_name, *args)
        assert event == "http_error" and payload.startswith("401"), (api_name, event, payload)
        tried += 1
        if api_name.startswith("admin_") and api_name != "admin_open" or api_name == "dashboard":
            event, payload = eve.call(api_name, *args)
            assert event in ("error", "http_error"), (api_name, event, payload)
            tried += 1
    with session_scope(server["engine"]) as session:
        assert session.exec(select(Rater).where(Rater.name == "eve")).one().role.value == "annotator"
    for app_client in (alice, anonymous, eve):
        app_client.close()
    ATTACKS["event_attempts_refused"] = ATTACKS.get("event_attempts_refused", 0) + tried


def test_signed_out_callers_get_401_on_heartbeat_cancel_reset_and_streams(server):
    anonymous = httpx.Client(base_url=server["url"], timeout=10)
    for method, path in (
        ("GET", "/gradio_api/heartbeat/abc"),
        ("POST", "/gradio_api/cancel"),
        ("POST", "/gradio_api/reset"),
        ("GET", "/gradio_api/queue/data?session_hash=abc"),
        ("POST", "/gradio_api/upload"),
    ):
        assert anonymous.request(method, path, json={"session_hash": "abc"}).status_code == 401, path
    for path in ("/gradio_api/stream/abc/0/1/playlist.m3u8", "/gradio_api/stream/e/close"):
        assert anonymous.get(path).status_code in (401, 404)
    anonymous.close()


# ---- 6. sizes and stale sessions --------------------------------------------------------------


def test_a_huge_rationale_is_refused_with_a_clear_message_and_nothing_is_stored(server):
    bob = client(server, "bob")
    event, outputs = bob.call("open_pairs")
    key = outputs[2]
    with session_scope(server["engine"]) as session:
        before = session.exec(select(func.count()).select_from(Vote)).one()
    event, outputs = bob.call("vote_left", key, None, "x" * 100_000, "")
    assert event == "complete" and "Not saved: the rationale is 100,000 characters long" in outputs[4]
    assert outputs[2] in (key, {"__type__": "update"})  # no new pair: the same one stays on screen
    oversized = page_event_body(bob.endpoints()["vote_left"], [key, None, "x" * (1 << 20), ""], bob.session_hash)
    assert bob.http.post("/gradio_api/queue/join", json=oversized).status_code == 413
    with session_scope(server["engine"]) as session:
        assert session.exec(select(func.count()).select_from(Vote)).one() == before
    event, outputs = bob.call("vote_left", key, None, "short and sweet", "")  # the same pair still takes a vote
    assert event == "complete"
    bob.close()


def test_an_upload_over_the_limit_is_refused(server):
    alice = client(server, "alice")
    cookie = "; ".join(f"{k}={v}" for k, v in alice.http.cookies.items())
    host, port = server["url"].rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # Only the headers: a server that waited for 51 MiB before judging would time out here.
        sock.sendall(
            f"POST /gradio_api/upload HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n"
            f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {51 << 20}\r\n\r\n".encode()
        )
        status_line = sock.recv(200).split(b"\r\n", 1)[0]
    assert status_line.split()[1] == b"413", status_line
    alice.close()


def test_a_password_reset_ends_the_old_sessions(server):
    with session_scope(server["engine"]) as session:
        create_user("walter", PASSWORD, session=session)
    walter = client(server, "walter")
    assert walter.http.get("/config").status_code == 200
    reset = subprocess.run(
        [sys.executable, "-c", "import sys; from labeling.cli import main; sys.exit(main(sys.argv[1:]))",
         "users", "add", "walter", "--db", f"sqlite:///{server['db_path']}"],
        input="a brand new password\n", capture_output=True, text=True, cwd=REPO, check=False,
    )
    assert reset.returncode == 0, reset.stderr


    deadline = time.monotonic() + 15  # the server re-reads accounts every few seconds
    while walter.http.get("/config").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert walter.http.get("/config").status_code == 401
    assert walter.call("open_pairs")[0] == "http_error"
    fresh = client(server, None)
    assert fresh.login("walter", "a brand new password").status_code == 200
    assert fresh.http.get("/config").status_code == 200
    walter.close()
    fresh.close()


def test_api_keys_never_reach_the_log_or_the_database(server):
    log = server["server"].log()
    assert SECRET not in log
    for path in server["db_path"].parent.glob("prefloop.db*"):  # the database and its WAL
        assert SECRET.encode() not in path.read_bytes()


def test_uploads_are_deleted_once_older_than_the_limit(tmp_path, monkeypatch):
    from labeling.app.server import BackgroundServer
    from labeling.app.state import AppConfig, AppState

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    url = migrated_sqlite(tmp_path / "p.db")
    seed_users(engine_for(url), [], ["alice"])
    state = AppState.create(AppConfig(db_url=url, upload_max_age_s=2, job_dir=tmp_path / "jobs"))
    with BackgroundServer(state) as base:
        alice = AppClient(base)
        assert alice.login("alice").status_code == 200
        uploaded = alice.http.post("/gradio_api/upload", files={"files": ("p.jsonl", b'{"prompt": "x"}\n')})
        (path,) = uploaded.json()
        assert Path(path).exists()
        deadline = time.monotonic() + 20
        while Path(path).exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not Path(path).exists()
        alice.close()
