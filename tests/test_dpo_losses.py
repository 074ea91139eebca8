"""Every DPO loss `prefloop train dpo --loss-type` offers trains one step on a tiny model with a
finite loss, through prefloop's DPOTrainer (the packed fast path where this TRL is tested, TRL's
own batches otherwise), and the list offered is exactly what TRL's DPOConfig accepts."""

from __future__ import annotations

import copy
import math
import re

import pytest

from labeling.cli.train_command import DPO_LOSSES

PAIRS = [
    ("what is the capital of france", "paris is the capital", "no not what"),
    ("explain the answer", "good answer yes", "bad or but"),
    ("write a short poem", "good poem yes", "no but what"),
    ("list three questions", "the answer is yes", "bad no not"),
]
# the losses that need a setting besides the loss type (TRL refuses exo_pair without smoothing)
EXTRA = {"exo_pair": {"label_smoothing": 1e-3}}


def test_offered_losses_are_trls():
    """DPO_LOSSES is the list TRL 1.16's DPOConfig documents and its loss code dispatches on."""
    import inspect

    from trl.trainer.dpo_trainer import DPOTrainer

    source = inspect.getsource(DPOTrainer)
    dispatched = set(re.findall(r'loss_type == "(\w+)"', source))
    assert set(DPO_LOSSES) == dispatched
    assert len(DPO_LOSSES) == len(set(DPO_LOSSES)) == 15


@pytest.fixture(scope="module")
def base():
    from tests.tiny_models import build, tiny_tokenizer

    return build("llama", tie_word_embeddings=True), tiny_tokenizer()


@pytest.fixture(scope="module")
def pairs():
    from datasets import Dataset

    prompts, chosen, rejected = zip(*PAIRS)
    return Dataset.from_dict({"prompt": list(prompts), "chosen": list(chosen), "rejected": list(rejected)})


@pytest.mark.parametrize("loss_type", DPO_LOSSES)
def test_every_dpo_loss_trains_a_step(loss_type, base, pairs, tmp_path):
    from peft import LoraConfig, get_peft_model

    from alignment.training.dpo import DPOConfig, DPOTrainer

    model, tokenizer = base
    model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    config = DPOConfig(
        output_dir=str(tmp_path), loss_type=[loss_type], beta=0.1, max_steps=1, per_device_train_batch_size=4,
        learning_rate=1e-3, max_length=32, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, gradient_checkpointing=False, disable_tqdm=True, dataloader_pin_memory=False,
        **EXTRA.get(loss_type, {}),
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer)
    trainer.train()
    [logged] = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 1
    assert math.isfinite(logged["loss"]), logged
    assert math.isfinite(logged["grad_norm"]), logged


def test_exo_pair_without_label_smoothing_is_a_one_line_error_before_the_run(sqlite_url, tmp_path, capsys):
    """TRL raises a bare ValueError inside the trainer; prefloop refuses it before any run row."""
    from sqlmodel import select

    from alignment.training.common import TrainingError
    from alignment.training.dpo import resolve
    from feedback_store.db import read_scope
    from feedback_store.models import TrainingRun
    from labeling.cli import main
    from tests.train_helpers import preference_store, tiny_model

    for settings in ({"loss_type": ["exo_pair"]}, {"loss_type": "sigmoid,exo_pair", "label_smoothing": 0.0}):
        with pytest.raises(TrainingError, match="exo_pair needs --label-smoothing > 0"):
            resolve(settings, None)
    assert resolve({"loss_type": ["exo_pair"], "label_smoothing": 1e-3}, None)["label_smoothing"] == 1e-3
    assert resolve({"loss_type": ["ipo"]}, None) == {"loss_type": ["ipo"]}

    engine = preference_store(sqlite_url, n_prompts=4, ratings=False)
    model = tiny_model(tmp_path)
    capsys.readouterr()  # the model's save progress
    code = main(["train", "dpo", "--db", sqlite_url, "--model", model, "--no-progress", "--loss-type", "exo_pair"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--loss-type exo_pair needs --label-smoothing > 0" in err and len(err.splitlines()) == 1
    with read_scope(engine) as session:
        assert session.exec(select(TrainingRun)).all() == []
