"""ORPO and SimPO (TRL's experimental ORPO and CPO trainers) from the store's preference pairs:
they run and register a policy like the other methods, learn the preference on a tiny model,
and refuse data of the wrong kind before any step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sqlmodel import select

from alignment.training.common import TrainingError
from alignment.training.job import TrainRequest, run_training
from alignment.training.runs import get_run, run_metrics
from feedback_store.db import session_scope
from feedback_store.models import PolicyVersion, RunStatus, TrainingRun
from tests.train_helpers import preference_store, tiny_model

FAST = {"max_steps": 3, "save_steps": 2, "per_device_train_batch_size": 4}
METHODS = ("orpo", "simpo")


@pytest.fixture
def store(sqlite_url):
    return preference_store(sqlite_url, n_prompts=12)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("models"))


def request(method, model_path, tmp_path, *, trainer=None, **sections) -> TrainRequest:
    overrides = {"trainer": {**FAST, **(trainer or {})}, "run": {"runs_dir": str(tmp_path / "runs")}}
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    return TrainRequest(method, model=model_path, overrides=[overrides])


def train(engine, method, model_path, tmp_path, *, callbacks=(), **kwargs):
    return run_training(request(method, model_path, tmp_path, **kwargs), engine=engine, progress=False,
                        callbacks=callbacks)


def lora_b(path: str) -> list[torch.Tensor]:
    return [t for name, t in load_file(str(Path(path) / "adapter_model.safetensors")).items() if "lora_B" in name]


@pytest.mark.parametrize("method", METHODS)
def test_trains_records_and_registers_a_policy(method, store, model_dir, tmp_path):
    result = train(store, method, model_dir, tmp_path)
    assert result.status == "done" and result.policy_name == f"{method}-{result.run_id}"
    weights = lora_b(result.output_path)
    assert weights and all(t.abs().sum() > 0 for t in weights)

    run = get_run(store, result.run_id)
    assert run.kind == method and run.status == RunStatus.done and run.config["data"] == "store:dpo"
    assert run.metrics["global_step"] == 3 and "final_rewards/margins" in run.metrics
    assert [m.step for m in run_metrics(store, run.id) if m.name == "loss"] == [1, 2, 3]
    assert [m.step for m in run_metrics(store, run.id) if m.name == "rewards/margins"] == [1, 2, 3]
    with session_scope(store) as session:
        [policy] = session.exec(select(PolicyVersion).where(PolicyVersion.training_run_id == run.id)).all()
        assert policy.adapter_path == result.output_path and policy.base_model == model_dir
        assert session.get(PolicyVersion, policy.parent_id).name == model_dir
    trainer = run.config["trainer"]
    if method == "simpo":
        assert (trainer["loss_type"], trainer["beta"], trainer["simpo_gamma"], trainer["cpo_alpha"]) == (
            "simpo", 2.0, 1.0, 0.0)
    else:
        assert trainer["beta"] == 0.1


def _margin(trainer) -> float:
    """TRL's own reward margin (beta times the chosen's minus the rejected's average log-prob)
    over every training pair, the model in eval mode."""
    model = trainer.model
    model.eval()
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    with torch.no_grad():
        _, metrics = trainer.get_batch_loss_metrics(model, trainer.data_collator(rows), train_eval="eval")
    model.train()
    return float(metrics["eval_rewards/margins"])


@pytest.mark.parametrize("method", METHODS)
def test_learns_the_preference(method, store, model_dir, tmp_path):
    """12 pairs whose chosen answers use good words and rejected ones bad words: a few epochs on
    LoRA raise the margin between them well above where the base model has it."""
    built = run_training(request(method, model_dir, tmp_path,
                                 trainer={"max_steps": 15, "learning_rate": 1e-2, "save_steps": 100}),
                         engine=store, progress=False, build_only=True)
    trainer = built.trainer
    before = _margin(trainer)
    trainer.train()
    after = _margin(trainer)
    beta = trainer.args.beta
    # the chosen's average log-prob minus the rejected's (the reward margin over beta) rises by a
    # quarter of a nat per token or more (about 0.3 for ORPO, whose loss is mostly the chosen's
    # NLL, well over 1 for SimPO), and the chosen ends ahead
    assert (after - before) / beta > 0.25, (before, after)
    assert after > 0, (before, after)


def test_ratings_given_to_orpo_or_simpo_are_refused_before_training(store, model_dir, tmp_path):
    from datasets import Dataset

    path = tmp_path / "ratings.jsonl"
    Dataset.from_dict({"prompt": ["explain"] * 4, "completion": ["good yes", "bad no"] * 2,
                       "label": [True, False] * 2}).to_json(path)
    for method in METHODS:
        with pytest.raises(TrainingError, match=f"{method} needs columns prompt/chosen/rejected or chosen/rejected "
                                                r"\(found prompt, completion, label\)"):
            train(store, method, model_dir, tmp_path, run={"data": str(path)})
    with session_scope(store) as session:
        assert session.exec(select(TrainingRun)).all() == []  # refused before a run existed


def test_a_store_with_ratings_only_has_no_pairs_for_them(sqlite_url, model_dir, tmp_path):
    from feedback_store.db import engine_for
    from feedback_store.models import Vote

    engine = preference_store(sqlite_url, n_prompts=4)
    with session_scope(engine) as session:
        for vote in session.exec(select(Vote)).all():
            session.delete(vote)
    engine = engine_for(sqlite_url)
    with pytest.raises(TrainingError, match="no orpo training data in the store"):
        train(engine, "orpo", model_dir, tmp_path)
    [run] = get_runs(engine)
    assert run.status == RunStatus.failed and "no orpo training data" in run.error


def get_runs(engine):
    with session_scope(engine) as session:
        return session.exec(select(TrainingRun)).all()


def test_simpo_refuses_a_loss_that_is_not_simpo(store, model_dir, tmp_path):
    with pytest.raises(TrainingError, match="simpo: loss_type must be one of simpo, alphapo, not 'ipo'"):
        train(store, "simpo", model_dir, tmp_path, simpo={"loss_type": "ipo"})


@pytest.mark.parametrize(("method", "setting"), [
    ("orpo", {"adapter": {"method": "dora"}}),
    ("simpo", {"model": {"quantize": "4bit"}, "trainer": {"gradient_checkpointing": True}}),
    ("orpo", {"trainer": {"train_sampling_strategy": "group_by_length"}}),
])
def test_adapters_quantization_and_length_grouping(method, setting, store, model_dir, tmp_path):
    settings = dict(setting)
    result = train(store, method, model_dir, tmp_path, trainer={"max_steps": 2, **settings.pop("trainer", {})},
                   **settings)
    weights = lora_b(result.output_path)
    assert weights and all(t.abs().sum() > 0 and t.dtype == torch.float32 for t in weights)


def test_from_a_policy_and_resumed(store, model_dir, tmp_path):
    """SimPO from an ORPO policy (its parent), killed after step 3 and resumed from checkpoint-2."""
    from transformers import TrainerCallback

    parent = train(store, "orpo", model_dir, tmp_path, trainer={"max_steps": 2})

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(store, "simpo", model_dir, tmp_path, trainer={"max_steps": 4}, run={"from_policy": parent.policy_name},
              callbacks=[Kill()])
    resumed = run_training(TrainRequest("simpo", model=model_dir, overrides=[{"run": {"resume": True}}]),
                           engine=store, progress=False)
    assert resumed.status == "done" and resumed.metrics["global_step"] == 4
    assert [m.step for m in run_metrics(store, resumed.run_id) if m.name == "loss"] == [1, 2, 3, 4]
    with session_scope(store) as session:
        policy = session.exec(select(PolicyVersion).where(PolicyVersion.name == resumed.policy_name)).one()
        assert session.get(PolicyVersion, policy.parent_id).name == parent.policy_name


def test_cli_flags_land_in_the_method_section():
    from labeling.cli import build_parser
    from labeling.cli.train_command import overrides_from_args

    args = build_parser().parse_args(["train", "simpo", "--beta", "2.5", "--simpo-gamma", "1.4", "--cpo-alpha", "0.1"])
    assert overrides_from_args(args) == [{"simpo": {"beta": 2.5, "simpo_gamma": 1.4, "cpo_alpha": 0.1}}]
    args = build_parser().parse_args(["train", "orpo", "--beta", "0.2", "--max-steps", "5"])
    assert overrides_from_args(args) == [{"orpo": {"beta": 0.2}, "trainer": {"max_steps": 5}}]
