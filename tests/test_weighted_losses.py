"""Per-example weights (`--weighted`) in the reward, DPO and KTO losses, on the packed fast path
and on TRL's public path: weighted losses against hand-computed combinations of the per-example
losses on a crafted two-example batch; the weighted export from a real SQLite store; a tiny
end-to-end `train dpo --weighted`; all-zero weights refused before training.

With losses l0, l1 of the two examples (each TRL's loss on that example alone), the weighted
batch loss is (w0 * l0 + w1 * l1) / 2: weights (2, 0) give l0, (0, 2) give l1, (1, 1) give the
unweighted loss, (1, 3) give (l0 + 3 * l1) / 2."""

from __future__ import annotations

import json

import pytest
import torch

from alignment import _compat
from tests.tiny_models import build, tiny_tokenizer

TOL = 1e-5
PROMPTS = ["the capital", "write a short poem"]
GOOD = ["good yes answer", "explain the answer yes"]
BAD = ["bad no", "no not but what"]


@pytest.fixture(autouse=True)
def fresh_compat(monkeypatch):
    monkeypatch.delenv(_compat.ENV, raising=False)
    _compat.reset_warnings()
    yield
    _compat.reset_warnings()


def use_public(monkeypatch, public: bool) -> None:
    if public:
        monkeypatch.setenv(_compat.ENV, "public")
    else:
        monkeypatch.delenv(_compat.ENV, raising=False)


def chat(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def pairs(weights=(1.0, 1.0)):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": chat("user", p), "chosen": chat("assistant", g),
                               "rejected": chat("assistant", b), "margin": 0.5 * i, "weight": w}
                              for i, (p, g, b, w) in enumerate(zip(PROMPTS, GOOD, BAD, weights))])


def unpaired(weights=(1.0, 1.0)):
    from datasets import Dataset

    rows = [{"prompt": chat("user", PROMPTS[0]), "completion": chat("assistant", GOOD[0]), "label": True},
            {"prompt": chat("user", PROMPTS[1]), "completion": chat("assistant", BAD[1]), "label": False}]
    return Dataset.from_list([{**row, "weight": w} for row, w in zip(rows, weights)])


def lora(model, **extra):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(123)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"], **extra))
    for name, param in model.named_parameters():  # B = 0 would make every log-ratio 0
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    return model


COMMON = {"per_device_train_batch_size": 2, "max_steps": 1, "logging_steps": 1, "save_strategy": "no",
          "report_to": "none", "use_cpu": True, "bf16": False, "disable_tqdm": True, "seed": 0,
          "gradient_checkpointing": False}


def build_trainer(method: str, tmp_path, **settings):
    if method == "dpo":
        from alignment.training.dpo import DPOConfig as Config
        from alignment.training.dpo import DPOTrainer as Trainer
        model, data = lora(build("llama", seed=1)), pairs()
    elif method == "reward":
        from alignment.training.reward import RewardConfig as Config
        from alignment.training.reward import RewardTrainer as Trainer
        model, data = lora(build("llama-reward", seed=2), modules_to_save=["score"]), pairs()
    else:
        from alignment.training.kto import KTOConfig as Config
        from alignment.training.kto import KTOTrainer as Trainer
        model, data = lora(build("llama", seed=1)), unpaired()
        settings = {"train_sampling_strategy": "sequential", **settings}
    args = Config(output_dir=str(tmp_path / method), **{**COMMON, **settings})
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer())
    if "ref" in getattr(trainer.model, "peft_config", {}):
        # TRL's frozen copy of the adapter it was handed: as in job.py, the base is the reference
        # (else every log-ratio is 0 before the first step)
        trainer.model.delete_adapter("ref")
    return trainer


def loss(trainer, rows: list[int], weights=None) -> float:
    """The trainer's training loss on the examples `rows` (collated as in training), weighted or not."""
    examples = [dict(trainer.train_dataset[i]) for i in rows]
    for example, weight in zip(examples, weights or [None] * len(rows)):
        if weight is None:
            example.pop("weight")
        else:
            example["weight"] = weight
    batch = trainer.data_collator(examples)
    trainer.model.train()
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


def check_weighting(trainer, *, alone: bool = True) -> dict:
    """The weighted losses against the per-example ones. alone: each example's loss is also its
    loss in a batch of its own (not for KTO's KL term, which is estimated over the batch)."""
    unweighted = loss(trainer, [0, 1])
    l0, l1 = loss(trainer, [0, 1], [2.0, 0.0]), loss(trainer, [0, 1], [0.0, 2.0])
    assert l0 != pytest.approx(l1, abs=1e-4)  # the two examples differ: the weights have something to choose
    assert loss(trainer, [0, 1], [1.0, 1.0]) == pytest.approx(unweighted, abs=TOL)
    assert (l0 + l1) / 2 == pytest.approx(unweighted, abs=TOL)
    assert loss(trainer, [0, 1], [1.0, 3.0]) == pytest.approx((l0 + 3 * l1) / 2, abs=TOL)
    assert loss(trainer, [0, 1], [0.0, 0.0]) == 0.0
    if alone:
        assert l0 == pytest.approx(loss(trainer, [0]), abs=TOL)
        assert l1 == pytest.approx(loss(trainer, [1]), abs=TOL)
    return {"unweighted": unweighted, "l0": l0, "l1": l1}


