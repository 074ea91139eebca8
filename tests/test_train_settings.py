"""The settings prefloop changes for the machine and the data, so users never meet the traps."""

from __future__ import annotations

import pytest
from datasets import Dataset

from alignment.training import kto
from alignment.training.common import TrainingError, device_settings


def test_cpu_settings():
    settings, notes = device_settings(
        {"optim": "paged_adamw_32bit", "padding_free": True, "per_device_train_batch_size": 1},
        method="dpo", cuda=False, flash_attention=False,
    )
    assert settings["optim"] == "adamw_torch_fused" and settings["use_cpu"] is True
    assert settings["bf16"] is False and settings["fp16"] is False  # TRL would turn bf16 on
    assert settings["padding_free"] is False
    assert settings["per_device_train_batch_size"] == 1  # only KTO needs two
    assert any("paged_adamw_32bit" in n for n in notes) and any("padding_free" in n for n in notes)
    with pytest.raises(TrainingError, match="fp16 mixed precision needs a GPU"):
        device_settings({"fp16": True}, method="sft", cuda=False)


def test_kto_batch_and_sampler():
    settings, notes = device_settings({"per_device_train_batch_size": 1, "train_sampling_strategy": "group_by_length"},
                                      method="kto", cuda=False)
    assert settings["per_device_train_batch_size"] == 2 and settings["train_sampling_strategy"] == "sequential"
    assert len(notes) == 2


def test_kto_class_weights_from_the_ratio():
    data = Dataset.from_dict({"label": [True, True, True, False]})
    assert kto.adjust({}, data) == {"desirable_weight": 1.0, "undesirable_weight": 3.0}
    data = Dataset.from_dict({"label": [False] * 6 + [True] * 2})
    assert kto.adjust({}, data) == {"desirable_weight": 3.0, "undesirable_weight": 1.0}
    # weights given by the user stay as given
    assert kto.adjust({"desirable_weight": 2.0}, data)["desirable_weight"] == 2.0
    assert kto.adjust({"auto_class_weights": False}, data).get("desirable_weight") is None
