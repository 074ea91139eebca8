"""RLOO on TRL's RLOOTrainer: for each stored prompt the LoRA/DoRA policy samples
`num_generations` completions, and each completion's advantage is its reward minus the mean
reward of the prompt's other completions (leave-one-out), with a KL penalty (`beta`) to the
reference: the base with the adapter off, or the parent for `--from-policy`. The reward is any
online source (online_rewards.py), with the same flags as GRPO; see grpo.py for what prefloop
adds to TRL's trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import RLOOConfig as TRLRLOOConfig
from trl import RLOOTrainer as TRLRLOOTrainer

from alignment.training import online_rewards
from alignment.training.common import MethodSpec, PrefixSharing
from alignment.training.grpo import OnlineTrainer, RewardSource


@dataclass
class RLOOConfig(PrefixSharing, RewardSource, TRLRLOOConfig):
    """TRL's RLOOConfig plus the reward source; smaller defaults for a CPU."""

    num_generations: int | None = field(default=4, metadata={"help": "completions sampled per prompt"})
    max_completion_length: int | None = field(default=128, metadata={"help": "most tokens per completion"})
    logging_steps: float = field(default=1, metadata={"help": "log every N steps"})


class RLOOTrainer(OnlineTrainer, TRLRLOOTrainer):
    returns_logprobs = False


def resolve(settings: dict, engine) -> dict:
    return online_rewards.resolve(settings, engine, method="rloo")


METHOD = MethodSpec(
    name="rloo",
    config_class=RLOOConfig,
    trainer_class=RLOOTrainer,
    export="prompts",
    required_columns=(("prompt",),),
    resolve=resolve,
)
