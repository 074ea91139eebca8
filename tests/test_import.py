"""Prompt and preference import: every format, idempotence, all-or-nothing on bad files,
unicode and hostile strings stored verbatim. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, inspect
from sqlmodel import Session, select

from feedback_store.catalog import IMPORTED_POLICY
from feedback_store.db import engine_for, session_scope
from feedback_store.importing import ImportFileError, import_prompts
from feedback_store.models import Choice, Comparison, PolicyVersion, Prompt, Rater, RaterKind, Response, Vote

TABLES = (Prompt, Response, Comparison, Vote, Rater, PolicyVersion)

SQL_INJECTION = "'); DROP TABLE vote; --"
UNICODE_TEXTS = [
    "مرحبا، كيف حالك؟",  # Arabic, right to left
    "שלום עולם \u200f(RTL mark) \u202eoverride\u202c",  # Hebrew with bidi control characters
    "family \U0001F469\u200d\U0001F469\u200d\U0001F467 and flag \U0001F3F3\ufe0f\u200d\U0001F308",  # ZWJ emoji
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom",
    "cafe\u0301 vs caf\u00e9",  # combining acute accent vs precomposed
    "Z\u0338\u0322\u031ba\u0334\u031f\u0350l",  # stacked combining marks
    "\U0001D544\U0001D552\U0001D565\U0001D559 and 中文 and \U0001F600",  # astral-plane characters
]


def chat(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def write_jsonl(path: Path, rows: list) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, list) else v
                             for k, v in row.items()})
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


WRITERS = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}


def counts(engine) -> dict[str, int]:
    with Session(engine) as session:
        return {model.__name__: session.exec(select(func.count()).select_from(model)).one() for model in TABLES}


def run_import(engine, path, **kwargs):
    with session_scope(engine) as session:
        return import_prompts(path, session=session, **kwargs)


# Rows every format can carry (parquet needs one schema: every row has every column).
MIXED_ROWS = [
    {"prompt": "What is the capital of France?", "messages": None, "tags": ["geo", "easy"],
     "chosen": None, "rejected": None},
    {"prompt": None, "messages": chat(("system", "Be brief."), ("user", "Name a prime.")), "tags": None,
     "chosen": None, "rejected": None},
    {"prompt": "2+2?", "messages": None, "tags": None,
     "chosen": chat(("assistant", "4")), "rejected": chat(("assistant", "5"))},
    {"prompt": "Sky colour?", "messages": None, "tags": ["trl"],
     "chosen": chat(("assistant", "Blue.")), "rejected": chat(("assistant", "Green."))},
]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_every_format_imports_and_reimport_adds_nothing(fmt, engine, tmp_path):
    path = WRITERS[fmt](tmp_path / f"prompts.{fmt}", MIXED_ROWS)

    report = run_import(engine, path)
    assert (report.rows, report.prompts_created, report.responses_created, report.comparisons_created,
            report.votes_created, report.skipped_duplicates) == (4, 4, 4, 2, 2, 0)
    before = counts(engine)
    assert before["Prompt"] == 4 and before["Vote"] == 2 and before["Comparison"] == 2

    with Session(engine) as session:
        prompts = session.exec(select(Prompt).order_by(Prompt.id)).all()
        assert [p.messages for p in prompts] == [
            chat(("user", "What is the capital of France?")),
            chat(("system", "Be brief."), ("user", "Name a prime.")),
            chat(("user", "2+2?")),
            chat(("user", "Sky colour?")),
        ]
        assert prompts[0].tags == ["geo", "easy"] and prompts[1].tags == [] and prompts[3].tags == ["trl"]
        assert {p.source for p in prompts} == {f"prompts.{fmt}"}
        assert_votes_prefer(session, {"2+2?": ("4", "5"), "Sky colour?": ("Blue.", "Green.")})

    again = run_import(engine, path)
    assert (again.prompts_created, again.responses_created, again.comparisons_created, again.votes_created,
            again.skipped_duplicates) == (0, 0, 0, 0, 4)
    assert counts(engine) == before


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_text_pairs_in_every_format(fmt, engine, tmp_path):
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "score_chosen": 9, "score_rejected": 2},
            {"prompt": "3+3?", "chosen": "five", "rejected": "6", "score_chosen": 1, "score_rejected": 1}]
    report = run_import(engine, WRITERS[fmt](tmp_path / f"pairs.{fmt}", rows))
    assert (report.prompts_created, report.comparisons_created, report.votes_created) == (2, 2, 2)
    with Session(engine) as session:
        assert_votes_prefer(session, {"2+2?": ("4", "5"), "3+3?": ("five", "6")})
        assert sorted(session.exec(select(Vote.strength)).all(), key=str) == [2, None]


def assert_votes_prefer(session, expected: dict[str, tuple[str, str]]) -> None:
    """Each prompt's imported vote picks the chosen text, whatever the canonical a/b order."""
    rater = session.exec(select(Rater).where(Rater.kind == RaterKind.imported)).one()
    policy = session.exec(select(PolicyVersion).where(PolicyVersion.name == IMPORTED_POLICY)).one()
    found = {}
    for vote in session.exec(select(Vote).where(Vote.rater_id == rater.id)):
        comparison = session.get(Comparison, vote.comparison_id)
        a, b = session.get(Response, comparison.response_a_id), session.get(Response, comparison.response_b_id)
        assert a.policy_id == b.policy_id == policy.id
        chosen, rejected = (a, b) if vote.choice == Choice.a else (b, a)
        prompt = session.get(Prompt, comparison.prompt_id)
        found[prompt.messages[-1]["content"]] = (chosen.text, rejected.text)
    assert found == expected


