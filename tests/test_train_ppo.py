"""PPO: its arithmetic against plain loops and hand-worked cases, a tiny policy that learns what a
programmatic reward asks for, and `prefloop train ppo` end to end on a reward model trained by a
real `train reward` run (run row, snapshot, curves, policy, checkpoints, errors, abort, resume)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sqlmodel import select

from alignment.training import ppo_math
from alignment.training.common import TrainingError
from alignment.training.job import TrainRequest, run_training
from alignment.training.runs import get_run, run_metrics, start_run
from feedback_store.db import read_scope, session_scope
from feedback_store.export import export, snapshot
from feedback_store.models import PolicyVersion, Prompt, RunStatus, TrainingRun
from labeling.cli import main
from tests.tiny_models import save_tiny_causal_lm
from tests.train_helpers import preference_store, tiny_model

# --------------------------------------------------------------------------- rewards for the tests


def good_share(completions, prompts):
    """Share of the words of each completion that are "good"."""
    return [sum(word == "good" for word in text.split()) / max(1, len(text.split())) for text in completions]


def text_length(completions, prompts):
    """A dense reward (every completion scores differently) for runs too short to find a rare word."""
    return [len(text) / 20 for text in completions]


def nan_reward(completions, prompts):
    return [float("nan")] * len(completions)


# --------------------------------------------------------------------------- the arithmetic


def _ragged(lengths, width, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.array([[1.0 if t < n else 0.0 for t in range(width)] for n in lengths])
    return rng.normal(size=(len(lengths), width)), rng.normal(size=(len(lengths), width)), mask


def test_gae_and_returns_match_a_plain_loop():
    rewards, values, mask = _ragged([5, 3, 1, 6], width=6)
    gamma, lam = 0.9, 0.8
    advantages, returns = ppo_math.gae(torch.tensor(rewards), torch.tensor(values), torch.tensor(mask),
                                       gamma=gamma, lam=lam)
    for row, n in enumerate([5, 3, 1, 6]):
        expected = np.zeros(n)
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[row, t + 1] if t + 1 < n else 0.0  # the episode ends at the last real token
            delta = rewards[row, t] + gamma * next_value - values[row, t]
            running = delta + gamma * lam * running
            expected[t] = running
        np.testing.assert_allclose(advantages[row, :n].numpy(), expected, rtol=1e-10)
        np.testing.assert_allclose(returns[row, :n].numpy(), expected + values[row, :n], rtol=1e-10)
        assert (advantages[row, n:] == 0).all() and (returns[row, n:] == 0).all()


def test_token_rewards_pay_kl_per_token_and_score_at_the_end():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -9.0], [-2.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    rewards, kl = ppo_math.token_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0, 0.0], [-0.1, 0.0, 0.0, -1.0]]))


def test_clipped_policy_loss_on_hand_cases():
    old = torch.zeros(1, 4)
    # ratios 1.5, 0.5, 1.1, 0.7 against advantages +1, +1, -1, -1
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, clipped = ppo_math.policy_loss(new, old, advantages, torch.ones(1, 4), cliprange=0.2)
    # per token max(-A r, -A clip(r)): -1.2 (clipped), -0.5, 1.1, 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4)
    assert clipped.item() == pytest.approx(0.5)
    masked, _ = ppo_math.policy_loss(new, old, advantages, torch.tensor([[1.0, 1.0, 0.0, 0.0]]), cliprange=0.2)
    assert masked.item() == pytest.approx((-1.2 - 0.5) / 2)


def test_clipped_value_loss_on_hand_cases():
    old = torch.tensor([[0.0, 0.0, 1.0]])
    new = torch.tensor([[0.5, 0.1, 1.0]])
    returns = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipped = ppo_math.value_loss(new, old, returns, torch.ones(1, 3), cliprange_value=0.2)
    # token 0: unclipped (0.5-1)^2=0.25, clipped (0.2-1)^2=0.64 -> 0.64; token 1: 0.81 both; token 2: 1 both
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 1.0) / 3)
    assert clipped.item() == pytest.approx(1 / 3)


def test_whitening_over_the_mask():
    values, _, mask = _ragged([4, 2, 3], width=4, seed=1)
    values = values * 5 + 3
    whitened = ppo_math.masked_whiten(torch.tensor(values), torch.tensor(mask)).numpy()
    kept = values[mask == 1]
    np.testing.assert_allclose(whitened[mask == 1], (kept - kept.mean()) / np.sqrt(kept.var(ddof=1) + 1e-8),
                               rtol=1e-6)
    assert (whitened[mask == 0] == 0).all()
    unshifted = ppo_math.masked_whiten(torch.tensor(values), torch.tensor(mask), shift_mean=False).numpy()
    assert unshifted[mask == 1].mean() == pytest.approx(kept.mean())


def test_response_mask_keeps_the_end_token_and_drops_what_follows():
    tokens = torch.tensor([[5, 6, 3, 0, 0], [5, 3, 3, 7, 8], [5, 6, 7, 8, 9], [3, 1, 1, 1, 1], [5, 9, 6, 1, 0]])
    mask = ppo_math.response_mask(tokens, {3, 9})
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert ppo_math.last_index(mask).tolist() == [2, 1, 4, 0, 1]


def test_token_logprobs_and_entropy():
    logits = torch.randn(2, 3, 7)
    tokens = torch.randint(0, 7, (2, 3))
    expected = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(ppo_math.token_logprobs(logits, tokens), expected, atol=1e-6)
    uniform = ppo_math.entropy_from_logits(torch.zeros(1, 1, 8))
    assert uniform.item() == pytest.approx(np.log(8))


def test_kl_controller_fixed_and_adaptive():
    fixed = ppo_math.KLController(0.1)
    assert fixed.update(50.0, 1000) == 0.1
    adaptive = ppo_math.KLController(0.1, target=6.0, horizon=1000)
    assert adaptive.update(12.0, 100) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error capped at +20%
    assert adaptive.update(5.7, 100) == pytest.approx(0.1 * 1.02 * (1 - 0.05 * 0.1))
    assert adaptive.update(0.0, 1000) == pytest.approx(0.1 * 1.02 * 0.995 * 0.8)


def test_prompt_order_covers_each_prompt_once_per_epoch():
    from alignment.training.ppo import prompt_indices

    drawn = [i for step in range(6) for i in prompt_indices(10, 5, step, seed=3)]
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:20]) == list(range(10))
    assert drawn[:10] != drawn[10:20]  # reshuffled each epoch
    assert prompt_indices(10, 5, 4, seed=3) == drawn[20:25]  # a resumed run draws the same


# --------------------------------------------------------------------------- the trainer on a tiny model


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory):
    """A tiny Llama with larger random weights: its logits span a few nats, so a LoRA can move them.
    (At the usual 0.02 init the tied output layer caps every logit change near 0.6 nats.)"""
    return str(save_tiny_causal_lm(tmp_path_factory.mktemp("models") / "sharp", initializer_range=0.3))


def _trainer(model_path, tmp_path, reward_fn, **settings):
    from datasets import Dataset

    from alignment.models import ModelSpec, apply_adapter, load_model
    from alignment.models.adapters import AdapterConfig
    from alignment.training.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(0)
    model, tokenizer = load_model(ModelSpec(model_path))
    model = apply_adapter(model, AdapterConfig(method="lora", r=8, alpha=16, dropout=0.1))
    words = ["the", "a", "is", "are", "was", "to", "of", "and", "in", "that", "it", "for", "on", "with", "as",
             "at"]
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": w}] for w in words]})
    config = PPOConfig(**{
        "output_dir": str(tmp_path / "out"), "use_cpu": True, "report_to": "none", "disable_tqdm": True,
        "optim": "adamw_torch", "lr_scheduler_type": "constant", "save_steps": 1000, "seed": 0,
        "rollout_batch_size": 16, "mini_batch_size": 8, "per_device_train_batch_size": 4, "ppo_epochs": 4,
        "max_new_tokens": 8, "temperature": 1.0, "kl_coef": 0.01, **settings})
    return PPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                      reward_fn=reward_fn)


def test_rollout_masks_after_the_end_token_and_starts_at_ratio_one(sharp_model_dir, tmp_path):
    from transformers.trainer_callback import TrainerState

    trainer = _trainer(sharp_model_dir, tmp_path, good_share, generation_batch_size=5)
    the = trainer.tokenizer.convert_tokens_to_ids("the")
    trainer.model.generation_config.eos_token_id = [trainer.tokenizer.eos_token_id, the]  # "the" ends a completion
    trainer.stop_ids = {trainer.tokenizer.eos_token_id, the}
    seen = []
    trainer.reward_fn = lambda completions, prompts: seen.extend(completions) or good_share(completions, prompts)
    trainer.state = TrainerState()
    batch = trainer.rollout(0)

    tokens, mask = batch.responses.tolist(), batch.mask
    ended = [row.index(the) if the in row else None for row in tokens]
    assert any(e is not None and e < len(row) - 1 for e, row in zip(ended, tokens))  # some stop early
    for row, end, m in zip(tokens, ended, mask.tolist()):
        length = len(row) if end is None else end + 1
        assert m == [1.0] * length + [0.0] * (len(row) - length)
    for name in ("values", "advantages", "returns"):
        assert (getattr(batch, name)[mask == 0] == 0).all(), name
    assert all("the" not in text.split() for text in seen)  # nothing after the end token is scored
    assert abs(ppo_math.masked_mean(batch.advantages, mask).item()) < 1e-5  # whitened

    # Before any update the policy's log-probs (in training mode, micro-batched) are the rollout's: ratio 1.
    trainer.create_optimizer_and_scheduler(10)
    trainer.model.train()
    logprobs, values, entropies = trainer._score(batch.input_ids[:4], batch.attention_mask[:4], batch.prompt_width,
                                                 batch.responses[:4], values=True, entropy=True)
    assert torch.allclose(logprobs * mask[:4], batch.logprobs[:4] * mask[:4], atol=1e-5)
    assert torch.allclose(values * mask[:4], batch.values[:4], atol=1e-5)

    # The scoring path (backbone + chunked LM head on the completion tokens only) is the full-logits one.
    assert trainer._backbone is not None
    logits, full_values = trainer._forward(batch.input_ids[:4], batch.attention_mask[:4], batch.prompt_width,
                                           values=True)
    assert torch.allclose(logprobs, ppo_math.token_logprobs(logits, batch.responses[:4]), atol=1e-5)
    assert torch.allclose(entropies, ppo_math.entropy_from_logits(logits), atol=1e-4)
    assert torch.allclose(values, full_values, atol=1e-6)
    weights = torch.linspace(0.5, 1.5, logprobs.numel()).view_as(logprobs)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    chunked = torch.autograd.grad((logprobs * weights).sum(), trainable)
    full = torch.autograd.grad((ppo_math.token_logprobs(logits, batch.responses[:4]) * weights).sum(), trainable)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(chunked, full))


def test_sampler_and_ppo_log_probs_agree_under_left_padding(sharp_model_dir, tmp_path):
    """PPO's forward (left-padded prompts, explicit positions) scores exactly the distribution
    `generate` sampled from: the rollouts are on-policy."""
    trainer = _trainer(sharp_model_dir, tmp_path, good_share, temperature=0.7)
    tokenizer = trainer.tokenizer
    trainer.model.generation_config.suppress_tokens = None  # sample from the plain softmax
    texts = ["<|user|> the a is are was to of </s> <|assistant|>", "<|user|> the </s> <|assistant|>"]
    batch = tokenizer.pad({"input_ids": tokenizer(texts, add_special_tokens=False)["input_ids"]},
                          padding_side="left", return_tensors="pt")
    trainer.model.eval()
    torch.manual_seed(0)
    out = trainer.model.generate(**batch, do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=5,
                                 pad_token_id=tokenizer.pad_token_id, output_scores=True, return_dict_in_generate=True)
    width = batch["input_ids"].size(1)
    responses = out.sequences[:, width:]
    sampled = torch.stack([s.log_softmax(-1) for s in out.scores], 1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(responses)], 1)
    with torch.no_grad():
        logprobs, _, _ = trainer._score(out.sequences, mask, width, responses, values=False)
    assert torch.allclose(logprobs, sampled, atol=1e-4)


def test_rollouts_sample_the_lora_policy_through_the_decoding_loop(sharp_model_dir, tmp_path, monkeypatch):
    """Rollouts go through `prefloop generate`'s static-cache loop on the policy's base, whose LoRA
    layers are in place: greedy, it gives the LoRA policy's `generate` tokens, not the base's."""
    from alignment import decoding

    trainer = _trainer(sharp_model_dir, tmp_path, good_share)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)  # a policy well away from its base
    trainer.model.eval()
    tokenizer, pad = trainer.tokenizer, trainer.tokenizer.pad_token_id
    batch = tokenizer.pad({"input_ids": trainer.prompt_ids[:4]}, padding_side="left", return_tensors="pt")
    base = trainer.model.get_base_model()
    assert decoding.supports(base)

    def greedy(**kw):
        return decoding.decode(base, batch["input_ids"], batch["attention_mask"], max_new_tokens=6,
                               stop_ids=trainer.stop_ids, pad_id=pad, **kw)

    ours = greedy()
    theirs = trainer.model.generate(**batch, do_sample=False, max_new_tokens=6, pad_token_id=pad)
    assert torch.equal(ours, theirs[:, batch["input_ids"].size(1):][:, :ours.size(1)])
    with trainer.model.disable_adapter():
        assert not torch.equal(greedy(), ours)  # the adapter is in the loop

    calls, top_k = [], base.generation_config.top_k
    real = decoding.decode
    monkeypatch.setattr(decoding, "decode", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    first = trainer._generate(trainer.prompt_ids[:4], step=3)
    assert len(calls) == 1 and calls[0]["temperature"] == trainer.args.temperature and calls[0]["top_p"] == 1.0
    assert base.generation_config.top_k == top_k  # set to 0 for the call only
    assert trainer._generate(trainer.prompt_ids[:4], step=3) == first  # seeded: a resumed run samples the same
    assert all(len(row) <= trainer.args.max_new_tokens for row in first)
    monkeypatch.setenv(decoding.ENV, "generate")  # the switch back to transformers' generate
    assert trainer._generate(trainer.prompt_ids[:4], step=3) and len(calls) == 2  # not through decode


def test_policy_learns_what_the_reward_asks_for(sharp_model_dir, tmp_path):
    trainer = _trainer(sharp_model_dir, tmp_path, good_share, max_steps=12, learning_rate=1e-2)
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    assert len(rewards) == 12
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert last > first + 0.08, rewards  # from ~3% "good" words to well above
    entropies = [entry["entropy"] for entry in trainer.state.log_history if "entropy" in entry]
    assert entropies[-1] < entropies[0]  # the policy sharpened towards the rewarded word
    kls = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    assert kls[0] == pytest.approx(0.0, abs=1e-5) and kls[-1] > 0.5  # starts at the reference, moves away


def test_what_ppo_cannot_train_is_refused(sharp_model_dir, tmp_path):
    from datasets import Dataset

    from alignment.models import ModelSpec, load_model
    from alignment.training.ppo import PPOConfig, PPOTrainer

    model, tokenizer = load_model(ModelSpec(sharp_model_dir))
    with pytest.raises(TrainingError, match="PPO trains a LoRA or DoRA adapter"):
        PPOTrainer(model=model, args=PPOConfig(output_dir=str(tmp_path), use_cpu=True),
                   train_dataset=Dataset.from_dict({"prompt": ["a"]}), processing_class=tokenizer,
                   reward_fn=good_share)
    with pytest.raises(ValueError, match="mini_batch_size=9"):
        PPOConfig(output_dir=str(tmp_path), rollout_batch_size=8, mini_batch_size=9)
    with pytest.raises(TrainingError, match="no prompt fits: every one is longer than .* = 2 tokens"):
        _trainer(sharp_model_dir, tmp_path, good_share, max_length=10, max_new_tokens=8)


# --------------------------------------------------------------------------- end to end through the store

FAST = {"max_steps": 2, "save_steps": 1, "rollout_batch_size": 4, "mini_batch_size": 2,
        "per_device_train_batch_size": 2, "ppo_epochs": 2, "max_new_tokens": 4, "optim": "adamw_torch"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("models"))


@pytest.fixture
def store(sqlite_url):
    return preference_store(sqlite_url, n_prompts=6, ratings=False)


@pytest.fixture
def reward_run(store, model_dir, tmp_path) -> int:
    """A reward model from a real `train reward` run on the store's votes."""
    result = run_training(TrainRequest("reward", model=model_dir, overrides=[{
        "trainer": {"max_steps": 2, "per_device_train_batch_size": 4, "optim": "adamw_torch"},
        "run": {"runs_dir": str(tmp_path / "runs")}}]), engine=store, progress=False)
    return result.run_id


