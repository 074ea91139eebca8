"""The fast paths behind `alignment._compat` (TRL/transformers private members) and their
public-API fallbacks train to the same numbers on the same tiny model and data; an untested
library version turns the fast paths off with one warning and still trains.

Tolerances: losses and log-probs agree to 1e-4 (absolute; the packed and padded layouts sum the
same terms in another order, float32), weights after PPO steps to 1e-6."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from alignment import _compat
from alignment._compat import transformers as compat_transformers
from alignment._compat import trl as compat_trl
from tests.tiny_models import build, save_tiny_causal_lm, tiny_tokenizer

TOL = 1e-4
GOOD, BAD = "good yes answer explain", "bad no not"


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


def pairs(n: int = 6):
    from datasets import Dataset

    words = ["the capital", "a question", "what is it", "write a short poem", "explain this", "list three"]
    rows = [{"prompt": [{"role": "user", "content": words[i % len(words)]}],
             "chosen": [{"role": "assistant", "content": " ".join(GOOD.split()[: 1 + i % 4])}],
             "rejected": [{"role": "assistant", "content": " ".join(BAD.split()[: 1 + (i + 1) % 3])}]}
            for i in range(n)]
    return Dataset.from_list(rows)


def lora(model, **extra):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(123)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"], **extra))
    for name, param in model.named_parameters():  # B = 0 would make the first step's log-probs trivial
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model


COMMON = dict(max_steps=2, per_device_train_batch_size=3, learning_rate=5e-3, logging_steps=1, save_strategy="no",
              report_to="none", use_cpu=True, bf16=False, disable_tqdm=True, seed=0, lr_scheduler_type="constant")


def dpo_run(tmp_path, public: bool, monkeypatch, **settings):
    from alignment.training.dpo import DPOConfig, DPOTrainer

    use_public(monkeypatch, public)
    args = DPOConfig(output_dir=str(tmp_path / f"dpo-{public}"), **{**COMMON, **settings})
    trainer = DPOTrainer(model=lora(build("llama", seed=1)), args=args, train_dataset=pairs(),
                         processing_class=tiny_tokenizer())
    trainer.train()
    return trainer


def losses(trainer, key="loss"):
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_packed_fast_path_and_trl_public_path_agree(tmp_path, monkeypatch, precompute):
    from alignment.training.dpo import DPOTrainer, PackedDPOTrainer

    fast = dpo_run(tmp_path, False, monkeypatch, precompute_ref_log_probs=precompute)
    public = dpo_run(tmp_path, True, monkeypatch, precompute_ref_log_probs=precompute)
    assert type(fast) is PackedDPOTrainer and fast._packed
    assert type(public) is DPOTrainer and not isinstance(public, PackedDPOTrainer)
    for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
        a, b = losses(fast, key), losses(public, key)
        assert len(a) == len(b) == 2, key
        assert a == pytest.approx(b, abs=TOL), key


def reward_run(tmp_path, public: bool, monkeypatch, **settings):
    from alignment.training.reward import RewardConfig, RewardTrainer

    use_public(monkeypatch, public)
    args = RewardConfig(output_dir=str(tmp_path / f"reward-{public}"), **{**COMMON, **settings})
    trainer = RewardTrainer(model=lora(build("llama-reward", seed=2), modules_to_save=["score"]), args=args,
                            train_dataset=pairs(), processing_class=tiny_tokenizer())
    trainer.train()
    return trainer


def test_reward_packed_fast_path_and_trl_public_path_agree(tmp_path, monkeypatch):
    from alignment.training.reward import PackedRewardTrainer, RewardTrainer, pairwise_accuracy

    fast = reward_run(tmp_path, False, monkeypatch)
    fast_eval = pairwise_accuracy(fast, pairs(4))  # TRL's private dataset preparation
    public = reward_run(tmp_path, True, monkeypatch)
    public_eval = pairwise_accuracy(public, pairs(4))  # prefloop's public tokenization
    assert type(fast) is PackedRewardTrainer and fast._packed
    assert type(public) is RewardTrainer
    for key in ("loss", "accuracy", "margin"):
        assert losses(fast, key) == pytest.approx(losses(public, key), abs=TOL), key
    assert fast_eval["eval_pairs"] == public_eval["eval_pairs"] == 4
    assert fast_eval == pytest.approx(public_eval, abs=TOL)


def test_public_path_tokenizes_pairs_as_trl_does(tmp_path, monkeypatch):
    from alignment.training.reward import tokenize_pairs

    fast = reward_run(tmp_path, False, monkeypatch, max_steps=1)
    data = pairs(6)
    expected = compat_trl.prepare_reward_dataset(fast, data, "check")
    got = tokenize_pairs(data, tiny_tokenizer(), fast.args.max_length)
    assert got["chosen_ids"] == expected["chosen_ids"] and got["rejected_ids"] == expected["rejected_ids"]
    text = data.map(lambda e: {"prompt": e["prompt"][0]["content"], "chosen": " " + e["chosen"][0]["content"],
                               "rejected": " " + e["rejected"][0]["content"]})
    expected = compat_trl.prepare_reward_dataset(fast, text, "text")
    got = tokenize_pairs(text, tiny_tokenizer(), fast.args.max_length)
    assert got["chosen_ids"] == expected["chosen_ids"] and got["rejected_ids"] == expected["rejected_ids"]


def test_group_by_length_on_the_public_path_samples_at_random(tmp_path, monkeypatch):
    trainer = dpo_run(tmp_path, True, monkeypatch, max_steps=1, train_sampling_strategy="group_by_length")
    assert trainer.args.train_sampling_strategy == "random" and len(losses(trainer)) == 1


# --------------------------------------------------------------------------- SFT


def sft_rows(n: int = 6, shared: bool = True):
    from datasets import Dataset

    words = ["the capital", "a question", "what is it", "write a short poem", "explain this", "list three"]
    rows = [{"prompt": [{"role": "user", "content": ("same question" if shared and i < 2 else words[i % len(words)])}],
             "completion": [{"role": "assistant", "content": " ".join(GOOD.split()[: 1 + i % 4])}]} for i in range(n)]
    return Dataset.from_list(rows)


def sft_run(tmp_path, public: bool, monkeypatch, **settings):
    from alignment.training.sft import SFTConfig, SFTTrainer

    use_public(monkeypatch, public)
    args = SFTConfig(output_dir=str(tmp_path / f"sft-{public}"), **{**COMMON, **settings})
    trainer = SFTTrainer(model=lora(build("llama", seed=1)), args=args, train_dataset=sft_rows(),
                         processing_class=tiny_tokenizer())
    trainer.train()
    return trainer


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_sft_packed_fast_path_and_trl_public_path_agree(tmp_path, monkeypatch, loss_type):
    from alignment.training.sft import PackedSFTTrainer, SFTTrainer

    fast = sft_run(tmp_path, False, monkeypatch, loss_type=loss_type)
    public = sft_run(tmp_path, True, monkeypatch, loss_type=loss_type)
    assert type(fast) is PackedSFTTrainer and fast._packed
    assert type(public) is SFTTrainer and not isinstance(public, PackedSFTTrainer)
    for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens"):
        a, b = losses(fast, key), losses(public, key)
        assert len(a) == len(b) == 2, key
        assert a == pytest.approx(b, abs=TOL), key


def test_sft_packing_shares_the_batch_prefix():
    from alignment.training.packing import pack_sequences

    packed, index = pack_sequences([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7]])
    assert packed["input_ids"].tolist() == [[1, 2, 4, 3, 5, 6, 3, 7]] or packed["input_ids"].tolist() == \
        [[1, 2, 3, 4, 3, 5, 6, 7]]
    row = packed["input_ids"][0].tolist()
    assert [[row[i] for i in own] for own in index] == [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7]]
    assert packed["position_ids"][0].tolist() == [0, 1] + [2, 3] + [2, 3, 4] + [2]
    assert len(row) == 2 + 2 + 3 + 1  # the common prefix [1, 2] once


# --------------------------------------------------------------------------- KTO


def kto_rows(n: int = 6):
    from datasets import Dataset

    rows = []
    for pair in pairs(n // 2):  # as export_kto writes them: the winner, then the loser of one prompt
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return Dataset.from_list(rows)


def kto_run(tmp_path, public: bool, monkeypatch, **settings):
    from alignment.training.kto import KTOConfig, KTOTrainer

    use_public(monkeypatch, public)
    settings = {**COMMON, "per_device_train_batch_size": 4, "train_sampling_strategy": "sequential", **settings}
    args = KTOConfig(output_dir=str(tmp_path / f"kto-{public}"), **settings)
    trainer = KTOTrainer(model=lora(build("llama", seed=1)), args=args, train_dataset=kto_rows(8),
                         processing_class=tiny_tokenizer())
    trainer.train()
    return trainer


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_packed_fast_path_and_trl_public_path_agree(tmp_path, monkeypatch, loss_type):
    from alignment.training.kto import KTOTrainer, PackedKTOTrainer

    fast = kto_run(tmp_path, False, monkeypatch, loss_type=loss_type)
    public = kto_run(tmp_path, True, monkeypatch, loss_type=loss_type)
    assert type(fast) is PackedKTOTrainer and fast._packed
    assert type(public) is KTOTrainer and not isinstance(public, PackedKTOTrainer)
    keys = ["loss", "logps/chosen", "logps/rejected", "rewards/margins", "entropy", "logits/chosen", "num_tokens"]
    for key in keys + (["kl"] if loss_type == "kto" else []):
        a, b = losses(fast, key), losses(public, key)
        assert len(a) == len(b) == 2, key
        assert a == pytest.approx(b, abs=TOL), key


# --------------------------------------------------------------------------- PPO checkpoints


def length_reward(completions, prompts):
    return [len(text) / 20 for text in completions]


@pytest.fixture(scope="module")
def ppo_model_dir(tmp_path_factory):
    return str(save_tiny_causal_lm(tmp_path_factory.mktemp("models") / "ppo", initializer_range=0.3))


def ppo_trainer(model_dir, output_dir, **settings):
    from datasets import Dataset

    from alignment.models import ModelSpec, apply_adapter, load_model
    from alignment.models.adapters import AdapterConfig
    from alignment.training.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(0)
    model, tokenizer = load_model(ModelSpec(model_dir))
    model = apply_adapter(model, AdapterConfig(method="lora", r=4, alpha=8, dropout=0.0))
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": w}] for w in ("the", "a", "is", "of")]})
    config = PPOConfig(**{
        "output_dir": str(output_dir), "use_cpu": True, "report_to": "none", "disable_tqdm": True,
        "optim": "adamw_torch", "lr_scheduler_type": "linear", "learning_rate": 1e-2, "save_steps": 1,
        "save_total_limit": 2, "seed": 0, "rollout_batch_size": 4, "mini_batch_size": 2,
        "per_device_train_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 4, "temperature": 1.0,
        "max_steps": 3, **settings})
    return PPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                      reward_fn=length_reward)


def checkpoint_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {**load_file(str(folder / "adapter_model.safetensors")), **load_file(str(folder / "value_head.safetensors"))}


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_ppo_checkpoints_fast_and_public_agree_and_resume_across(ppo_model_dir, tmp_path, monkeypatch):
    # The public path also turns prefloop's decoding loop off (feature "decoding"), whose seeded
    # draws differ from generate's: both sides sample with generate, so only the checkpoints differ.
    monkeypatch.setenv("PREFLOOP_DECODE", "generate")
    runs = {}
    for public in (False, True):
        use_public(monkeypatch, public)
        trainer = ppo_trainer(ppo_model_dir, tmp_path / f"ppo-{public}")
        trainer.train()
        runs[public] = trainer
    out = {public: Path(t.args.output_dir) for public, t in runs.items()}
    for public in (False, True):  # same files, rotated to the last two
        assert sorted(p.name for p in out[public].glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
        for name in ("optimizer.pt", "scheduler.pt", "trainer_state.json", "value_head.safetensors"):
            assert (out[public] / "checkpoint-3" / name).is_file(), (public, name)
    assert_same_tensors(checkpoint_tensors(out[False] / "checkpoint-3"), checkpoint_tensors(out[True] / "checkpoint-3"))
    for key in ("loss", "reward", "learning_rate", "kl"):
        assert losses(runs[False], key) == pytest.approx(losses(runs[True], key), abs=TOL), key
    assert losses(runs[True], "learning_rate")[-1] < 1e-2  # the linear schedule's value, read publicly

    # A checkpoint written by either path resumes on the other to the uninterrupted run's weights.
    for saved_public in (False, True):
        use_public(monkeypatch, not saved_public)
        resumed = ppo_trainer(ppo_model_dir, tmp_path / f"resume-{saved_public}")
        resumed.train(resume_from_checkpoint=str(out[saved_public] / "checkpoint-2"))
        assert resumed.state.global_step == 3
        resumed.save_checkpoint()
        assert_same_tensors(checkpoint_tensors(Path(resumed.args.output_dir) / "checkpoint-3"),
                            checkpoint_tensors(out[saved_public] / "checkpoint-3"))


# --------------------------------------------------------------------------- untested versions


def test_untested_trl_turns_the_fast_paths_off_with_one_warning_and_still_trains(tmp_path, monkeypatch, caplog):
    from alignment.training.dpo import DPOTrainer, PackedDPOTrainer
    from alignment.training.reward import RewardTrainer

    real = _compat.installed_version
    monkeypatch.setattr(_compat, "installed_version",
                        lambda library: Version("99.1") if library == "trl" else real(library))
    with caplog.at_level(logging.WARNING, logger="prefloop.compat"):
        assert not compat_trl.fast_path_enabled("dpo")
        trainer = dpo_run(tmp_path, False, monkeypatch)
        reward = reward_run(tmp_path, False, monkeypatch, max_steps=1)
        assert not compat_trl.fast_path_enabled("reward")
    assert type(trainer) is DPOTrainer and not isinstance(trainer, PackedDPOTrainer)
    assert type(reward) is RewardTrainer
    assert len(losses(trainer)) == 2 and all(torch.isfinite(torch.tensor(losses(trainer))))
    warnings = [r for r in caplog.records if r.name == "prefloop.compat"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "trl 99.1" in message and ">=1.16" in message and "<1.17" in message
    # transformers is still a tested version: its own fast paths stay on
    assert compat_transformers.fast_path_enabled("packing")


def test_untested_transformers_turns_packing_and_checkpoints_off(monkeypatch, caplog):
    from alignment.training import packing

    real = _compat.installed_version
    monkeypatch.setattr(_compat, "installed_version",
                        lambda library: Version("6.0") if library == "transformers" else real(library))
    with caplog.at_level(logging.WARNING, logger="prefloop.compat"):
        assert not packing.supports_packing(build("llama"))
        assert not compat_transformers.fast_path_enabled("checkpoints")
        assert not compat_trl.fast_path_enabled("dpo")  # its hooks were written against transformers 5.24 too
    warnings = [r for r in caplog.records if r.name == "prefloop.compat"]
    assert len(warnings) == 1 and "transformers 6.0" in warnings[0].getMessage()


def test_environment_forces_the_public_path(monkeypatch):
    from alignment.training import packing

    assert compat_trl.fast_path_enabled("dpo") and packing.supports_packing(build("llama"))
    monkeypatch.setenv(_compat.ENV, "public")
    assert not compat_trl.fast_path_enabled("dpo") and not compat_trl.fast_path_enabled("reward")
    assert not compat_trl.fast_path_enabled("sft") and not compat_trl.fast_path_enabled("kto")
    assert not compat_transformers.fast_path_enabled("packing")
    assert not compat_transformers.fast_path_enabled("checkpoints")
    assert not packing.supports_packing(build("llama"))
    with pytest.raises(ValueError, match="unknown"):
        compat_trl.fast_path_enabled("orpo")