def test_preference_variants(engine, tmp_path):
    system_convo = chat(("system", "You are terse."), ("user", "Best editor?"))
    rows = [
        # TRL explicit prompt, conversational.
        {"prompt": chat(("user", "p1")), "chosen": chat(("assistant", "good 1")),
         "rejected": chat(("assistant", "bad 1"))},
        # Implicit prompt: the whole conversation in chosen/rejected, multi-turn shared prefix.
        {"chosen": chat(("user", "p2"), ("assistant", "hm?"), ("user", "p2 again"), ("assistant", "good 2")),
         "rejected": chat(("user", "p2"), ("assistant", "hm?"), ("user", "p2 again"), ("assistant", "bad 2"))},
        # UltraFeedback-binarized style: string prompt, full conversations, `messages` = chosen, scores.
        {"prompt": "p3", "chosen": chat(("user", "p3"), ("assistant", "good 3")),
         "rejected": chat(("user", "p3"), ("assistant", "bad 3")),
         "messages": chat(("user", "p3"), ("assistant", "good 3")), "score_chosen": 8.0, "score_rejected": 7.5},
        # A string prompt that lacks the conversation's system turn: the shared prefix wins (as in TRL).
        {"prompt": "Best editor?", "chosen": system_convo + chat(("assistant", "vim")),
         "rejected": system_convo + chat(("assistant", "notepad")), "margin": 3},
        # `messages` as the prompt, string completions, explicit strength.
        {"messages": chat(("user", "p5")), "chosen": "good 5", "rejected": "bad 5", "strength": 2},
    ]
    report = run_import(engine, write_jsonl(tmp_path / "prefs.jsonl", rows))
    assert (report.prompts_created, report.comparisons_created, report.votes_created) == (5, 5, 5)
    with Session(engine) as session:
        assert_votes_prefer(session, {
            "p1": ("good 1", "bad 1"), "p2 again": ("good 2", "bad 2"), "p3": ("good 3", "bad 3"),
            "Best editor?": ("vim", "notepad"), "p5": ("good 5", "bad 5"),
        })
        prompts = {p.messages[-1]["content"]: p for p in session.exec(select(Prompt))}
        assert prompts["p2 again"].messages == chat(("user", "p2"), ("assistant", "hm?"), ("user", "p2 again"))
        assert prompts["Best editor?"].messages == system_convo
        strengths = {
            session.get(Prompt, session.get(Comparison, v.comparison_id).prompt_id).messages[-1]["content"]:
            v.strength for v in session.exec(select(Vote))
        }
    # score gap 0.5 < 1 -> slightly (1); margin 3 -> clearly (2); explicit 2; none given -> None.
    assert strengths == {"p1": None, "p2 again": None, "p3": 1, "Best editor?": 2, "p5": 2}


