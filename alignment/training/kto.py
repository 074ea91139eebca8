"""KTO from unpaired signals: TRL's `KTOTrainer` on the thumbs-up/down ratings and on pairs
split into a desirable winner and an undesirable loser (`export_kto`).

The KTO paper balances the two classes with weights such that
`desirable_weight * n_desirable / (undesirable_weight * n_undesirable)` lies in [1, 4/3];
prefloop sets them from the class counts of the exported data unless they are given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import KTOConfig as TRLKTOConfig
from trl import KTOTrainer as TRLKTOTrainer

from alignment.training.common import GuardedTraining, MethodSpec, TrainingError


@dataclass
class KTOConfig(TRLKTOConfig):
    """TRL's KTOConfig, plus the class-ratio weighting."""

    auto_class_weights: bool = field(
        default=True,
        metadata={
            "help": "Set desirable_weight / undesirable_weight from the class counts (the rarer class is "
            "up-weighted so both contribute equally), unless either weight is set to something other than 1."
        },
    )


class KTOTrainer(GuardedTraining, TRLKTOTrainer):
    """TRL's KTOTrainer, stopping on a non-finite loss."""


def class_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight): the rarer class weighted up to balance, the lower
    end of the paper's recommended range."""
    if n_desirable == 0 or n_undesirable == 0:
        return 1.0, 1.0
    if n_desirable >= n_undesirable:
        return 1.0, round(n_desirable / n_undesirable, 4)
    return round(n_undesirable / n_desirable, 4), 1.0


def adjust(settings: dict, dataset) -> dict:
    labels = [bool(x) for x in dataset["label"]]
    n_desirable = sum(labels)
    n_undesirable = len(labels) - n_desirable
    if n_desirable == 0 and n_undesirable == 0:
        raise TrainingError("the KTO data has no labelled completion")
    settings = dict(settings)
    explicit = any(float(settings.get(k, 1.0)) != 1.0 for k in ("desirable_weight", "undesirable_weight"))
    if settings.get("auto_class_weights", True) and not explicit:
        settings["desirable_weight"], settings["undesirable_weight"] = class_weights(n_desirable, n_undesirable)
    return settings


METHOD = MethodSpec(
    name="kto",
    config_class=KTOConfig,
    trainer_class=KTOTrainer,
    export="kto",
    required_columns=(("prompt", "completion", "label"),),
    adjust=adjust,
)
