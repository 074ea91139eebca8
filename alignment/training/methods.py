"""The one list of training methods: name, what it does, what it learns from.

Imported by the CLI, presets, the web-job policy and the loop, so it must stay light (no
torch, no TRL). A method's code lives in `alignment.training.<name>` and exports METHOD (a
MethodSpec); adding a method is adding that module and one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str  # one line, shown by `prefloop train --help`
    registers_policy: bool = True  # False: the run makes a reward model, not a policy
    loop: bool = False  # can train a round of `prefloop loop`


METHODS: tuple[MethodInfo, ...] = (
    MethodInfo("sft", "supervised fine-tuning on winners and edits (or --data)"),
    MethodInfo("reward", "a reward model (sequence-classification head), held-out pairwise accuracy",
               registers_policy=False),
    MethodInfo("dpo", "direct preference optimization on the policy (adapter off = reference)", loop=True),
    MethodInfo("kto", "KTO on thumbs-up/down ratings and on pairs", loop=True),
    MethodInfo("ppo", "PPO (RLHF): one sample per stored prompt, a value head, any reward source as GRPO",
               loop=True),
    MethodInfo("orpo", "ORPO on preference pairs: SFT on the chosen plus an odds-ratio penalty, no reference model"),
    MethodInfo("simpo", "SimPO on preference pairs: length-normalized margin with a target gap, no reference model"),
    MethodInfo("grpo", "GRPO (TRL): groups of samples per stored prompt, scored by a reward model, rule, function or judge"),
    MethodInfo("rloo", "RLOO (TRL): leave-one-out baseline over samples per stored prompt, any reward source as GRPO"),
)

METHOD_NAMES: tuple[str, ...] = tuple(method.name for method in METHODS)
LOOP_METHOD_NAMES: tuple[str, ...] = tuple(method.name for method in METHODS if method.loop)


def method_info(name: str) -> MethodInfo:
    for method in METHODS:
        if method.name == name:
            return method
    raise KeyError(f"unknown training method {name!r} (expected one of {', '.join(METHOD_NAMES)})")