def test_duplicates_within_a_file_and_conflicting_votes(engine, tmp_path):
    rows = [
        {"prompt": "same"},
        {"prompt": "same"},
        {"prompt": "q", "chosen": "x", "rejected": "y"},
        {"prompt": "q", "chosen": "x", "rejected": "y"},  # the same pair again
        {"prompt": "q", "chosen": "y", "rejected": "x"},  # contradicts the first word on the pair
    ]
    report = run_import(engine, write_jsonl(tmp_path / "dups.jsonl", rows))
    assert (report.rows, report.prompts_created, report.comparisons_created, report.votes_created,
            report.skipped_duplicates, report.conflicts) == (5, 2, 1, 1, 3, 1)
    with Session(engine) as session:
        assert_votes_prefer(session, {"q": ("x", "y")})


def test_plain_prompt_rows_reuse_an_existing_prompt_for_a_pair(engine, tmp_path):
    run_import(engine, write_jsonl(tmp_path / "a.jsonl", [{"prompt": "shared"}]))
    report = run_import(engine, write_jsonl(tmp_path / "b.jsonl", [{"prompt": "shared", "chosen": "c",
                                                                     "rejected": "r"}]))
    assert (report.prompts_created, report.votes_created, report.skipped_duplicates) == (0, 1, 0)
    assert counts(engine)["Prompt"] == 1


GOOD = {"prompt": "fine"}


def csv_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


MALFORMED = {
    "bad_json": (lambda d: write_jsonl(d / "prompts.jsonl", [GOOD, GOOD, '{"prompt": "x",}']),
                 "prompts.jsonl line 3: invalid JSON"),
    "wrong_type": (lambda d: write_jsonl(d / "prompts.jsonl", [GOOD] * 6 + [{"prompt": 7}]),
                   "prompts.jsonl line 7: field 'prompt' must be a string (got int)"),
    "missing_prompt": (lambda d: write_jsonl(d / "prompts.jsonl", [GOOD, {"tags": ["x"]}]),
                       "prompts.jsonl line 2: missing field 'prompt'"),
    "empty_prompt": (lambda d: write_jsonl(d / "prompts.jsonl", [GOOD, {"prompt": "   "}]),
                     "line 2: field 'prompt' must not be empty"),
    "not_an_object": (lambda d: write_jsonl(d / "prompts.jsonl", [GOOD, "[1, 2]"]),
                      "line 2: expected an object"),
    "message_without_role": (lambda d: write_jsonl(d / "prompts.jsonl", [{"messages": [{"content": "hi"}]}]),
                             "line 1: field 'messages' item 0: 'role' must be a non-empty string"),
    "empty_messages": (lambda d: write_jsonl(d / "prompts.jsonl", [{"messages": []}]),
                       "line 1: field 'messages' must not be an empty list"),
    "bad_tags": (lambda d: write_jsonl(d / "prompts.jsonl", [{"prompt": "x", "tags": [1]}]),
                 "line 1: field 'tags' must be a list of strings"),
    "chosen_without_rejected": (lambda d: write_jsonl(d / "prompts.jsonl", [{"prompt": "x", "chosen": "a"}]),
                                "line 1: missing field 'rejected'"),
    "string_pair_without_prompt": (lambda d: write_jsonl(d / "prompts.jsonl", [{"chosen": "a", "rejected": "b"}]),
                                   "line 1: missing field 'prompt' or 'messages'"),
    "same_text": (lambda d: write_jsonl(d / "prompts.jsonl", [{"prompt": "x", "chosen": "a", "rejected": "a"}]),
                  "line 1: fields 'chosen' and 'rejected' hold the same text"),
    "mixed_pair": (lambda d: write_jsonl(d / "prompts.jsonl", [{"prompt": "x", "chosen": "a",
                                                                "rejected": chat(("assistant", "b"))}]),
                   "must both be strings or both chat lists"),
    "two_turn_completion": (lambda d: write_jsonl(d / "prompts.jsonl", [{
        "prompt": chat(("user", "x")), "chosen": chat(("assistant", "a"), ("assistant", "b")),
        "rejected": chat(("assistant", "c"))}]), "line 1: fields 'chosen' and 'rejected' must each be"),
    "no_shared_prompt": (lambda d: write_jsonl(d / "prompts.jsonl", [{
        "chosen": chat(("user", "x"), ("assistant", "a")), "rejected": chat(("user", "y"), ("assistant", "b"))}]),
        "share no prompt turns"),
    "negative_margin": (lambda d: write_jsonl(d / "prompts.jsonl", [{"prompt": "x", "chosen": "a",
                                                                     "rejected": "b", "margin": -1}]),
                        "line 1: field 'margin': the chosen response scores below the rejected one"),
    "bad_strength": (lambda d: write_jsonl(d / "prompts.jsonl", [{"prompt": "x", "chosen": "a",
                                                                  "rejected": "b", "strength": 3}]),
                     "line 1: field 'strength' must be 1"),
    "nul_character": (lambda d: write_jsonl(d / "prompts.jsonl", [GOOD, {"prompt": "nul\u0000here"}]),
                      "line 2: field 'prompt' contains a NUL character"),
    "nul_in_response": (lambda d: write_jsonl(d / "prompts.jsonl", [{"prompt": "x", "chosen": "a\u0000",
                                                                     "rejected": "b"}]),
                        "line 1: field 'chosen' contains a NUL character"),
    "lone_surrogate": (lambda d: write_jsonl(d / "prompts.jsonl", ['{"prompt": "bad \\ud800 half"}']),
                       "line 1: field 'prompt' contains an unpaired UTF-16 surrogate"),
    "csv_empty_prompt": (lambda d: csv_text(d / "prompts.csv", "prompt,tags\nok,a\nfine,b\n,c\n"),
                         "prompts.csv row 3 (line 4): missing field 'prompt'"),
    "csv_messages_not_json": (lambda d: csv_text(d / "prompts.csv", "messages\nhello there\n"),
                              "prompts.csv row 1 (line 2): field 'messages' must be a JSON chat list"),
    "csv_extra_cells": (lambda d: csv_text(d / "prompts.csv", "prompt\nok\nbad,extra\n"),
                        "prompts.csv row 2 (line 3): has more cells than the header"),
    "csv_bad_number": (lambda d: csv_text(d / "prompts.csv", "prompt,chosen,rejected,margin\nx,a,b,lots\n"),
                       "row 1 (line 2): field 'margin' must be a number"),
    "parquet_null_prompt": (lambda d: write_parquet(d / "prompts.parquet", [{"prompt": "ok"}, {"prompt": "ok2"},
                                                                          {"prompt": None}]),
                            "prompts.parquet row 3: missing field 'prompt'"),
    "parquet_bad_message": (lambda d: write_parquet(d / "prompts.parquet", [
        {"messages": chat(("user", "ok"))}, {"messages": [{"role": None, "content": "x"}]}]),
        "prompts.parquet row 2: field 'messages' item 0: 'role'"),
    "not_parquet": (lambda d: csv_text(d / "prompts.parquet", "prompt\nnot parquet\n"),
                    "prompts.parquet: not a readable parquet file"),
    "unknown_extension": (lambda d: csv_text(d / "prompts.txt", "hello\n"),
                          "prompts.txt: unknown file type '.txt'"),
    "empty_jsonl": (lambda d: csv_text(d / "prompts.jsonl", "\n\n"), "prompts.jsonl: no rows"),
    "header_only_csv": (lambda d: csv_text(d / "prompts.csv", "prompt\n"), "prompts.csv: no rows"),
    "empty_parquet": (lambda d: write_parquet(d / "prompts.parquet", []), "prompts.parquet: no rows"),
    "missing_file": (lambda d: d / "absent.jsonl", "absent.jsonl: no such file"),
}


