"""SimPO on stored preference pairs: TRL's experimental `CPOTrainer` (`trl.experimental.cpo`)
with `loss_type="simpo"`.

SimPO (Meng et al. 2024, arXiv:2405.14734) is reference-free: the implicit reward is the average
per-token log-prob of a completion times beta, and the loss asks the chosen to beat the rejected by
a target margin gamma: `loss = -log sigmoid(beta * (avg_logp(chosen) - avg_logp(rejected)) - gamma)`.
TRL implements it inside CPO; prefloop's defaults are the paper's: beta 2.0, gamma 1.0
(`simpo_gamma`, gamma/beta = 0.5) and no behaviour-cloning term (`cpo_alpha` 0.0; set it above 0
for CPO-SimPO, an NLL term on the chosen). `loss_type` may be "simpo" or "alphapo" (SimPO with
AlphaPO's reward shaping, `alpha`); CPO's other losses are DPO's and belong to `prefloop train dpo`.
Same data as DPO: the store's decided pairs (`export_dpo`).

Logged by TRL each step: `rewards/chosen|rejected|margins|accuracies`, `logps/chosen|rejected`,
`nll_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignment.training.common import GuardedTraining, MethodSpec, PrefixSharing
from alignment.training.reference_free import (
    EXPORT,
    REQUIRED_COLUMNS,
    MeasuredPairs,
    PackedPairs,
    experimental,
)

_trl = experimental("cpo")

SIMPO_LOSSES = ("simpo", "alphapo")


@dataclass
class SimPOConfig(PrefixSharing, _trl.CPOConfig):
    """TRL's CPOConfig with SimPO's loss and the paper's defaults (the pairs keep their columns for
    TRL's pair collator, which TRL would otherwise switch on with a warning)."""

    remove_unused_columns: bool = False

    loss_type: str = field(
        default="simpo",
        metadata={"help": "simpo, or alphapo (SimPO with AlphaPO's reward shaping, see alpha)",
                  "choices": list(SIMPO_LOSSES)},
    )
    beta: float = field(default=2.0, metadata={"help": "scale of the implicit reward (the paper uses 2.0-2.5)"})
    simpo_gamma: float = field(
        default=1.0, metadata={"help": "target reward margin gamma between chosen and rejected (the paper: 0.5 * beta)"}
    )
    cpo_alpha: float = field(
        default=0.0, metadata={"help": "weight of an NLL term on the chosen (0: pure SimPO; > 0: CPO-SimPO)"}
    )

    def __post_init__(self):
        if self.loss_type not in SIMPO_LOSSES:
            raise ValueError(f"simpo: loss_type must be one of {', '.join(SIMPO_LOSSES)}, not {self.loss_type!r} "
                             f"(CPO's other losses are DPO's: prefloop train dpo --loss-type ...)")
        super().__post_init__()


class SimPOTrainer(GuardedTraining, MeasuredPairs, PackedPairs, _trl.CPOTrainer):
    """TRL's experimental CPOTrainer (loss_type="simpo") on packed pairs (reference_free.PackedPairs),
    stopping on a non-finite loss."""

    def average_log_prob(self) -> bool:
        return self.loss_type in ("ipo", "simpo")  # as CPOTrainer.concatenated_forward decides

    def nll_enabled(self) -> bool:
        return self.cpo_alpha != 0  # CPO computes no NLL term without its weight


METHOD = MethodSpec(
    name="simpo",
    config_class=SimPOConfig,
    trainer_class=SimPOTrainer,
    export=EXPORT,
    required_columns=REQUIRED_COLUMNS,
)