def both_paths(method: str, tmp_path, monkeypatch, alone: bool = True, **settings) -> None:
    from alignment.training.dpo import PackedDPOTrainer
    from alignment.training.kto import PackedKTOTrainer
    from alignment.training.reward import PackedRewardTrainer

    packed_class = {"dpo": PackedDPOTrainer, "reward": PackedRewardTrainer, "kto": PackedKTOTrainer}[method]
    found = {}
    for public in (False, True):
        use_public(monkeypatch, public)
        trainer = build_trainer(method, tmp_path / str(public), **settings)
        assert isinstance(trainer, packed_class) is (not public)
        if not public:
            assert trainer._packed  # the packed rows, not TRL's batches behind the fast-path class
        found[public] = check_weighting(trainer, alone=alone)
    for key in found[False]:  # the fast path computes what TRL's path does
        assert found[False][key] == pytest.approx(found[True][key], abs=1e-4), key


def test_reward_loss_weights_each_pair(tmp_path, monkeypatch):
    both_paths("reward", tmp_path, monkeypatch, center_rewards_coefficient=0.1)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid,hinge"])
def test_dpo_loss_weights_each_pair(tmp_path, monkeypatch, loss_type):
    both_paths("dpo", tmp_path, monkeypatch, loss_type=loss_type.split(","), beta=5.0)


@pytest.mark.parametrize("loss_type", ["aot", "sft"])
def test_dpo_batch_losses_scale_by_the_batch_mean_weight(tmp_path, monkeypatch, loss_type):
    """aot sorts the batch and sft averages its tokens: no per-pair term, the batch loss times the mean weight."""
    for public in (False, True):
        use_public(monkeypatch, public)
        trainer = build_trainer("dpo", tmp_path / str(public), loss_type=[loss_type], beta=5.0)
        unweighted = loss(trainer, [0, 1])
        assert unweighted != 0.0
        assert loss(trainer, [0, 1], [2.0, 0.0]) == pytest.approx(unweighted, abs=TOL)
        assert loss(trainer, [0, 1], [0.5, 1.0]) == pytest.approx(0.75 * unweighted, abs=TOL)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_loss_weights_each_completion(tmp_path, monkeypatch, loss_type):
    # kto's KL term is estimated over the batch's KL completions: an example alone would see another one
    both_paths("kto", tmp_path, monkeypatch, alone=loss_type != "kto", loss_type=loss_type,
               desirable_weight=1.0, undesirable_weight=1.5)


def test_unweighted_data_trains_as_before(tmp_path, monkeypatch):
    """No weight column: TRL's collator and loss, nothing of the weighting in the way."""
    from alignment.training.common import WeightedCollator
    from alignment.training.dpo import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "plain"), **COMMON)
    trainer = DPOTrainer(model=lora(build("llama", seed=1)), args=args, train_dataset=pairs().remove_columns("weight"),
                         processing_class=tiny_tokenizer())
    assert not isinstance(trainer.data_collator, WeightedCollator) and trainer.args.remove_unused_columns
    weighted = build_trainer("dpo", tmp_path)
    assert isinstance(weighted.data_collator, WeightedCollator) and not weighted.args.remove_unused_columns


def test_weighted_steps_train(tmp_path, monkeypatch):
    """A real optimizer step through Trainer's dataloader: the weight column reaches the loss."""
    trainer = build_trainer("kto", tmp_path, max_steps=2)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry and "train_runtime" not in entry]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(logged)))


# --------------------------------------------------------------------------- the store


def two_rater_store(db_url: str, *, ann: float, bob: float, n_prompts: int = 6):
    """ann and bob vote on n prompts' pairs: both for the good answer on even prompts, on odd ones
    ann for the good and bob for the bad one."""
    from feedback_store.catalog import (
        add_comparison,
        add_prompt,
        add_response,
        get_or_create_policy,
    )
    from feedback_store.db import engine_for, session_scope
    from feedback_store.raters import get_or_create_local_user
    from feedback_store.votes import record_vote

    engine = engine_for(db_url)
    ids = {}
    with session_scope(engine) as session:
        policy = get_or_create_policy("default", session=session, base_model="default")
        raters = {}
        for name, weight in (("ann", ann), ("bob", bob)):
            rater = get_or_create_local_user(name, session=session)
            rater.weight = weight
            session.add(rater)
            raters[name] = rater
        for i in range(n_prompts):
            prompt, _ = add_prompt(f"{PROMPTS[i % 2]} {i}", session=session, split="train")
            good, _ = add_response(prompt.id, policy.id, f"{GOOD[i % 2]} {i}", session=session)
            bad, _ = add_response(prompt.id, policy.id, f"{BAD[i % 2]} {i}", session=session)
            comparison, _ = add_comparison(good, bad, session=session)
            good_side = "a" if comparison.response_a_id == good.id else "b"
            bad_side = "b" if good_side == "a" else "a"
            record_vote(comparison.id, raters["ann"].id, good_side, session=session)
            record_vote(comparison.id, raters["bob"].id, good_side if i % 2 == 0 else bad_side, session=session)
            ids[comparison.id] = (i, good.id, bad.id)
    return engine, ids


