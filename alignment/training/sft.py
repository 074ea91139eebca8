"""Supervised fine-tuning (the seed's practical example): TRL's `SFTTrainer` on the winners
and human edits exported from the store (`export_sft`), or on any parquet/JSONL file in one
of TRL's formats (`text`, `messages`, or `prompt`/`completion`).
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer as TRLSFTTrainer

from alignment.training.common import GuardedTraining, MethodSpec


@dataclass
class SFTConfig(TRLSFTConfig):
    """TRL's SFTConfig as is: the store export is prompt/completion, so the loss covers the
    completion only (TRL's `completion_only_loss` default)."""


class SFTTrainer(GuardedTraining, TRLSFTTrainer):
    """TRL's SFTTrainer, stopping on a non-finite loss."""


METHOD = MethodSpec(
    name="sft",
    config_class=SFTConfig,
    trainer_class=SFTTrainer,
    export="sft",
    required_columns=(("prompt", "completion"), ("messages",), ("text",)),
)
