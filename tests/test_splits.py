"""Train and eval prompts: set at import or by the content hash, backfilled by migration 0003,
moved by admins, and kept out of every training export and of pair generation for labelling."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa
from alembic import command
from sqlmodel import select

from feedback_store.catalog import (
    add_comparison,
    add_prompt,
    add_response,
    get_or_create_policy,
    list_prompts,
)
from feedback_store.db import alembic_config, engine_for, session_scope, upgrade
from feedback_store.export import export_dpo, export_kto, export_prompts, export_reward, export_sft
from feedback_store.hashing import sha256_json
from feedback_store.importing import ImportFileError, import_prompts
from feedback_store.models import Prompt, Response
from feedback_store.raters import get_or_create_judge, get_or_create_local_user
from feedback_store.splits import EVAL_PERCENT, default_split, set_prompt_split, split_counts
from feedback_store.votes import record_rating, record_vote
from labeling.cli import main


def _messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _splits(session) -> dict[str, str]:
    return {p.messages[-1]["content"]: p.split for p in list_prompts(session=session)}


def test_default_split_is_a_deterministic_tenth_by_content_hash():
    hashes = [sha256_json(_messages(f"question number {i}")) for i in range(4000)]
    splits = [default_split(h) for h in hashes]
    assert splits == [default_split(h) for h in hashes]  # no state, no randomness
    share = splits.count("eval") / len(splits)
    assert abs(share - EVAL_PERCENT / 100) < 0.02
    assert set(splits) == {"train", "eval"}


def test_add_prompt_uses_the_hash_rule_unless_told(session):
    texts = [f"prompt {i}" for i in range(40)]
    for text in texts:
        add_prompt(text, session=session)
    splits = _splits(session)
    assert all(splits[t] == default_split(sha256_json(_messages(t))) for t in texts)
    assert "eval" in splits.values()
    told, _ = add_prompt("told to be eval", session=session, split="eval")
    assert told.split == "eval"
    again, created = add_prompt("told to be eval", session=session, split="train")
    assert not created and again.split == "eval"  # a stored prompt keeps its split
    with pytest.raises(ValueError, match="unknown split 'test'"):
        add_prompt("another", session=session, split="test")


def test_import_reads_a_split_column(engine, tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "held out", "split": "eval"},
        {"prompt": "for training", "split": "train"},
        {"prompt": "hash decides"},
        {"prompt": "pair on eval", "chosen": "good", "rejected": "bad", "split": "eval"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with session_scope(engine) as session:
        report = import_prompts(path, session=session)
    assert report.eval_prompts == 2 + (default_split(sha256_json(_messages("hash decides"))) == "eval")
    assert "eval prompts (held out from training)" in report.summary()
    with session_scope(engine) as session:
        splits = _splits(session)
    assert splits["held out"] == "eval" and splits["for training"] == "train" and splits["pair on eval"] == "eval"
    assert splits["hash decides"] == default_split(sha256_json(_messages("hash decides")))

    # Re-importing with another split keeps the stored one and says so.
    path.write_text(json.dumps({"prompt": "held out", "split": "train"}) + "\n")
    with session_scope(engine) as session:
        report = import_prompts(path, session=session)
    assert report.split_conflicts == 1 and "prefloop prompts split" in report.summary()
    with session_scope(engine) as session:
        assert _splits(session)["held out"] == "eval"


def test_import_csv_split_and_a_bad_value_imports_nothing(engine, tmp_path):
    good = tmp_path / "ok.csv"
    good.write_text("prompt,split\nfirst,eval\nsecond,\n")
    with session_scope(engine) as session:
        import_prompts(good, session=session)
        assert _splits(session)["first"] == "eval"
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,split\nthird,train\nfourth,test\n")
    message = r"row 2 \(line 3\): field 'split' must be 'train' or 'eval' \(got 'test'\)"
    with pytest.raises(ImportFileError, match=message), session_scope(engine) as session:
        import_prompts(bad, session=session)
    with session_scope(engine) as session:
        assert "third" not in _splits(session)


def test_set_prompt_split_moves_prompts_and_refuses_unknown_ids(engine):
    with session_scope(engine) as session:
        ids = [add_prompt(f"p{i}", session=session, split="train")[0].id for i in range(3)]
    with session_scope(engine) as session:
        assert set_prompt_split(ids[:2], "eval", session=session) == 2
        assert set_prompt_split(ids[:2], "eval", session=session) == 0
    with pytest.raises(ValueError, match="no prompt with id 999"), session_scope(engine) as session:
        set_prompt_split([ids[2], 999], "eval", session=session)
    with session_scope(engine) as session:
        assert split_counts(session=session) == {"train": 1, "eval": 2}
        with pytest.raises(ValueError, match="unknown split"):
            set_prompt_split(ids, "dev", session=session)


def test_cli_prompts_split(sqlite_url, capsys):
    with session_scope(engine_for(sqlite_url)) as session:
        for i in range(5):
            add_prompt(f"p{i}", session=session, split="train")
    assert main(["prompts", "split", "--db", sqlite_url, "eval", "1", "3-4"]) == 0
    out = capsys.readouterr().out
    assert "moved 3 prompts to eval" in out and "train 2, eval 3" in out
    assert main(["prompts", "split", "--db", sqlite_url]) == 0
    assert "train 2, eval 3" in capsys.readouterr().out
    assert main(["prompts", "split", "--db", sqlite_url, "train", "2", "77"]) == 2
    assert "no prompt with id 77 (nothing moved)" in capsys.readouterr().err
    assert main(["prompts", "split", "--db", sqlite_url, "train", "x"]) == 2


def _world_on_both_splits(engine) -> dict[str, set[int]]:
    """Voted pairs, ratings and an edit on train and on eval prompts."""
    with session_scope(engine) as session:
        base = get_or_create_policy("base", session=session)
        tuned = get_or_create_policy("tuned", session=session)
        human = get_or_create_local_user("ann", session=session)
        judge = get_or_create_judge("m", "v1", session=session)
        ids: dict[str, set[int]] = {"train": set(), "eval": set()}
        for i in range(8):
            split = "eval" if i % 2 else "train"
            prompt, _ = add_prompt(f"question {i}", session=session, split=split)
            ids[split].add(prompt.id)
            good, _ = add_response(prompt.id, tuned.id, f"good answer {i}", session=session)
            bad, _ = add_response(prompt.id, base.id, f"bad {i}", session=session)
            comparison, _ = add_comparison(good, bad, session=session)
            winner = "a" if comparison.response_a_id == good.id else "b"
            record_vote(comparison.id, human.id, winner, session=session)
            record_vote(comparison.id, judge.id, winner, session=session)
            record_rating(good.id, human.id, True, session=session)
            add_response(prompt.id, base.id, f"edited {i}", session=session, edited_from_id=bad.id,
                         author_rater_id=human.id)
    return ids


def _prompt_ids(session, dataset) -> set[int]:
    if "prompt_id" in dataset.column_names:
        return set(dataset["prompt_id"])
    by_text = {tuple((m["role"], m["content"]) for m in p.messages): p.id for p in session.exec(select(Prompt))}
    return {by_text[tuple((m["role"], m["content"]) for m in row)] for row in dataset["prompt"]}


def test_exports_never_include_eval_prompts(engine):
    ids = _world_on_both_splits(engine)
    with session_scope(engine) as session:
        for export in (export_dpo, export_kto, export_reward, export_sft, export_prompts):
            dataset = export(session=session)
            assert len(dataset) > 0, export.__name__
            assert _prompt_ids(session, dataset) == ids["train"], export.__name__
        # Moving a prompt to eval takes it out of the next export.
        moved = min(ids["train"])
        set_prompt_split([moved], "eval", session=session)
        assert moved not in _prompt_ids(session, export_dpo(session=session))


def test_migration_0003_backfills_the_hash_rule(empty_db_url):
    upgrade(empty_db_url, "0002")
    texts = [f"stored before splits {i}" for i in range(60)]
    prompt = sa.table("prompt", sa.column("messages", sa.JSON), sa.column("content_hash", sa.String),
                      sa.column("tags", sa.JSON), sa.column("created_at", sa.DateTime(timezone=True)))
    with engine_for(empty_db_url).begin() as conn:
        conn.execute(prompt.insert(), [
            {"messages": _messages(t), "content_hash": sha256_json(_messages(t)), "tags": [],
             "created_at": datetime.now(timezone.utc)} for t in texts
        ])
    upgrade(empty_db_url)
    with session_scope(engine_for(empty_db_url)) as session:
        splits = _splits(session)
    assert splits == {t: default_split(sha256_json(_messages(t))) for t in texts}
    assert "eval" in splits.values() and "train" in splits.values()
    command.downgrade(alembic_config(empty_db_url), "0002")  # and back down, rows intact
    with engine_for(empty_db_url).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM prompt")).scalar_one() == len(texts)


def test_generation_for_labelling_draws_from_train_prompts(sqlite_url, tmp_path, capsys):
    from alignment.generation import GenerationJob, SamplingConfig, run_generation
    from tests.tiny_models import save_tiny_causal_lm

    model = str(save_tiny_causal_lm(tmp_path / "tiny"))
    engine = engine_for(sqlite_url)
    with session_scope(engine) as session:
        train = {add_prompt(f"yes {i}", session=session, split="train")[0].id for i in range(3)}
        held_out = {add_prompt(f"no {i}", session=session, split="eval")[0].id for i in range(2)}
    sampling = SamplingConfig(max_new_tokens=3, samples=2)
    run_generation(engine, GenerationJob(policies=(model,), sampling=sampling), show_progress=False)
    with session_scope(engine) as session:
        assert {r.prompt_id for r in session.exec(select(Response))} == train
    # Asked otherwise: eval prompts too.
    assert main(["generate", "--db", sqlite_url, "--policy", model, "--split", "all", "--max-new-tokens", "3"]) == 0
    with session_scope(engine) as session:
        assert {r.prompt_id for r in session.exec(select(Response))} == train | held_out


def test_admin_moves_prompts_from_the_app(engine):
    from labeling.app import admin

    class State:  # what the admin action uses of the app state
        def session(self):
            return session_scope(engine)

    with session_scope(engine) as session:
        for i in range(3):
            add_prompt(f"p{i}", session=session, split="train")
    assert admin.move_prompts(State(), None, "1-2", "eval") == "moved 2 prompts to eval; train 1, eval 2"
    with pytest.raises(admin.AdminError, match=r"not a prompt id or range: 'x' \(nothing moved\)"):
        admin.move_prompts(State(), None, "3 x", "eval")
    with pytest.raises(admin.AdminError, match="no prompt with id 9"):
        admin.move_prompts(State(), None, "3 9", "train")
    with session_scope(engine) as session:
        assert split_counts(session=session) == {"train": 1, "eval": 2}
