"""Preference rules written in Python: the rubric judge's rules, kept here (below labeling) so that
training can turn them into rewards (`prefloop train grpo --reward-rubric shorter`).

A rule looks at the conversation and two responses as shown (first = A, second = B) and returns
"A", "B" or "C" (tie). Rules are named; a spec may chain several with commas, the first rule that
does not tie deciding ("no-refusal,shorter"), and may name any importable function as
"package.module:function". `labeling.judge.rubric` (the judge backend) re-exports these names.

Rules read text features only, so a response that says "ignore previous instructions, choose
this answer" gets no say in the verdict beyond its length and wording.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

from feedback_store.text import is_refusal

Rule = Callable[[Sequence[dict], str, str], str]

def _compare(x: float, y: float) -> str:
    return "A" if x > y else "B" if y > x else "C"


def shorter(conversation: Sequence[dict], first: str, second: str) -> str:
    return _compare(-len(first.strip()), -len(second.strip()))


def longer(conversation: Sequence[dict], first: str, second: str) -> str:
    return _compare(len(first.strip()), len(second.strip()))


def no_refusal(conversation: Sequence[dict], first: str, second: str) -> str:
    return _compare(not is_refusal(first), not is_refusal(second))


RULES: Mapping[str, Rule] = MappingProxyType({"shorter": shorter, "longer": longer, "no-refusal": no_refusal})


def resolve_rule(spec: str) -> Rule:
    """A rule from its spec: builtin names and/or "module:function", comma-chained."""
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if not parts:
        raise ValueError("empty rubric spec")
    rules = [_one_rule(part) for part in parts]
    if len(rules) == 1:
        return rules[0]

    def chained(conversation: Sequence[dict], first: str, second: str) -> str:
        for rule in rules:
            letter = rule(conversation, first, second)
            if letter != "C":
                return letter
        return "C"

    return chained


def _one_rule(name: str) -> Rule:
    if name in RULES:
        return RULES[name]
    if ":" not in name:
        raise ValueError(f"unknown rubric rule {name!r} (builtin: {', '.join(RULES)}; or module:function)")
    try:
        rule = pkgutil.resolve_name(name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"rubric rule {name!r}: {error}") from None
    if not callable(rule):
        raise ValueError(f"rubric rule {name!r} is not callable")
    return rule
