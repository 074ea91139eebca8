"""TRL exports: aggregation rules against hand-computed outcomes, provenance, determinism,
files, and the datasets going through TRL's own preprocessing and trainers."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from datasets import Dataset
from sqlmodel import Session

from feedback_store.catalog import add_comparison, add_prompt, add_response, get_or_create_policy
from feedback_store.db import engine_for, session_scope, upgrade
from feedback_store.export import (
    Selection,
    export_dpo,
    export_kto,
    export_reward,
    export_sft,
    snapshot,
    write_dataset,
)
from feedback_store.importing import import_prompts
from feedback_store.models import Response
from feedback_store.raters import get_or_create_import_rater, get_or_create_judge, get_or_create_local_user
from feedback_store.votes import record_rating, record_vote

# Texts that must come out exactly as they went in.
TEXTS = ["مرحبا بالعالم", "שלום 👩‍👩‍👧", "'); DROP TABLE vote; --", "cafe\u0301 \u200d z̸a̴", "plain"]
LABELS = [f"c{i}" for i in range(1, 9)]


@dataclass
class World:
    comparisons: dict[str, int]  # label -> comparison id
    base: dict[str, int]  # label -> id of the "base" response (canonical side a)
    tuned: dict[str, int]  # label -> id of the "tuned" response (side b)
    edit_id: int

    def label_of(self, comparison_id: int) -> str:
        return {v: k for k, v in self.comparisons.items()}[comparison_id]


def build_world(session) -> World:
    """Eight comparisons with votes whose aggregates are worked out by hand in the tests below.

    Raters: humans h1, h2, h3 (h3 has weight 3, used only when weighting is on), judge j1,
    and the import rater. Side a of every comparison is the base policy's response.
      c1: h1 a, h2 a, h3 b, j1 a          c5: import b (clearly)
      c2: h1 a, j1 b                      c6: h1 b (clearly), h2 b (slightly), h3 a (clearly)
      c3: h1 tie, h2 tie, h3 a            c7: no votes
      c4: h1 both_bad, h2 both_bad        c8: j1 a (slightly)
    Ratings: c1's base response h1 up, h2 up, h3 down; c2's tuned response h1 up, h2 down;
    c3's base response j1 down. An edit by h1 of c6's base response.
    """
    base_policy = get_or_create_policy("base", session=session, base_model="tiny")
    tuned_policy = get_or_create_policy("tuned", session=session, base_model="tiny")
    edit_policy = get_or_create_policy("human-edit", session=session, base_model="tiny")
    h1, h2, h3 = (get_or_create_local_user(name, session=session) for name in ("h1", "h2", "h3"))
    h3.weight = 3.0
    session.add(h3)
    j1 = get_or_create_judge("tiny-judge", "v1", session=session)
    imp = get_or_create_import_rater(session=session)

    world = World({}, {}, {}, 0)
    for i, label in enumerate(LABELS):
        text = TEXTS[i % len(TEXTS)]
        prompt, _ = add_prompt([{"role": "system", "content": "Answer."}, {"role": "user", "content": f"{text} {label}"}],
                               session=session, source="test", split="train")  # eval prompts are never exported
        base, _ = add_response(prompt.id, base_policy.id, f"base says {text} ({label})", session=session)
        tuned, _ = add_response(prompt.id, tuned_policy.id, f"tuned says {text} ({label})", session=session)
        comparison, _ = add_comparison(base, tuned, session=session)
        assert comparison.response_a_id == base.id
        world.comparisons[label], world.base[label], world.tuned[label] = comparison.id, base.id, tuned.id

    votes = {
        "c1": [(h1, "a", None), (h2, "a", None), (h3, "b", None), (j1, "a", None)],
        "c2": [(h1, "a", None), (j1, "b", None)],
        "c3": [(h1, "tie", None), (h2, "tie", None), (h3, "a", None)],
        "c4": [(h1, "both_bad", None), (h2, "both_bad", None)],
        "c5": [(imp, "b", 2)],
        "c6": [(h1, "b", 2), (h2, "b", 1), (h3, "a", 2)],
        "c8": [(j1, "a", 1)],
    }
    for label, cast in votes.items():
        for rater, choice, strength in cast:
            record_vote(world.comparisons[label], rater.id, choice, strength=strength, session=session)
    for response, rater, up in [
        (world.base["c1"], h1, True), (world.base["c1"], h2, True), (world.base["c1"], h3, False),
        (world.tuned["c2"], h1, True), (world.tuned["c2"], h2, False),
        (world.base["c3"], j1, False),
    ]:
        record_rating(response, rater.id, up, session=session)
    edit, _ = add_response(session.get_one(Response, world.base["c6"]).prompt_id, edit_policy.id,
                           "an edited, better answer to " + TEXTS[0], session=session,
                           edited_from_id=world.base["c6"], author_rater_id=h1.id)
    world.edit_id = edit.id
    return world


@pytest.fixture
def world(engine) -> World:
    with session_scope(engine) as session:
        return build_world(session)


def run(engine, exporter, **selection) -> Dataset:
    with Session(engine) as session:
        return exporter(session=session, selection=Selection(**selection))


def pair_view(world: World, ds: Dataset) -> list[tuple]:
    """(comparison, winning side, n_votes, agreement, rater kinds) per row, checking texts match ids."""
    view = []
    for row in ds:
        label = world.label_of(row["comparison_id"])
        side = "a" if row["chosen_response_id"] == world.base[label] else "b"
        assert row["chosen"][0]["content"].startswith("base says" if side == "a" else "tuned says")
        assert row["rejected"][0]["content"].startswith("tuned says" if side == "a" else "base says")
        assert (row["chosen_policy"], row["rejected_policy"]) == (("base", "tuned") if side == "a"
                                                                 else ("tuned", "base"))
        view.append((label, side, row["n_votes"], pytest.approx(row["agreement"]), row["rater_kinds"]))
    return view


DPO_CASES = {
    "default_both": ({}, [("c1", "a", 4, 0.75, "human,judge"), ("c5", "b", 1, 1.0, "import"),
                          ("c6", "b", 3, 2 / 3, "human"), ("c8", "a", 1, 1.0, "judge")]),
    "human_only": ({"rater_kinds": "human"}, [("c1", "a", 3, 2 / 3, "human"), ("c2", "a", 1, 1.0, "human"),
                                              ("c5", "b", 1, 1.0, "import"), ("c6", "b", 3, 2 / 3, "human")]),
    "judge_only": ({"rater_kinds": "judge"}, [("c1", "a", 1, 1.0, "judge"), ("c2", "b", 1, 1.0, "judge"),
                                              ("c8", "a", 1, 1.0, "judge")]),
    "human_without_imports": ({"rater_kinds": "human", "import_as": "exclude"},
                              [("c1", "a", 3, 2 / 3, "human"), ("c2", "a", 1, 1.0, "human"),
                               ("c6", "b", 3, 2 / 3, "human")]),
    "imports_as_judges": ({"rater_kinds": "judge", "import_as": "judge"},
                          [("c1", "a", 1, 1.0, "judge"), ("c2", "b", 1, 1.0, "judge"),
                           ("c5", "b", 1, 1.0, "import"), ("c8", "a", 1, 1.0, "judge")]),
    "min_agreement": ({"min_agreement": 0.7}, [("c1", "a", 4, 0.75, "human,judge"), ("c5", "b", 1, 1.0, "import"),
                                               ("c8", "a", 1, 1.0, "judge")]),
    "min_votes": ({"min_votes": 2}, [("c1", "a", 4, 0.75, "human,judge"), ("c6", "b", 3, 2 / 3, "human")]),
    # h3 weighs 3: c1 becomes a 3-3 draw (dropped); c3 (tie 2 vs a 3) and c6 (b 2 vs a 3) go to a, 3/5.
    "weighted": ({"weighted": True}, [("c3", "a", 3, 0.6, "human"), ("c5", "b", 1, 1.0, "import"),
                                      ("c6", "a", 3, 0.6, "human"), ("c8", "a", 1, 1.0, "judge")]),
    # DPO drops ties whatever the tie policy.
    "ties_half_still_dropped": ({"tie_policy": "half"}, [("c1", "a", 4, 0.75, "human,judge"),
                                                         ("c5", "b", 1, 1.0, "import"),
                                                         ("c6", "b", 3, 2 / 3, "human"),
                                                         ("c8", "a", 1, 1.0, "judge")]),
}


def test_dpo_aggregation(engine, world):
    # One world per backend for all cases: building it on a fresh PostgreSQL database is the slow part.
    for case, (selection, expected) in DPO_CASES.items():
        ds = run(engine, export_dpo, **selection)
        assert ds.column_names[:3] == ["prompt", "chosen", "rejected"]
        assert pair_view(world, ds) == expected, case


def test_reward_margins_and_ties(engine, world):
    ds = run(engine, export_reward)
    # Margin = mean strength of the winning side's votes: c1 none recorded, c5 2, c6 (2+1)/2, c8 1.
    assert [(world.label_of(r["comparison_id"]), r["margin"]) for r in ds] == [
        ("c1", 0.0), ("c5", 2.0), ("c6", 1.5), ("c8", 1.0)]
    half = run(engine, export_reward, tie_policy="half")
    assert pair_view(world, half) == [
        ("c1", "a", 4, 0.75, "human,judge"),
        ("c2", "a", 2, 0.5, "human,judge"), ("c2", "b", 2, 0.5, "human,judge"),  # a-vs-b draw = tie
        ("c3", "a", 3, 2 / 3, "human"), ("c3", "b", 3, 2 / 3, "human"),
        ("c5", "b", 1, 1.0, "import"), ("c6", "b", 3, 2 / 3, "human"), ("c8", "a", 1, 1.0, "judge"),
    ]
    assert [r["margin"] for r in half if world.label_of(r["comparison_id"]) in ("c2", "c3")] == [0.0] * 4
    strict = run(engine, export_reward, tie_policy="half", min_agreement=0.6)
    assert [world.label_of(r["comparison_id"]) for r in strict] == ["c1", "c3", "c3", "c5", "c6", "c8"]


def kto_view(world: World, ds: Dataset) -> list[tuple]:
    view = []
    for row in ds:
        if row["source"] == "comparison":
            label = world.label_of(row["comparison_id"])
            side = "a" if row["response_id"] == world.base[label] else "b"
            name = f"{label}{side}"
        else:
            assert row["comparison_id"] is None
            name = next(f"{label}{s}" for label in LABELS for s, ids in (("a", world.base), ("b", world.tuned))
                        if ids[label] == row["response_id"])
            name = "rating " + name
        view.append((name, row["label"], row["n_votes"], pytest.approx(row["agreement"]), row["rater_kinds"]))
    return view


def test_kto_from_pairs_and_ratings(engine, world):
    assert kto_view(world, run(engine, export_kto)) == [
        ("c1a", True, 4, 0.75, "human,judge"), ("c1b", False, 4, 0.75, "human,judge"),
        ("c4a", False, 2, 1.0, "human"), ("c4b", False, 2, 1.0, "human"),  # both bad
        ("c5b", True, 1, 1.0, "import"), ("c5a", False, 1, 1.0, "import"),
        ("c6b", True, 3, 2 / 3, "human"), ("c6a", False, 3, 2 / 3, "human"),
        ("c8a", True, 1, 1.0, "judge"), ("c8b", False, 1, 1.0, "judge"),
        # Ratings, majority per response: 2 up 1 down -> up; c2b is 1-1 (dropped); c3a judge down.
        ("rating c1a", True, 3, 2 / 3, "human"), ("rating c3a", False, 1, 1.0, "judge"),
    ]
    human = kto_view(world, run(engine, export_kto, rater_kinds="human", both_bad_policy="drop",
                                min_agreement=0.7))
    assert human == [("c2a", True, 1, 1.0, "human"), ("c2b", False, 1, 1.0, "human"),
                     ("c5b", True, 1, 1.0, "import"), ("c5a", False, 1, 1.0, "import")]


def sft_view(world: World, ds: Dataset) -> list[tuple]:
    view = []
    for row in ds:
        if row["source"] == "edit":
            assert row["response_id"] == world.edit_id and row["policy"] == "human-edit"
            assert row["completion"] == [{"role": "assistant", "content": "an edited, better answer to " + TEXTS[0]}]
            view.append(("edit", row["n_votes"], row["rater_kinds"]))
        else:
            label = world.label_of(row["comparison_id"])
            side = "a" if row["response_id"] == world.base[label] else "b"
            view.append((f"{label}{side}", row["n_votes"], row["rater_kinds"]))
    return view


def test_sft_from_edits_and_clear_winners(engine, world):
    # Unanimous winners only: c5 and c8 (c1 is 3/4, c6 2/3).
    assert sft_view(world, run(engine, export_sft)) == [("edit", None, "human"), ("c5b", 1, "import"),
                                                       ("c8a", 1, "judge")]
    assert sft_view(world, run(engine, export_sft, rater_kinds="human")) == [
        ("edit", None, "human"), ("c2a", 1, "human"), ("c5b", 1, "import")]
    assert sft_view(world, run(engine, export_sft, min_votes=2)) == [("edit", None, "human")]
    # The edit's author is human: a judge-only export leaves it out.
    assert sft_view(world, run(engine, export_sft, rater_kinds="judge")) == [
        ("c1a", 1, "judge"), ("c2b", 1, "judge"), ("c8a", 1, "judge")]
    assert sft_view(world, run(engine, export_sft, sft_min_agreement=0.6)) == [
        ("edit", None, "human"), ("c1a", 4, "human,judge"), ("c5b", 1, "import"), ("c6b", 3, "human"),
        ("c8a", 1, "judge")]


def test_a_response_winning_twice_is_one_sft_example(engine):
    with session_scope(engine) as session:
        policy = get_or_create_policy("p", session=session)
        rater = get_or_create_local_user("h", session=session)
        prompt, _ = add_prompt("hello", session=session)
        best, worse, worst = (add_response(prompt.id, policy.id, t, session=session)[0] for t in ("best", "x", "y"))
        for other in (worse, worst):
            comparison, _ = add_comparison(best, other, session=session)
            record_vote(comparison.id, rater.id, "a" if comparison.response_a_id == best.id else "b",
                        session=session)
    ds = run(engine, export_sft)
    assert [row["completion"][0]["content"] for row in ds] == ["best"]
    assert len(run(engine, export_dpo)) == 2


def test_prompts_and_texts_come_out_verbatim(engine, world):
    ds = run(engine, export_dpo, rater_kinds="both", tie_policy="drop")
    for row in ds:
        label = world.label_of(row["comparison_id"])
        text = TEXTS[LABELS.index(label) % len(TEXTS)]
        assert row["prompt"] == [{"role": "system", "content": "Answer."}, {"role": "user", "content": f"{text} {label}"}]
        assert text in row["chosen"][0]["content"] and text in row["rejected"][0]["content"]


def test_empty_store_gives_empty_datasets_with_the_right_columns(engine):
    for exporter, columns in [(export_dpo, {"prompt", "chosen", "rejected"}),
                              (export_reward, {"prompt", "chosen", "rejected", "margin"}),
                              (export_kto, {"prompt", "completion", "label"}),
                              (export_sft, {"prompt", "completion"})]:
        ds = run(engine, exporter)
        assert len(ds) == 0 and columns <= set(ds.column_names)
        assert {"comparison_id", "n_votes", "agreement", "rater_kinds"} <= set(ds.column_names)


def test_selection_is_validated():
    for bad in [{"rater_kinds": "robots"}, {"tie_policy": "coin"}, {"min_votes": 0}, {"min_agreement": 1.5},
                {"method": "mean"}, {"both_bad_policy": "x"}, {"import_as": "x"}]:
        with pytest.raises(ValueError, match=f"Selection.{next(iter(bad))}"):
            Selection(**bad)
    assert set(Selection.help()) >= {"rater_kinds", "min_votes", "min_agreement", "tie_policy", "weighted"}
    assert all(Selection.help().values())


def test_snapshot_is_deterministic_and_tracks_changes(engine, world):
    first_ids, first_hash = snapshot(run(engine, export_kto))
    again_ids, again_hash = snapshot(run(engine, export_kto))
    assert (first_ids, first_hash) == (again_ids, again_hash)
    assert first_ids == {
        "comparison_ids": sorted(world.comparisons[c] for c in ("c1", "c4", "c5", "c6", "c8")),
        "response_ids": sorted([world.base["c1"], world.base["c3"]]),
    }
    assert snapshot(run(engine, export_kto).shuffle(seed=0))[1] != first_hash
    with session_scope(engine) as session:
        judge = get_or_create_judge("tiny-judge", "v1", session=session)
        record_vote(world.comparisons["c7"], judge.id, "b", session=session)
    ids, changed = snapshot(run(engine, export_kto))
    assert changed != first_hash and world.comparisons["c7"] in ids["comparison_ids"]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_files_round_trip(suffix, engine, world, tmp_path):
    for exporter in (export_dpo, export_kto, export_reward, export_sft):
        ds = run(engine, exporter)
        path = write_dataset(ds, tmp_path / "out" / f"{exporter.__name__}{suffix}")
        loaded = Dataset.from_json(str(path)) if suffix == ".jsonl" else Dataset.from_parquet(str(path))
        assert loaded.to_list() == ds.to_list()
        assert snapshot(loaded)[1] == snapshot(ds)[1]
    if suffix == ".jsonl":  # UTF-8 text, not \u escapes
        assert TEXTS[0] in path.read_text(encoding="utf-8")
        assert all(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"export_{k}{suffix}" for k in ("dpo", "kto", "reward", "sft"))  # no temporary files left


def test_write_dataset_refuses_other_extensions(engine, tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.jsonl or \.parquet"):
        write_dataset(run(engine, export_dpo), tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_dpo_export_reimports_into_a_fresh_store(engine, world, tmp_path):
    ds = run(engine, export_dpo)
    path = write_dataset(ds, tmp_path / "dpo.jsonl")
    fresh_url = f"sqlite:///{tmp_path / 'fresh.db'}"
    upgrade(fresh_url)
    fresh = engine_for(fresh_url)
    with session_scope(fresh) as session:
        report = import_prompts(path, session=session, split="train")  # an export holds train prompts only
    assert report.votes_created == len(ds)
    again = run(fresh, export_dpo)
    strip = lambda rows: [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]  # noqa: E731
    assert strip(again) == strip(ds)
    assert set(again["rater_kinds"]) == {"import"}


# --------------------------------------------------------------------------- TRL


def tiny_tokenizer():
    """A byte-level tokenizer with a chat template, built offline (no hub download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {token: i for i, token in enumerate(special + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        additional_special_tokens=special[2:])
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tokenizer


@pytest.fixture
def sqlite_engine_with_world(sqlite_url):
    engine = engine_for(sqlite_url)
    with session_scope(engine) as session:
        build_world(session)
    return engine


def test_exports_pass_trl_preprocessing(sqlite_engine_with_world):
    from trl.data_utils import is_conversational, maybe_apply_chat_template, maybe_extract_prompt

    tokenizer = tiny_tokenizer()
    engine = sqlite_engine_with_world
    for exporter, keys in [(export_dpo, {"prompt", "chosen", "rejected"}),
                           (export_reward, {"prompt", "chosen", "rejected"}),
                           (export_kto, {"prompt", "completion", "label"}),
                           (export_sft, {"prompt", "completion"})]:
        ds = run(engine, exporter)
        assert len(ds) > 0
        for row in ds:
            assert is_conversational(row)
            assert maybe_extract_prompt(row) is row  # explicit prompt: TRL leaves it alone
            rendered = maybe_apply_chat_template({k: row[k] for k in keys}, tokenizer)
            assert set(rendered) == keys
            assert rendered["prompt"].endswith("<|assistant|>")
            assert row["prompt"][-1]["content"] in rendered["prompt"]
            for key in keys - {"prompt", "label"}:
                assert rendered[key] == row[key][0]["content"] + "<|end|>"


def test_exports_train_one_step_in_each_trl_trainer(sqlite_engine_with_world, tmp_path):
    """The real trainers take the exported datasets as they are (provenance columns included)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    from trl import (DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, RewardConfig, RewardTrainer, SFTConfig,
                     SFTTrainer)

    tokenizer = tiny_tokenizer()
    config = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    causal = lambda: LlamaForCausalLM(LlamaConfig(**config))  # noqa: E731
    args = dict(output_dir=str(tmp_path), report_to=[], max_steps=1, per_device_train_batch_size=2,
                save_strategy="no", use_cpu=True, logging_steps=1)
    engine = sqlite_engine_with_world
    trainers = [
        lambda: DPOTrainer(model=causal(), ref_model=causal(), args=DPOConfig(**args),
                           train_dataset=run(engine, export_dpo), processing_class=tokenizer),
        lambda: KTOTrainer(model=causal(), ref_model=causal(), args=KTOConfig(**args),
                           train_dataset=run(engine, export_kto), processing_class=tokenizer),
        lambda: RewardTrainer(model=LlamaForSequenceClassification(LlamaConfig(**config, num_labels=1)),
                              args=RewardConfig(**args), train_dataset=run(engine, export_reward),
                              processing_class=tokenizer),
        lambda: SFTTrainer(model=causal(), args=SFTConfig(**args), train_dataset=run(engine, export_sft),
                           processing_class=tokenizer),
    ]
    for make in trainers:
        trainer = make()
        result = trainer.train()
        assert result.global_step == 1 and result.training_loss == result.training_loss  # not NaN


def test_weighted_exports_carry_the_agreeing_raters_weight_scaled_to_mean_one(engine, world):
    """h3 weighs 3, every other rater 1. DPO: c3 a (h3: 3), c5 b (import: 1), c6 a (h3: 3), c8 a
    (j1: 1) -> mean 2 -> 1.5, 0.5, 1.5, 0.5. Unweighted exports have no weight column."""
    dpo = run(engine, export_dpo, weighted=True)
    assert [(world.label_of(r["comparison_id"]), r["weight"]) for r in dpo] == [
        ("c3", 1.5), ("c5", 0.5), ("c6", 1.5), ("c8", 0.5)]
    for exporter in (export_dpo, export_reward, export_kto):
        assert "weight" not in run(engine, exporter).column_names
    # Reward with mirrored ties: c2 is a 1-1 draw of a and b (each drawn side has 1 agreeing rater),
    # c4 both_bad is dropped; c1 a 3-3 draw (h3 alone against h1+h2+j1 weighed 3): a tie of 3.
    half = run(engine, export_reward, weighted=True, tie_policy="half")
    support = {"c1": 3, "c2": 1, "c3": 3, "c5": 1, "c6": 3, "c8": 1}
    rows = [(world.label_of(r["comparison_id"]), r["weight"]) for r in half]
    mean = sum(support[label] for label, _ in rows) / len(rows)
    assert rows == [(label, pytest.approx(support[label] / mean)) for label, _ in rows]
    assert sum(w for _, w in rows) == pytest.approx(len(rows))
    # KTO: both rows of a pair weigh what the pair does; a rating what the raters of its thumb weigh
    # (c1a: h1 + h2 up = 2 against h3 down = 3 -> down wins with 3; c3a: j1 down, 1).
    kto = run(engine, export_kto, weighted=True)
    got = [(r["source"], r["label"], r["weight"]) for r in kto]
    raw = [3, 3, 2, 2, 1, 1, 3, 3, 1, 1, 3, 1]  # c3 a/b, c4 both bad (h1 + h2), c5, c6, c8, then c1a, c3a
    mean = sum(raw) / len(raw)
    assert [w for *_, w in got] == pytest.approx([value / mean for value in raw])
    assert [(s, label) for s, label, _ in got][-2:] == [("rating", False), ("rating", False)]
    # The weights are part of the data: the snapshot hash tells a weighted export from the same rows unweighted.
    assert snapshot(dpo)[1] != snapshot(dpo.remove_columns("weight"))[1]
