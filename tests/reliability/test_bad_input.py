"""Bad input: malformed JSONL, CSV and parquet files, files of 1 MB (and 100 MB under
PREFLOOP_RELIABILITY_FULL=1), unicode edge cases, SQL-injection strings and HTML/JS payloads,
through `prefloop prompts import`, `prefloop export` and the app's vote over HTTP. Each input
gets a clear one-line error with nothing stored, or comes back exactly as it went in: never a
traceback, a half-import or a 5xx. (Rendering in a browser: test_bad_input_browser.py.)"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, inspect
from sqlmodel import select

from feedback_store.db import engine_for, session_scope
from feedback_store.models import Comparison, Prompt, Rater, Response, Vote
from labeling.cli import main
from tests.app_support import PASSWORD, AppClient, page_event_body, seed_pairs, seed_users, start_serve
from tests.page_client import KEY, STATUS
from tests.reliability.figures import record
from tests.reliability.hostile import HTML_JS, MALFORMED, SQL_INJECTION, UNICODE, UNSTORABLE, jsonl_bytes, write
from tests.reliability.sizes import BIG_FILE_MB, TIMEOUT_S

TABLES = (Prompt, Response, Comparison, Vote, Rater)
STORABLE = {**{f"unicode/{k}": v for k, v in UNICODE.items()}, **{f"sql/{k}": v for k, v in SQL_INJECTION.items()},
            **{f"html/{k}": v for k, v in HTML_JS.items()}}


def backend(url: str) -> str:
    return "postgresql" if url.startswith("postgresql") else "sqlite"


def counts(url: str) -> dict:
    with session_scope(engine_for(url)) as session:
        return {m.__name__: session.exec(select(func.count()).select_from(m)).one() for m in TABLES}


def cli(capsys, *argv) -> tuple[int | str, str, str]:
    """Run the CLI in this process; a Python exception escaping it is a crash, reported as such."""
    try:
        code = main(list(argv))
    except BaseException as error:  # noqa: BLE001 - any escape is the failure being tested for
        code = f"crash: {type(error).__name__}: {str(error)[:200]}"
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def test_malformed_files_are_refused_cleanly(db_url, tmp_path, capsys):
    write(tmp_path, "good.jsonl", jsonl_bytes([{"prompt": "already here", "chosen": "a", "rejected": "b"}]))
    assert cli(capsys, "prompts", "import", str(tmp_path / "good.jsonl"), "--db", db_url)[0] == 0
    before = counts(db_url)
    failures = {}
    for name, (file_name, data) in MALFORMED.items():
        (tmp_path / name).mkdir()
        path = write(tmp_path / name, file_name, data)
        code, err, _ = cli(capsys, "prompts", "import", str(path), "--db", db_url)
        lines = err.strip().splitlines()
        clean = code == 2 and len(lines) == 1 and str(path) in lines[0] and "nothing imported" in lines[0]
        if not clean:
            failures[name] = (code, err[-400:])
        elif counts(db_url) != before:
            failures[name] = ("half-imported", counts(db_url))
    assert failures == {}, failures
    record(f"bad-files-{backend(db_url)}", inputs_tried=len(MALFORMED), inputs_rejected_cleanly=len(MALFORMED),
           formats="jsonl, csv, parquet, unknown extension")


def hostile_rows(prefix: str) -> list[dict]:
    return [{"prompt": f"{prefix} {name}: {text}", "tags": [text, name], "chosen": f"{text} (chosen)",
             "rejected": f"{text} (rejected)"} for name, text in STORABLE.items()]


def write_rows(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_bytes(jsonl_bytes(rows))
    elif path.suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps(v, ensure_ascii=False) if isinstance(v, list) else v
                              for k, v in row.items()} for row in rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_hostile_text_round_trips_through_import_and_export(db_url, tmp_path, capsys):
    """Every unicode, SQL and HTML string, in every format: stored verbatim (prompt, tags, both
    responses, the vote for the chosen one) and exported verbatim; the schema is intact."""
    expected = {}
    for fmt in ("jsonl", "csv", "parquet"):
        rows = hostile_rows(fmt)
        path = write_rows(tmp_path / f"hostile.{fmt}", rows)
        code, err, _ = cli(capsys, "prompts", "import", str(path), "--db", db_url, "--source", SQL_INJECTION["bobby"])
        assert code == 0, err
        expected.update({row["prompt"]: row for row in rows})
    assert {"vote", "prompt", "response", "rater"} <= set(inspect(engine_for(db_url)).get_table_names())

    with session_scope(engine_for(db_url)) as session:
        stored = {}
        for comparison, prompt in session.exec(select(Comparison, Prompt).join(Prompt)):
            vote = session.exec(select(Vote).where(Vote.comparison_id == comparison.id)).one()
            a, b = session.get(Response, comparison.response_a_id), session.get(Response, comparison.response_b_id)
            chosen, rejected = (a, b) if vote.choice.value == "a" else (b, a)
            stored[prompt.messages[0]["content"]] = (prompt.tags, prompt.source, chosen.text, rejected.text)
    wrong = {text: stored.get(text) for text, row in expected.items()
             if stored.get(text) != (row["tags"], SQL_INJECTION["bobby"], row["chosen"], row["rejected"])}
    assert wrong == {}, list(wrong.items())[:3]

    out = tmp_path / "dpo.jsonl"
    code, err, _ = cli(capsys, "export", "dpo", "--db", db_url, "--out", str(out))
    assert code == 0, err
    # JSON lines end at "\n" only: splitlines() would also cut at U+2028, which JSON leaves raw.
    exported = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
    assert exported, "the export is empty"  # only train-split prompts are exported
    for row in exported:
        source = expected[row["prompt"][-1]["content"]]
        assert (row["chosen"][-1]["content"], row["rejected"][-1]["content"]) == (source["chosen"], source["rejected"])
    record(f"hostile-text-{backend(db_url)}", inputs_tried=len(expected), inputs_round_tripped=len(expected),
           exported_rows_checked=len(exported), kinds="unicode (RTL, bidi, zero-width, combining, astral, "
           "controls, noncharacters), SQL injection, HTML/JS; jsonl, csv, parquet")


def big_rows(megabytes: int) -> list[dict]:
    """About `megabytes` of JSONL: half in 10 kB prompts (one in ten with a pair), half in one
    row whose prompt and chosen answer are a quarter of it each (2-byte characters, so bytes
    and characters differ)."""
    filler = "égalité ∑ 文字 " * 480  # ~10 kB of UTF-8
    rows = [{"prompt": f"{i} {filler}", **({"chosen": f"yes {i}", "rejected": f"no {i}"} if i % 10 == 0 else {})}
            for i in range(megabytes * 50)]
    huge = "ü" * (megabytes * 125_000)
    rows.append({"prompt": huge, "chosen": huge + "!", "rejected": "short"})
    return rows


@pytest.mark.timeout(TIMEOUT_S)
@pytest.mark.parametrize("megabytes", BIG_FILE_MB)
def test_big_files_import_whole_and_exact(sqlite_url, tmp_path, capsys, megabytes):
    rows = big_rows(megabytes)
    path = tmp_path / "big.jsonl"
    path.write_bytes(jsonl_bytes(rows))
    size_mb = path.stat().st_size / 1e6
    started = time.monotonic()
    code, err, _ = cli(capsys, "prompts", "import", str(path), "--db", sqlite_url)
    seconds = time.monotonic() - started
    assert code == 0, err
    with session_scope(engine_for(sqlite_url)) as session:
        texts = {p.messages[0]["content"] for p in session.exec(select(Prompt))}
        longest = session.exec(select(Response.text).order_by(func.length(Response.text).desc()).limit(1)).one()
    assert texts == {row["prompt"] for row in rows}
    assert longest == rows[-1]["chosen"]  # the biggest text, character for character
    assert counts(sqlite_url)["Vote"] == sum(1 for row in rows if "chosen" in row)
    code, err, out = cli(capsys, "prompts", "import", str(path), "--db", sqlite_url)  # again: adds nothing
    assert code == 0 and f"{len(rows)} duplicate rows skipped" in out, err
    record(f"big-file-{megabytes}mb", inputs_tried=1, inputs_round_tripped=1, file_mb=round(size_mb, 1),
           rows=len(rows), import_s=round(seconds, 1))


def call_ascii_json(client: AppClient, api_name: str, *data) -> tuple[str, object]:
    """AppClient.call, with the body as ASCII JSON: a lone surrogate travels as "\\ud800", as
    from a browser's JSON.stringify (httpx's own encoder refuses to send it at all)."""
    body = page_event_body(client.endpoints()[api_name], data, client.session_hash)
    joined = client.http.post("/gradio_api/queue/join", content=json.dumps(body),
                              headers={"content-type": "application/json"})
    if joined.status_code != 200:
        return "http_error", f"{joined.status_code} {joined.text[:200]}"
    event_id = joined.json()["event_id"]
    return client.results([event_id]).get(event_id, ("none", None))


def test_hostile_votes_over_http(db_url, tmp_path):
    """Rationales carrying every hostile string, through the app's vote event: stored exactly
    (after the app's trim), or, for text no store can hold, refused with a message naming the
    field and nothing written; SQL-injection user names cannot sign in. No 5xx either way."""
    engine = engine_for(db_url)
    seed_users(engine, ["bob"])
    seed_pairs(engine, len(STORABLE) + len(UNSTORABLE) + 2)
    server = start_serve(db_url, tmp_path)
    client = AppClient(server.url)
    failures, statuses = {}, []
    try:
        for name in [*SQL_INJECTION.values(), "bob' --", "bob\x00", "b\u200bob"]:
            response = client.http.post("/login", data={"username": name, "password": PASSWORD})
            statuses.append(response.status_code)
            if response.status_code == 200 or response.status_code >= 500:
                failures[f"login {name!r}"] = response.status_code
        assert client.login("bob").status_code == 200
        kind, outputs = client.call("open_pairs")
        assert kind == "complete", outputs
        key = outputs[KEY]
        for name, text in {**STORABLE, **{f"unstorable/{k}": v for k, v in UNSTORABLE.items()}}.items():
            kind, outputs = call_ascii_json(client, "vote_left", key, None, text, "")
            if kind != "complete":
                failures[name] = (kind, str(outputs)[:300])
                continue
            saved = "Saved" in outputs[STATUS]
            if name.startswith("unstorable/") == saved:
                failures[name] = outputs[STATUS][:300]
            key = outputs[KEY] if saved else key
    finally:
        client.close()
        server.stop()
    log = server.log()
    with session_scope(engine) as session:
        rationales = set(session.exec(select(Vote.rationale)).all())
    missing = [name for name, text in STORABLE.items() if text.strip() not in rationales]
    assert failures == {} and missing == [], (failures, missing)
    assert "Traceback" not in log, log[-3000:]
    tried = len(STORABLE) + len(UNSTORABLE) + len(statuses)
    record(f"hostile-votes-{backend(db_url)}", inputs_tried=tried, inputs_round_tripped=len(STORABLE),
           inputs_rejected_cleanly=len(UNSTORABLE) + len(statuses),
           login_statuses=sorted(set(statuses)))