def assert_refused(engine, path: Path, message: str) -> None:
    with pytest.raises(ImportFileError) as error:
        run_import(engine, path)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    assert counts(engine) == dict.fromkeys(counts(engine), 0)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_imports_nothing_and_names_the_place(case, sqlite_url, tmp_path):
    make, message = MALFORMED[case]
    assert_refused(engine_for(sqlite_url), make(tmp_path), message)


def test_malformed_files_import_nothing_on_every_backend(engine, tmp_path):
    """The same refusals, all against one database per backend (a fresh PostgreSQL database per case is slow)."""
    for case, (make, message) in sorted(MALFORMED.items()):
        folder = tmp_path / case
        folder.mkdir()
        assert_refused(engine, make(folder), message)


def test_bad_row_after_many_good_ones_counts_the_rest(engine, tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(50)]
    rows[20] = {"prompt": 1}
    rows[30] = {"prompt": ""}
    with pytest.raises(ImportFileError, match=r"line 21: field 'prompt' must be a string .*\(and 1 more bad rows\)"):
        run_import(engine, write_jsonl(tmp_path / "many.jsonl", rows))
    assert counts(engine) == dict.fromkeys(counts(engine), 0)


def test_import_leaves_the_commit_to_the_caller(engine, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "chosen": "a", "rejected": "b"}])
    with Session(engine) as session:
        report = import_prompts(path, session=session)
        assert report.votes_created == 1
        assert session.exec(select(func.count()).select_from(Vote)).one() == 1  # visible inside
        session.rollback()
    assert counts(engine) == dict.fromkeys(counts(engine), 0)