def ppo(engine, model_path, tmp_path, *, callbacks=(), **trainer):
    overrides = {"trainer": {**FAST, **trainer}, "run": {"runs_dir": str(tmp_path / "runs")}}
    return run_training(TrainRequest("ppo", model=model_path, overrides=[overrides]), engine=engine,
                        progress=False, callbacks=callbacks)


def test_prompts_export_and_snapshot(db_url):
    """PPO's data: every stored prompt in id order (SQLite and PostgreSQL)."""
    from feedback_store.catalog import add_prompt

    engine = preference_store(db_url, n_prompts=3, ratings=False)
    with session_scope(engine) as session:
        extra, _ = add_prompt([{"role": "system", "content": "be brief"}, {"role": "user", "content": "why"}],
                              session=session, source="import")
        extra_id = extra.id
    with read_scope(engine) as session:
        dataset = export("prompts", session=session)
        stored = {p.id: p.messages for p in session.exec(select(Prompt))}
    assert dataset["prompt_id"] == sorted(stored) and dataset["prompt_id"][-1] == extra_id
    assert dataset[-1]["prompt"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why"}]
    assert dataset[-1]["source"] == "import"
    ids, digest = snapshot(dataset)
    assert ids == {"comparison_ids": [], "response_ids": [], "prompt_ids": sorted(stored)} and len(digest) == 64


def test_cli_trains_ppo_on_a_reward_run(sqlite_url, store, reward_run, model_dir, tmp_path, capsys):
    out = tmp_path / "ppo"
    code = main(["train", "ppo", "--db", sqlite_url, "--model", model_dir, "--reward-run", str(reward_run),
                 "--max-steps", "2", "--rollout-batch-size", "4", "--mini-batch-size", "2", "--batch-size", "2",
                 "--ppo-epochs", "2", "--max-new-tokens", "4", "--kl-coef", "0.02", "--output-dir", str(out),
                 "--set", "ppo.save_steps=1", "--set", "trainer.optim=adamw_torch", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    run_id = reward_run + 1
    assert f"run {run_id} done" in printed and f"registered policy 'ppo-{run_id}'" in printed
    assert "final_reward=" in printed

    run = get_run(store, run_id)
    assert run.kind == "ppo" and run.status == RunStatus.done and run.error is None
    reward_path = get_run(store, reward_run).output_path
    assert run.config["trainer"]["reward_model"] == reward_path and run.config["trainer"]["kl_coef"] == 0.02
    # The snapshot: every stored prompt, ids and hash as the store exports them now.
    with read_scope(store) as session:
        ids, digest = snapshot(export("prompts", session=session))
        prompt_ids = sorted(p.id for p in session.exec(select(Prompt)))
    assert run.snapshot_ids == ids and ids["prompt_ids"] == prompt_ids and run.snapshot_hash == digest
    # Curves, one row per PPO step.
    metrics = run_metrics(store, run_id)
    for name in ("reward", "kl", "policy_loss", "value_loss", "clip_fraction", "entropy", "response_length",
                 "loss", "learning_rate"):
        assert [m.step for m in metrics if m.name == name] == [1, 2], name
    assert run.metrics["global_step"] == 2 and "final_reward" in run.metrics
    # The adapter is saved and trained; the checkpoint also holds the value head and the KL coefficient.
    assert run.output_path == str(out / "adapter")
    lora_b = [t for name, t in load_file(str(out / "adapter" / "adapter_model.safetensors")).items()
              if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)
    head = load_file(str(out / "checkpoint-2" / "value_head.safetensors"))
    assert head["weight"].abs().sum() > 0
    assert json.loads((out / "checkpoint-2" / "ppo_state.json").read_text())["kl_coef"] == 0.02
    with session_scope(store) as session:
        policy = session.exec(select(PolicyVersion).where(PolicyVersion.training_run_id == run_id)).one()
        assert policy.name == f"ppo-{run_id}" and policy.adapter_path == str(out / "adapter")
        assert policy.base_model == model_dir and session.get(PolicyVersion, policy.parent_id).name == model_dir


def test_bad_reward_runs_are_one_line_errors(sqlite_url, store, model_dir, tmp_path, capsys):
    running = start_run(store, kind="reward", config={}, snapshot_ids={}, snapshot_hash=None, seed=0,
                        base_model=model_dir)
    other = start_run(store, kind="dpo", config={}, snapshot_ids={}, snapshot_hash=None, seed=0, base_model=model_dir)
    cases = [
        (["--reward-run", "99"], "--reward-run 99: no training run with that id"),
        (["--reward-run", str(other)], f"run {other} is a dpo run, not a reward run"),
        (["--reward-run", str(running)], f"reward run {running} is running, not done"),
        (["--reward-model", str(tmp_path)], "not a prefloop reward model"),
        ([], "PPO needs a reward"),
        (["--reward-function", "tests.test_train_ppo:nope"], "cannot import it"),
    ]
    for argv, message in cases:
        code = main(["train", "ppo", "--db", sqlite_url, "--model", model_dir, "--no-progress", *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    with session_scope(store) as session:  # nothing half-written: no ppo run row was created
        assert session.exec(select(TrainingRun).where(TrainingRun.kind == "ppo")).all() == []


def test_nan_reward_aborts_the_run(store, model_dir, tmp_path):
    with pytest.raises(TrainingError, match="aborted.*reward became nan"):
        ppo(store, model_dir, tmp_path, reward_function="tests.test_train_ppo:nan_reward")
    [run] = [r for r in _runs(store) if r.kind == "ppo"]
    assert run.status == RunStatus.aborted and "nan" in run.error
    with pytest.raises(TrainingError, match="aborted.*became nan"):
        ppo(store, model_dir, tmp_path, reward_function="tests.test_train_ppo:text_length",
            learning_rate=float("inf"))
    assert all(r.status == RunStatus.aborted for r in _runs(store))
    with session_scope(store) as session:
        assert session.exec(select(PolicyVersion).where(PolicyVersion.training_run_id.is_not(None))).all() == []


def _runs(engine):
    with session_scope(engine) as session:
        return list(session.exec(select(TrainingRun)))


def test_interrupt_aborts_and_resume_finishes_from_the_checkpoint(store, model_dir, tmp_path):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):  # dies during step 2; checkpoint-1 exists
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ppo(store, model_dir, tmp_path, callbacks=[Kill()], reward_function="tests.test_train_ppo:text_length")
    run = get_run(store, 1)
    assert run.status == RunStatus.aborted and "interrupted" in run.error
    checkpoint = Path(run.config["settings"]["run"]["output_dir"]) / "checkpoint-1"
    assert (checkpoint / "value_head.safetensors").is_file()
    saved_head = load_file(str(checkpoint / "value_head.safetensors"))["weight"]

    resumed = run_training(TrainRequest("ppo", model=model_dir, overrides=[{"run": {"resume": True}}]),
                           engine=store, progress=False)
    assert resumed.run_id == 1 and resumed.status == "done" and resumed.metrics["global_step"] == 2
    assert [m.step for m in run_metrics(store, 1) if m.name == "reward"] == [1, 2]  # step 1 not repeated
    final_head = load_file(str(checkpoint.parent / "checkpoint-2" / "value_head.safetensors"))["weight"]
    assert not torch.equal(saved_head, final_head)  # training went on from the saved head

    # The same run without the interruption ends with the same adapter and value head: the resume
    # restored the adapter, value head, optimizer, schedule and KL coefficient, and drew the same
    # prompts and samples.
    whole = ppo(store, model_dir, tmp_path, reward_function="tests.test_train_ppo:text_length")
    whole_dir = Path(whole.output_path).parent
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        a = load_file(str(checkpoint.parent / "checkpoint-2" / name))
        b = load_file(str(whole_dir / "checkpoint-2" / name))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    rewards = {run: [m.value for m in run_metrics(store, run) if m.name == "reward"] for run in (1, whole.run_id)}
    assert rewards[1] == pytest.approx(rewards[whole.run_id])


def test_ppo_settings_from_presets_and_flags():
    from alignment.training.job import resolve_settings

    preset = resolve_settings(TrainRequest("ppo", preset="cpu-lora"))["trainer"]
    assert preset["learning_rate"] == 5e-5 and preset["save_steps"] == 10  # the preset's ppo section
    # A command-line --learning-rate (a `trainer` layer) beats the preset's `ppo:` section.
    flagged = resolve_settings(TrainRequest("ppo", preset="cpu-lora", overrides=[{"trainer": {"learning_rate": 1e-3}}]))
    assert flagged["trainer"]["learning_rate"] == 1e-3
    assert flagged["_sources"]["trainer.learning_rate"] == "command line"


def test_qlora_preset_and_a_prompt_file(store, model_dir, tmp_path):
    """The seed's recipe (4-bit base, gradient checkpointing, paged AdamW -> torch's on CPU) runs PPO;
    `--data` takes a file of plain-text prompts instead of the store's."""
    from datasets import Dataset

    path = tmp_path / "prompts.parquet"
    Dataset.from_dict({"prompt": ["what is the capital", "explain the model", "write a short poem", "yes or no"]}
                      ).to_parquet(path)
    result = run_training(TrainRequest("ppo", model=model_dir, preset="seed-qlora", overrides=[{
        "trainer": {**FAST, "optim": "paged_adamw_32bit", "reward_function": "tests.test_train_ppo:text_length"},
        "run": {"runs_dir": str(tmp_path / "runs"), "data": str(path)}}]), engine=store, progress=False)
    run = get_run(store, result.run_id)
    assert run.status == RunStatus.done and run.config["settings"]["model"]["quantize"] == "4bit"
    assert run.config["trainer"]["gradient_checkpointing"] is True and run.config["data"] == f"file:{path}"
    assert run.snapshot_ids == {"comparison_ids": [], "response_ids": []}
    lora_b = [t for name, t in load_file(str(Path(result.output_path) / "adapter_model.safetensors")).items()
              if "lora_B" in name]
    assert lora_b and all(t.dtype == torch.float32 and t.abs().sum() > 0 for t in lora_b)


def test_reward_model_of_another_architecture(store, model_dir, tmp_path):
    """A small encoder scorer (no chat template, its own tokenizer) rates the Llama policy's decoded
    completions; given by path with --reward-model."""
    from tests.tiny_models import build, tiny_tokenizer

    path = tmp_path / "bert"
    build("bert").save_pretrained(path)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    scorer_run = run_training(TrainRequest("reward", model=str(path), overrides=[{
        "trainer": {"max_steps": 2, "optim": "adamw_torch"}, "run": {"runs_dir": str(tmp_path / "runs")}}]),
        engine=store, progress=False)
    result = ppo(store, model_dir, tmp_path, reward_model=scorer_run.output_path)
    run = get_run(store, result.run_id)
    assert run.status == RunStatus.done and run.config["trainer"]["reward_model"] == scorer_run.output_path
    rewards = [m.value for m in run_metrics(store, result.run_id) if m.name == "reward"]
    assert len(rewards) == 2 and all(np.isfinite(rewards)) and any(r != 0 for r in rewards)