def test_weighted_export_from_a_sqlite_store(sqlite_url):
    """ann weighs 1, bob 3. Agreeing pairs: 1 + 3 = 4 behind the good answer. Disagreeing: bob's 3
    beats ann's 1, the bad answer wins, 3 behind it. Mean (4 + 3) / 2 -> 8/7 and 6/7."""
    from sqlmodel import Session

    from feedback_store.export import Selection, export_dpo, export_kto

    engine, ids = two_rater_store(sqlite_url, ann=1.0, bob=3.0)
    with Session(engine) as session:
        dpo = export_dpo(session=session, selection=Selection(weighted=True))
        kto = export_kto(session=session, selection=Selection(weighted=True))
        plain = export_dpo(session=session, selection=Selection())
    assert "weight" not in plain.column_names
    for row in dpo:
        i, good, bad = ids[row["comparison_id"]]
        assert row["chosen_response_id"] == (good if i % 2 == 0 else bad)
        assert row["weight"] == pytest.approx(8 / 7 if i % 2 == 0 else 6 / 7)
    assert len(dpo) == 6 and sum(dpo["weight"]) == pytest.approx(6.0)
    # KTO: the winner and the loser of a pair weigh what the pair does.
    assert [row["weight"] for row in kto] == pytest.approx([8 / 7, 8 / 7, 6 / 7, 6 / 7] * 3)


# --------------------------------------------------------------------------- end to end


def test_train_dpo_weighted_end_to_end(sqlite_url, tmp_path, capsys):
    from datasets import Dataset

    from alignment.training.runs import get_run
    from labeling.cli import main
    from tests.train_helpers import tiny_model

    engine, _ = two_rater_store(sqlite_url, ann=1.0, bob=3.0)
    model = tiny_model(tmp_path)
    capsys.readouterr()
    out = tmp_path / "run"
    code = main(["train", "dpo", "--db", sqlite_url, "--model", model, "--no-progress", "--weighted",
                 "--max-steps", "1", "--batch-size", "2", "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, (printed, capsys.readouterr())
    assert "note: weighted:" in printed
    data = Dataset.from_parquet(str(out / "data.parquet"))  # the snapshot --resume trains on
    assert sorted({round(w, 6) for w in data["weight"]}) == [round(6 / 7, 6), round(8 / 7, 6)]
    manifest = json.loads((out / "adapter" / "prefloop_run.json").read_text())
    assert manifest["weighted"] is True
    run_id = int(printed.split("run ")[1].split()[0])
    run = get_run(engine, run_id)
    assert run.config["weighted"] is True and run.status.value == "done"

    # Unweighted, the odd prompts are 1-1 draws (dropped): the three agreed pairs, no weight column.
    code = main(["train", "dpo", "--db", sqlite_url, "--model", model, "--no-progress", "--max-steps", "1",
                 "--batch-size", "2", "--output-dir", str(tmp_path / "plain"), "--set", "run.min_examples=2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    plain = get_run(engine, int(printed.split("run ")[1].split()[0]))
    assert plain.config["weighted"] is False and plain.snapshot_hash != run.snapshot_hash
    assert "note: weighted" not in printed
    assert "weight" not in Dataset.from_parquet(str(tmp_path / "plain" / "data.parquet")).column_names


def test_all_zero_weights_are_refused_before_training(sqlite_url, tmp_path, capsys):
    from sqlmodel import select

    from alignment.training.common import TrainingError, check_weights
    from feedback_store.db import read_scope
    from feedback_store.models import TrainingRun
    from labeling.cli import main
    from tests.train_helpers import tiny_model

    engine, _ = two_rater_store(sqlite_url, ann=0.0, bob=0.0)
    model = tiny_model(tmp_path)
    capsys.readouterr()
    code = main(["train", "dpo", "--db", sqlite_url, "--model", model, "--no-progress", "--weighted"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--weighted: every rater whose votes this selection counts has weight 0" in err
    with read_scope(engine) as session:
        assert session.exec(select(TrainingRun)).all() == []

    # A data file whose weights are all 0 (or negative): the same, before any run row.
    zeros = tmp_path / "zeros.jsonl"
    pairs((0.0, 0.0)).to_json(str(zeros))
    code = main(["train", "dpo", "--db", sqlite_url, "--model", model, "--no-progress", "--data", str(zeros),
                 "--set", "run.min_examples=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "every one of the 2 examples has weight 0" in err
    with pytest.raises(TrainingError, match="example 1 has weight -1.0"):
        check_weights(pairs((1.0, -1.0)))
    with read_scope(engine) as session:
        assert session.exec(select(TrainingRun)).all() == []