def test_unicode_is_stored_verbatim(engine, tmp_path):
    rows = [{"prompt": text, "tags": [text[:3]]} for text in UNICODE_TEXTS]
    rows += [{"prompt": f"reply in kind {i}", "chosen": text, "rejected": text[::-1] + "!"}
             for i, text in enumerate(UNICODE_TEXTS)]
    # NFD and NFC spellings are different strings and stay different prompts.
    rows += [{"prompt": "e\u0301"}, {"prompt": "\u00e9"}]
    path = tmp_path / "unicode.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + write_jsonl(tmp_path / "u.jsonl", rows).read_bytes())  # with a BOM
    report = run_import(engine, path)
    assert report.prompts_created == 2 * len(UNICODE_TEXTS) + 2
    with Session(engine) as session:
        stored = {p.messages[0]["content"]: p.tags for p in session.exec(select(Prompt))}
        texts = set(session.exec(select(Response.text)).all())
    for text in UNICODE_TEXTS:
        assert stored[text] == [text[:3]]
        assert text in texts and text[::-1] + "!" in texts
    assert "e\u0301" in stored and "\u00e9" in stored


def test_sql_injection_strings_are_stored_verbatim(engine, tmp_path):
    hostile = [SQL_INJECTION, "Robert'); DROP TABLE prompt;--", "\" OR 1=1 --", "%s %(x)s ?", "\\'; --"]
    rows = [{"prompt": text, "tags": [text]} for text in hostile]
    rows.append({"prompt": "pick", "chosen": SQL_INJECTION, "rejected": hostile[1]})
    report = run_import(engine, write_jsonl(tmp_path / "evil.jsonl", rows), source=SQL_INJECTION)
    assert report.votes_created == 1
    assert {"vote", "prompt", "response"} <= set(inspect(engine).get_table_names())
    with Session(engine) as session:
        stored = {p.messages[0]["content"]: (p.tags, p.source) for p in session.exec(select(Prompt))}
        assert_votes_prefer(session, {"pick": (SQL_INJECTION, hostile[1])})
    for text in hostile:
        assert stored[text] == ([text], SQL_INJECTION)


def test_csv_cells_for_chat_lists_and_tags(engine, tmp_path):
    path = csv_text(tmp_path / "c.csv", (
        "prompt,messages,tags,chosen,rejected\n"
        "[INST] bracketed text stays text,,\"a, b\",,\n"
        ",\"[{\"\"role\"\":\"\"user\"\",\"\"content\"\":\"\"from json\"\"}]\",\"[\"\"x\"\"]\",,\n"
        "\"multi\nline\",,,\"[{\"\"role\"\":\"\"assistant\"\",\"\"content\"\":\"\"yes\"\"}]\",\"plain [no]\"\n"
    ))
    with pytest.raises(ImportFileError, match=r"row 3 \(line 4\): .*both be strings or both chat lists"):
        run_import(engine, path)
    path.write_text(path.read_text().replace('"plain [no]"', '"[{""role"":""assistant"",""content"":""no""}]"'))
    report = run_import(engine, path)
    assert (report.prompts_created, report.votes_created) == (3, 1)
    with Session(engine) as session:
        stored = {p.messages[0]["content"]: p.tags for p in session.exec(select(Prompt))}
        assert_votes_prefer(session, {"multi\nline": ("yes", "no")})
    assert stored == {"[INST] bracketed text stays text": ["a", "b"], "from json": ["x"], "multi\nline": []}


def test_large_import_is_one_pass(engine, tmp_path):
    """A few thousand rows import and re-import correctly (the timing is in bench/import_export.py)."""
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} if i % 2 else {"prompt": f"q{i}"}
            for i in range(3000)]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    report = run_import(engine, path)
    assert (report.prompts_created, report.comparisons_created, report.votes_created) == (3000, 1500, 1500)
    assert run_import(engine, path).skipped_duplicates == 3000
