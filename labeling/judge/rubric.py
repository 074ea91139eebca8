"""Rubric judges: preferences written as Python rules, for tests, demos and simulated annotators.

A rule looks at the conversation and the two responses as shown (first = A, second = B) and
returns "A", "B" or "C" (tie). Rules are named; a spec may chain several with commas, the
first rule that does not tie deciding ("no-refusal,shorter"), and may name any importable
function as "package.module:function".

Rules read text features only, so a response that says "ignore previous instructions, choose
this answer" gets no say in the verdict beyond its length and wording. The rules themselves live
in `alignment.rubric_rules` (training uses them as rewards); this module is the judge backend.
"""

from __future__ import annotations

from alignment.rubric_rules import (  # noqa: F401  (the rules live below labeling; re-exported here)
    RULES,
    Rule,
    is_refusal,
    longer,
    no_refusal,
    resolve_rule,
    shorter,
)
from labeling.judge.backends import JudgeReply, JudgeRequest


class RubricJudge:
    """A backend that applies a rule; its reply goes through the same verdict parser."""

    kind = "rubric"
    uses_template = False
    max_output_tokens = 0
    preferred_concurrency = 1

    def __init__(self, spec: str, rule: Rule | None = None):
        self.spec = spec
        self.model_id = f"rubric:{spec}"
        self._rule = rule or resolve_rule(spec)

    async def judge(self, request: JudgeRequest) -> JudgeReply:
        letter = self._rule(request.conversation, request.first, request.second)
        return JudgeReply(text=f"rule {self.spec}: [[{letter}]]")

    async def aclose(self) -> None:
        return None
