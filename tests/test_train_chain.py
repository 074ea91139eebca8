"""Runs that start from a stored policy (`--from-policy`): the parent is where the run starts
and what it is held to, the result is one policy that loads on its own and gives exactly the
model trained, and the lineage is in the store, parent to child."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from sqlmodel import select
from transformers import TrainerCallback

from alignment.models import ModelSpec, PolicyPool, load_model
from alignment.training.common import TrainingError
from alignment.training.job import TrainRequest, run_training
from alignment.training.runs import find_policy, lineage, run_metrics
from feedback_store.catalog import get_or_create_policy
from feedback_store.db import session_scope
from feedback_store.models import PolicyVersion, RunStatus, TrainingRun
from tests.train_helpers import float_4bit_kernels, preference_store, tiny_model

FAST = {"max_steps": 2, "save_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1}
PROBE = torch.tensor([[4, 20, 30, 40, 5, 50, 60]])  # a fixed input whose logits are compared


@pytest.fixture
def store(sqlite_url):
    return preference_store(sqlite_url, n_prompts=8, ratings=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("models"))


def train(engine, method, model_path, tmp_path, *, from_policy=None, callbacks=(), trainer=None, **sections):
    overrides = {"trainer": {**FAST, **(trainer or {})}, "run": {"runs_dir": str(tmp_path / "runs")}}
    if from_policy:
        overrides["run"]["from_policy"] = from_policy
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    return run_training(TrainRequest(method, model=model_path, overrides=[overrides]), engine=engine,
                        progress=False, callbacks=callbacks)


class Logits(TrainerCallback):
    """The probe's logits from the model in memory: at the start (adapter off = the reference)
    and at the end of training."""

    def __init__(self):
        self.reference = self.final = None

    @staticmethod
    def _probe(model):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=PROBE.to(model.device)).logits.float().cpu()
        model.train(was_training)
        return logits

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if hasattr(model, "disable_adapter") and "ref" not in model.peft_config:
            with model.disable_adapter():
                self.reference = self._probe(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.final = self._probe(model)


def policy_logits(engine, name, **spec):
    policy = find_policy(engine, name)
    model, _ = load_model(ModelSpec(policy.base_model, adapter_path=policy.adapter_path, **spec))
    with torch.no_grad():
        return model(input_ids=PROBE).logits.float()


def step_metric(engine, run_id, name, step=1):
    return next(m.value for m in run_metrics(engine, run_id) if m.name == name and m.step == step)


def test_dpo_from_an_sft_policy_starts_at_its_reference(store, model_dir, tmp_path):
    sft = train(store, "sft", model_dir, tmp_path, trainer={"learning_rate": 5e-2})
    parent = policy_logits(store, sft.policy_name)
    assert not torch.allclose(parent, policy_logits(store, model_dir), atol=1e-3)  # the SFT moved it

    seen = Logits()
    dpo = train(store, "dpo", model_dir, tmp_path, from_policy=sft.policy_name, callbacks=[seen],
                trainer={"max_steps": 1})
    # The reference is the SFT policy, not the bare base...
    torch.testing.assert_close(seen.reference, parent, atol=1e-5, rtol=1e-5)
    # ...and at step 0 the policy is its reference: no margin, the sigmoid loss is log 2.
    assert step_metric(store, dpo.run_id, "rewards/margins") == pytest.approx(0.0, abs=1e-5)
    assert step_metric(store, dpo.run_id, "loss") == pytest.approx(math.log(2), abs=1e-5)


def test_a_chain_of_three_reloads_as_trained_and_records_its_lineage(store, model_dir, tmp_path):
    sft = train(store, "sft", model_dir, tmp_path, trainer={"learning_rate": 5e-2})
    first = train(store, "dpo", model_dir, tmp_path, from_policy=sft.policy_name, trainer={"learning_rate": 5e-2})
    seen = Logits()
    second = train(store, "dpo", model_dir, tmp_path, from_policy="latest", callbacks=[seen],
                   trainer={"learning_rate": 5e-2})

    chain = lineage(store, second.policy_name)
    assert [p.name for p in chain] == [model_dir, sft.policy_name, first.policy_name, second.policy_name]
    assert all(p.base_model == model_dir for p in chain)  # every link loads on the same base
    with session_scope(store) as session:
        run = session.get(TrainingRun, second.run_id)
        assert run.config["from_policy"]["name"] == first.policy_name  # "latest" as it resolved
        assert run.config["settings"]["run"]["from_policy"] == first.policy_name

    assert not torch.allclose(seen.final, policy_logits(store, first.policy_name), atol=1e-3)  # it trained
    # Reloaded on its own, the policy is the model held in memory at the end of training.
    torch.testing.assert_close(policy_logits(store, second.policy_name), seen.final, atol=1e-4, rtol=1e-4)
    # So are its ancestors, side by side in one pool, and it generates.
    from alignment.generation import SamplingConfig

    pool = PolicyPool.load(ModelSpec(model_dir))
    for policy in chain[1:]:
        pool.add(policy.name, policy.adapter_path)
    with pool.use(second.policy_name) as model, torch.no_grad():
        torch.testing.assert_close(model(input_ids=PROBE).logits, seen.final, atol=1e-4, rtol=1e-4)
    with pool.use(sft.policy_name) as model, torch.no_grad():
        torch.testing.assert_close(model(input_ids=PROBE).logits, policy_logits(store, sft.policy_name))
    chats = [[{"role": "user", "content": "what is the capital of france"}]]
    assert pool.generate(second.policy_name, chats, SamplingConfig(max_new_tokens=4, temperature=0.0))


def test_full_fine_tuning_from_a_lora_policy_saves_the_merged_model(store, model_dir, tmp_path):
    sft = train(store, "sft", model_dir, tmp_path, trainer={"learning_rate": 5e-2, "max_steps": 1})
    seen = Logits()
    full = train(store, "kto", model_dir, tmp_path, from_policy=sft.policy_name, callbacks=[seen],
                 adapter={"method": "full"}, trainer={"max_steps": 1})
    policy = find_policy(store, full.policy_name)
    assert policy.adapter_path is None and policy.base_model == full.output_path
    assert lineage(store, full.policy_name)[-2].name == sft.policy_name
    torch.testing.assert_close(policy_logits(store, full.policy_name), seen.final, atol=1e-4, rtol=1e-4)


def test_ppo_from_a_policy_is_held_to_it(store, model_dir, tmp_path):
    sft = train(store, "sft", model_dir, tmp_path, trainer={"learning_rate": 5e-2, "max_steps": 1})
    ppo = train(store, "ppo", model_dir, tmp_path, from_policy=sft.policy_name, trainer={
        "max_steps": 1, "rollout_batch_size": 4, "mini_batch_size": 2, "per_device_train_batch_size": 2,
        "ppo_epochs": 1, "max_new_tokens": 4, "optim": "adamw_torch",
        "reward_function": "tests.test_train_ppo:text_length"})
    # The first rollout comes before any update: the policy is its reference, the parent.
    assert step_metric(store, ppo.run_id, "kl") == pytest.approx(0.0, abs=1e-4)
    assert find_policy(store, ppo.policy_name).parent_id == find_policy(store, sft.policy_name).id


def test_resume_of_a_run_from_a_policy(store, model_dir, tmp_path):
    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    sft = train(store, "sft", model_dir, tmp_path, trainer={"learning_rate": 5e-2, "max_steps": 1})
    with pytest.raises(KeyboardInterrupt):
        train(store, "dpo", model_dir, tmp_path, from_policy="latest", callbacks=[Kill()],
              trainer={"max_steps": 4})
    seen = Logits()
    resumed = run_training(TrainRequest("dpo", model=model_dir, overrides=[{"run": {"resume": True}}]),
                           engine=store, progress=False, callbacks=[seen])
    assert resumed.status == "done" and resumed.metrics["global_step"] == 4
    assert find_policy(store, resumed.policy_name).parent_id == find_policy(store, sft.policy_name).id
    torch.testing.assert_close(policy_logits(store, resumed.policy_name), seen.final, atol=1e-4, rtol=1e-4)


def test_4bit_run_from_a_policy_keeps_the_parent_as_reference(store, model_dir, tmp_path, monkeypatch):
    float_4bit_kernels(monkeypatch)
    four_bit = {"quantize": "4bit"}
    sft = train(store, "sft", model_dir, tmp_path, model=four_bit, trainer={"learning_rate": 5e-2, "max_steps": 1})
    seen = Logits()
    dpo = train(store, "dpo", model_dir, tmp_path, from_policy=sft.policy_name, model=four_bit, callbacks=[seen],
                trainer={"max_steps": 2, "learning_rate": 5e-2})
    assert any("frozen copy of it is the reference" in note for note in dpo.notes)
    # At step 0 the trained adapter is the parent's and the reference its frozen copy.
    assert step_metric(store, dpo.run_id, "rewards/margins") == pytest.approx(0.0, abs=1e-5)
    assert step_metric(store, dpo.run_id, "loss") == pytest.approx(math.log(2), abs=1e-5)
    assert not (Path(dpo.output_path) / "ref").exists()  # the copy is not part of the result
    assert not torch.allclose(seen.final, policy_logits(store, sft.policy_name, quantize="4bit"), atol=1e-3)
    torch.testing.assert_close(policy_logits(store, dpo.policy_name, quantize="4bit"), seen.final,
                               atol=1e-4, rtol=1e-4)
    assert lineage(store, dpo.policy_name)[-2].name == sft.policy_name


def _nothing_recorded(engine, policies_before: int) -> None:
    with session_scope(engine) as session:
        assert session.exec(select(TrainingRun).where(TrainingRun.status == RunStatus.running)).all() == []
        assert len(session.exec(select(PolicyVersion)).all()) == policies_before


def test_bad_starting_points_are_refused_before_anything_is_recorded(store, model_dir, tmp_path):
    with session_scope(store) as session:
        other = tiny_model(tmp_path, name="mistral")
        get_or_create_policy("on-mistral", session=session, base_model=other)
        before = len(session.exec(select(PolicyVersion)).all())

    with pytest.raises(TrainingError, match="no policy named 'nope' .*stored policies"):
        train(store, "dpo", model_dir, tmp_path, from_policy="nope")
    with pytest.raises(TrainingError, match="no trained policy yet"):
        train(store, "kto", model_dir, tmp_path, from_policy="latest")
    with pytest.raises(TrainingError, match="'on-mistral' was trained on base model .*tiny-mistral.* this run is on"):
        train(store, "sft", model_dir, tmp_path, from_policy="on-mistral")
    with pytest.raises(TrainingError, match="reward model starts from a base model"):
        train(store, "reward", model_dir, tmp_path, from_policy="on-mistral")
    _nothing_recorded(store, before)
    with session_scope(store) as session:
        assert session.exec(select(TrainingRun)).all() == []

    sft = train(store, "sft", model_dir, tmp_path, trainer={"max_steps": 1})
    with session_scope(store) as session:
        before = len(session.exec(select(PolicyVersion)).all())
    with pytest.raises(TrainingError, match="a dora run on it could not be saved as one policy"):
        train(store, "dpo", model_dir, tmp_path, from_policy=sft.policy_name, adapter={"method": "dora"})
    _nothing_recorded(store, before)


def test_cli_flag(store, model_dir, sqlite_url, tmp_path, capsys):
    from labeling.cli import main

    argv = ["train", "sft", "--db", sqlite_url, "--model", model_dir, "--no-progress", "--max-steps", "1",
            "--output-dir", str(tmp_path / "out")]
    assert main([*argv, "--from-policy", "nope"]) == 2
    assert "--from-policy nope: no policy named 'nope'" in capsys.readouterr().err
    assert main([*argv, "--policy-name", "first"]) == 0
    assert main([*argv[:-1], str(tmp_path / "out2"), "--from-policy", "latest", "--policy-name", "second"]) == 0
    assert "registered policy 'second'" in capsys.readouterr().out
    assert [p.name for p in lineage(store, "second")][-2:] == ["first", "second"]
