"""Bad input, rendered: prompts, responses, tags and a user name carrying HTML/JS payloads
(script tags, event-handler attributes, javascript:/data: links, template injection), imported
from a file and shown in headless Debian Chromium by a real `prefloop serve`. Every payload
is shown as text and stays inert: no element that can run script ends up in the page, no
payload sets window.__pwned, no dialog opens."""

from __future__ import annotations

from pathlib import Path

import pytest

from feedback_store.db import engine_for, session_scope
from feedback_store.importing import import_prompts
from tests.app_support import migrated_sqlite, seed_users, start_serve
from tests.reliability.figures import record
from tests.reliability.hostile import HTML_JS, jsonl_bytes
from tests.test_app_browser import CHROMIUM, browser, current_key, page, sign_in  # noqa: F401 - fixtures

pytestmark = pytest.mark.browser
EVIL_NAME = "<img src=x onerror=window.__pwned=1>eve"

# Elements inside the app's screen that could run script or load active content.
ACTIVE_ELEMENTS = """root => [...document.querySelectorAll(root + ' *')].filter(el =>
    ['SCRIPT', 'IFRAME', 'OBJECT', 'EMBED', 'SVG', 'svg', 'FORM', 'BASE', 'META'].includes(el.tagName)
    || [...el.attributes].some(a => a.name.startsWith('on') || a.name === 'srcdoc'
        || (['href', 'src', 'action', 'formaction', 'xlink:href'].includes(a.name)
            && /^\\s*(javascript|data|vbscript):/i.test(a.value))))
  .map(el => el.outerHTML.slice(0, 200))"""


@pytest.fixture
def served(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    url = migrated_sqlite(tmp_path / "prefloop.db")
    engine = engine_for(url)
    seed_users(engine, [EVIL_NAME])
    rows = [{"prompt": f"case {name}: {payload}", "chosen": f"{payload} (chosen)", "rejected": f"{payload} (rejected)",
             "tags": [payload], "split": "train"} for name, payload in HTML_JS.items()]
    (tmp_path / "evil.jsonl").write_bytes(jsonl_bytes(rows))
    with session_scope(engine) as session:
        import_prompts(tmp_path / "evil.jsonl", session=session)
    server = start_serve(url, tmp_path)
    yield server
    server.stop()


def test_html_and_js_payloads_stay_inert_in_the_browser(served, page):  # noqa: F811 - the imported fixture
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    sign_in(page, served.url, EVIL_NAME)
    assert EVIL_NAME in page.inner_text("#pf-who")  # the name, shown as text
    seen, active = set(), []
    for _ in range(len(HTML_JS)):
        screen = page.inner_text("#pf-screen")
        shown = [name for name in HTML_JS if f"case {name}:" in screen]
        assert len(shown) == 1, screen[:500]
        seen.update(shown)
        active += page.evaluate(ACTIVE_ELEMENTS, "#pf-screen")
        active += page.evaluate(ACTIVE_ELEMENTS, "#pf-who")
        key = current_key(page)
        page.click("#pf-vote-left")
        page.wait_for_function(
            "old => document.querySelector('#pf-key textarea, #pf-key input').value !== old", arg=key
        )
    page.wait_for_timeout(500)  # time for anything deferred (onerror of a broken image) to fire
    pwned = page.evaluate("typeof window.__pwned")
    assert (pwned, dialogs, active) == ("undefined", [], [])
    assert "Nothing left to rank" in page.inner_text("#pf-screen")
    assert seen == set(HTML_JS)
    # The detector itself finds an active element when there is one.
    page.evaluate("document.querySelector('#pf-screen').insertAdjacentHTML('beforeend', '<b onclick=\"x\">b</b>')")
    assert len(page.evaluate(ACTIVE_ELEMENTS, "#pf-screen")) == 1
    record("html-js-browser", inputs_tried=len(HTML_JS) + 1, inputs_rendered_inert=len(HTML_JS) + 1,
           script_ran=0, dialogs=len(dialogs), active_elements=len(active))
