"""Reading a judge's verdict: strict about where it is, tolerant about how it is written.

Accepted: `[[A]]`, `[[ b ]]`, `**[[C]]**`, `[[tie]]` (= C), anywhere on the last non-empty
line. The verdict is the last such token; if the last line holds two different ones the
answer is ambiguous. Anything else (no token, a token only earlier in the text, text cut off
at the token limit) is a `VerdictParseError` carrying the raw text, never a label: an earlier
`[[A]]` may be the judge quoting a response that tries to inject a verdict.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from feedback_store.models import Choice

_TOKEN = re.compile(r"\[\[\s*(A|B|C|TIE)\s*\]\]", re.IGNORECASE)
_LETTERS = {"A": "A", "B": "B", "C": "C", "TIE": "C"}
ORDERS = ("ab", "ba")  # "ab": the comparison's response_a is shown as A; "ba": shown as B


class VerdictParseError(ValueError):
    def __init__(self, reason: str, raw: str | None):
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


@dataclass(frozen=True)
class Verdict:
    letter: str  # A, B or C, as shown to the judge
    offset: int  # where the letter (or "tie") starts in the text


def parse_verdict(text: str | None, *, truncated: bool = False) -> Verdict:
    if text is None or not text.strip():
        raise VerdictParseError("empty output", text)
    if truncated:
        raise VerdictParseError("output cut off at the token limit before a final verdict", text)
    matches = list(_TOKEN.finditer(text))
    if not matches:
        raise VerdictParseError("no [[A]], [[B]] or [[C]] verdict in the output", text)
    stripped = text.rstrip()
    last_line_start = stripped.rfind("\n") + 1
    final = [m for m in matches if m.start() >= last_line_start]
    if not final:
        raise VerdictParseError("no verdict on the final line (an earlier [[X]] is not the answer)", text)
    letters = {_LETTERS[m.group(1).upper()] for m in final}
    if len(letters) > 1:
        raise VerdictParseError(f"conflicting verdicts on the final line: {sorted(letters)}", text)
    last = final[-1]
    return Verdict(_LETTERS[last.group(1).upper()], last.start(1))


def to_choice(letter: str, order: str) -> Choice:
    """A verdict as shown (A = first) to the comparison's canonical choice."""
    if letter == "C":
        return Choice.tie
    first_is_a = order == "ab"
    return Choice.a if (letter == "A") == first_is_a else Choice.b


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: Mapping[str, float]  # alternative token -> logprob at the same position


def verdict_confidence(text: str, verdict: Verdict, tokens: Sequence[TokenLogprob] | None) -> float | None:
    """P(verdict letter) among the letters A/B/C at the position where the judge wrote it.

    Uses the top alternatives the endpoint returned at that position; with none, the chosen
    token's own probability. None when no token carries the verdict letter.
    """
    if not tokens:
        return None
    target = None
    if "".join(t.token for t in tokens) == text:
        offset = 0
        for token in tokens:
            if offset <= verdict.offset < offset + len(token.token):
                target = token
                break
            offset += len(token.token)
    else:  # tokens that do not spell the text exactly: the last verdict-letter token
        target = next((t for t in reversed(tokens) if _letter(t.token) == verdict.letter), None)
    if target is None or _letter(target.token) != verdict.letter:
        return None
    if not target.top:
        return math.exp(target.logprob)
    probs: dict[str, float] = {}
    for token, logprob in [(target.token, target.logprob), *target.top.items()]:
        letter = _letter(token)
        if letter is not None:
            probs[letter] = max(probs.get(letter, 0.0), math.exp(logprob))
    total = sum(probs.values())
    return probs[verdict.letter] / total if total > 0 else None


def _letter(token: str) -> str | None:
    core = token.strip().strip("[]* ").upper()
    return _LETTERS.get(core)
