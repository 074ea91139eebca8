"""A judging rule a tiny random model can learn in a few DPO steps, for the loop's learning test:
the response with more of the GOOD words wins (a tie when both have as many)."""

from __future__ import annotations

from tests.train_helpers import GOOD


def more_good_words(conversation, first: str, second: str) -> str:
    def score(text: str) -> int:
        return sum(word in GOOD for word in text.lower().split())

    a, b = score(first), score(second)
    return "A" if a > b else "B" if b > a else "C"
