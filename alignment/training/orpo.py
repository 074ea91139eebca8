"""ORPO on stored preference pairs: TRL's experimental `ORPOTrainer` (`trl.experimental.orpo`).

ORPO (Hong et al. 2024, arXiv:2403.07691) adds an odds-ratio penalty to supervised learning of
the chosen completion: `loss = NLL(chosen) - beta * log sigmoid(log odds(chosen) - log odds(rejected))`.
It needs no reference model (no adapter-off pass, nothing precomputed), so it trains from the
base model or from a policy (`--from-policy`) at the cost of one forward of both completions.
Same data as DPO: the store's decided pairs (`export_dpo`).

Logged by TRL each step: `rewards/chosen|rejected|margins|accuracies` (beta times the average
per-token log-prob of each completion), `log_odds_ratio`, `log_odds_chosen`, `nll_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignment.training.common import GuardedTraining, MethodSpec, PrefixSharing
from alignment.training.reference_free import (
    EXPORT,
    REQUIRED_COLUMNS,
    MeasuredPairs,
    PackedPairs,
    experimental,
)

_trl = experimental("orpo")


@dataclass
class ORPOConfig(PrefixSharing, _trl.ORPOConfig):
    """TRL's ORPOConfig (`beta` is the weight of the odds-ratio term, the paper's lambda). The
    pairs keep their columns for TRL's pair collator (which TRL would otherwise switch on with a
    warning)."""

    remove_unused_columns: bool = False


class ORPOTrainer(GuardedTraining, MeasuredPairs, PackedPairs, _trl.ORPOTrainer):
    """TRL's experimental ORPOTrainer on packed pairs (reference_free.PackedPairs), stopping on a
    non-finite loss."""

    nll_over_prompt = True  # TRL: "orpo chosen nll loss is computed over the full prompt and response"

    def average_log_prob(self) -> bool:
        return True  # the odds ratio uses the mean per-token log-prob


METHOD = MethodSpec(
    name="orpo",
    config_class=ORPOConfig,
    trainer_class=ORPOTrainer,
    export=EXPORT,
    required_columns=REQUIRED_COLUMNS,
)
