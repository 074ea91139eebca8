"""PPO's reward model on the policy's base (alignment/training/shared_reward.py): a reward run's
LoRA adapter as a second adapter of the policy scores exactly as RewardScorer (its own copy of
the base) does, for LoRA and DoRA policies and on a 4-bit base; a PPO run then holds one base
model, never trains the reward adapter and saves the policy adapter alone; anything it cannot
share (another base, a merged parent, another quantization) falls back to the separate scorer."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from alignment.reward_scoring import RewardScorer
from alignment.training import shared_reward
from alignment.training.job import TrainRequest, run_training
from alignment.training.runs import get_run
from feedback_store.db import upgrade
from feedback_store.models import RunStatus
from tests.train_helpers import float_4bit_kernels, preference_store, tiny_model

PROMPTS = ["what is the capital", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why"}],
           "write a short poem"]
ANSWERS = ["paris is the capital of france", "yes", "good answer " * 12]
FAST = {"max_steps": 2, "save_steps": 1, "rollout_batch_size": 4, "mini_batch_size": 2,
        "per_device_train_batch_size": 2, "ppo_epochs": 2, "max_new_tokens": 4, "optim": "adamw_torch"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A store, a tiny base, and a real `train reward` run on it whose LoRA matrices are then made
    clearly non-zero (two steps barely move them): the reward adapter must visibly matter."""
    root = tmp_path_factory.mktemp("shared")
    url = f"sqlite:///{root / 'prefloop.db'}"
    upgrade(url)
    engine = preference_store(url, n_prompts=6, ratings=False)
    model = tiny_model(root / "models")
    run = run_training(TrainRequest("reward", model=model, overrides=[{
        "trainer": {"max_steps": 2, "per_device_train_batch_size": 4, "optim": "adamw_torch"},
        "run": {"runs_dir": str(root / "runs")}}]), engine=engine, progress=False)
    weights = Path(run.output_path) / shared_reward.ADAPTER_WEIGHTS
    generator = torch.Generator().manual_seed(0)
    tensors = {k: v + 0.3 * torch.randn(v.shape, generator=generator) if "lora_B" in k else v
               for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    return {"engine": engine, "model": model, "reward": run.output_path, "reward_run": run.run_id, "root": root}


def _policy(model_path, method="lora", quantize="none"):
    from alignment.models import ModelSpec, apply_adapter, load_model
    from alignment.models.adapters import AdapterConfig

    model, tokenizer = load_model(ModelSpec(model_path, quantize=quantize, device="cpu"))
    return apply_adapter(model, AdapterConfig(method=method, r=8, alpha=16, dropout=0.0)), tokenizer


def _copy_reward(source, target: Path, **spec) -> str:
    shutil.copytree(source, target)
    manifest = json.loads((target / "prefloop_run.json").read_text())
    manifest["model_spec"].update(spec)
    (target / "prefloop_run.json").write_text(json.dumps(manifest))
    return str(target)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_shared_adapter_scores_as_the_reward_scorer(setup, method):
    policy, tokenizer = _policy(setup["model"], method)
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    scorer, why_not = shared_reward.attach(policy, tokenizer, setup["reward"], device="cpu")
    assert why_not is None and isinstance(scorer, shared_reward.SharedRewardScorer)
    expected = RewardScorer.load(setup["reward"], device="cpu").score_batch(PROMPTS, ANSWERS, batch_size=2)
    policy.train()
    got = scorer.score_batch(PROMPTS, ANSWERS, batch_size=2)
    assert got == pytest.approx(expected, abs=1e-4)
    assert max(expected) - min(expected) > 1e-3  # distinct texts, distinct scores: not a constant
    # the policy is as it was: its adapter active and trainable, training mode, the reward adapter frozen
    assert policy.active_adapter == "default" and policy.training
    assert {name for name, p in policy.named_parameters() if p.requires_grad} == trainable
    # the reward adapter is what makes those scores: without it the same backbone scores otherwise
    with torch.no_grad(), policy.disable_adapter():
        ids = tokenizer.pad({"input_ids": [scorer.token_ids(PROMPTS[0], ANSWERS[0])]}, return_tensors="pt")
        hidden = scorer.backbone(**ids, use_cache=False).last_hidden_state
        bare = scorer.head(hidden[:, -1]).item()
    assert abs(bare - expected[0]) > 1e-3
    scorer.detach()
    assert "reward" not in policy.peft_config and not any(".reward." in n for n, _ in policy.named_parameters())
    with pytest.raises(RuntimeError, match="detached"):
        scorer.score_batch(PROMPTS, ANSWERS)


def test_shared_adapter_on_a_4bit_base(setup, tmp_path, monkeypatch):
    float_4bit_kernels(monkeypatch)
    reward = _copy_reward(setup["reward"], tmp_path / "reward-4bit", quantize="4bit")
    policy, tokenizer = _policy(setup["model"], "lora", quantize="4bit")
    scorer, why_not = shared_reward.attach(policy, tokenizer, reward, device="cpu")
    assert why_not is None
    expected = RewardScorer.load(reward, device="cpu").score_batch(PROMPTS, ANSWERS)
    assert scorer.score_batch(PROMPTS, ANSWERS) == pytest.approx(expected, abs=1e-4)


def test_what_cannot_share_says_why_and_leaves_the_policy_alone(setup, tmp_path):
    policy, tokenizer = _policy(setup["model"])
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    other_base = tiny_model(tmp_path / "other", seed=1)
    cases = [
        (_copy_reward(setup["reward"], tmp_path / "r-other", model=other_base), "was trained on"),
        (_copy_reward(setup["reward"], tmp_path / "r-4bit", quantize="4bit"), "loads in 4bit"),
        (_copy_reward(setup["reward"], tmp_path / "r-bf16", dtype="bfloat16"), None),  # RewardScorer ignores dtype
    ]
    for path, reason in cases:
        scorer, why_not = shared_reward.attach(policy, tokenizer, path, device="cpu")
        if reason is None:
            assert why_not is None and scorer is not None
            scorer.detach()
        else:
            assert scorer is None and reason in why_not, why_not
    full = tmp_path / "r-full"
    _copy_reward(setup["reward"], full)
    manifest = json.loads((full / "prefloop_run.json").read_text())
    (full / "prefloop_run.json").write_text(json.dumps({**manifest, "adapter_kind": "model"}))
    assert "not a LoRA adapter" in shared_reward.sharing_problem(policy, full, device="cpu")
    policy.get_base_model().prefloop_merged_parent = "dpo-3"  # lineage.start_model's mark
    assert "merged into its weights" in shared_reward.sharing_problem(policy, setup["reward"], device="cpu")
    assert list(policy.peft_config) == ["default"]
    assert all(torch.equal(before[name], p) for name, p in policy.named_parameters())


def test_ppo_run_holds_one_base_and_never_trains_the_reward_adapter(setup, tmp_path, monkeypatch):
    import alignment.models
    from alignment.models import load_model as real_load_model

    loads = []
    monkeypatch.setattr(alignment.models, "load_model",
                        lambda spec, **kw: loads.append((spec.model, kw.get("head"))) or real_load_model(spec, **kw))
    seen = {}

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            seen["reward"] = {n: p.detach().clone() for n, p in model.named_parameters() if ".reward." in n}
            optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
            seen["optimized"] = [n for n, p in model.named_parameters() if id(p) in optimized and ".reward." in n]

        def on_step_end(self, args, state, control, model=None, **kwargs):
            now = {n: p for n, p in model.named_parameters() if ".reward." in n}
            seen.setdefault("steps", []).append(
                now.keys() == seen["reward"].keys()
                and all(torch.equal(p, seen["reward"][n]) and not p.requires_grad for n, p in now.items()))
            seen.setdefault("policy_moved", []).append(any(
                "lora_B.default" in n and p.abs().sum() > 0 for n, p in model.named_parameters()))

    result = run_training(TrainRequest("ppo", model=setup["model"], overrides=[{
        "trainer": {**FAST, "reward_model": setup["reward"]}, "run": {"output_dir": str(tmp_path / "ppo")}}]),
        engine=setup["engine"], progress=False, callbacks=[Watch()])
    assert result.status == "done" and get_run(setup["engine"], result.run_id).status == RunStatus.done
    assert loads == [(setup["model"], "causal_lm")]  # the policy's base, and no second model
    assert seen["reward"] and seen["optimized"] == []
    assert seen["steps"] == [True, True] and seen["policy_moved"][-1]
    # what is saved is the policy: no reward adapter in the checkpoints or the result
    for folder in (tmp_path / "ppo" / "checkpoint-1", tmp_path / "ppo" / "checkpoint-2", Path(result.output_path)):
        assert (folder / "adapter_model.safetensors").is_file() and not (folder / "reward").exists(), folder
        saved = load_file(str(folder / "adapter_model.safetensors"))
        assert saved and not any("score" in k for k in saved)
        assert json.loads((folder / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def test_ppo_falls_back_to_a_separate_reward_model_for_another_base(setup, tmp_path, caplog):
    other = tiny_model(tmp_path / "other", seed=1)
    with caplog.at_level(logging.WARNING, logger="prefloop.train"):
        result = run_training(TrainRequest("ppo", model=other, overrides=[{
            "trainer": {**FAST, "save_steps": 100, "reward_model": setup["reward"]},
            "run": {"output_dir": str(tmp_path / "ppo")}}]), engine=setup["engine"], progress=False)
    assert result.status == "done"
    [line] = [r.getMessage() for r in caplog.records if "reward model" in r.getMessage()]
    assert "loaded as a second model" in line and "was trained on" in line
