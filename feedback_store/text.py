"""Text every backend can store: PostgreSQL text cannot hold NUL, and no UTF-8 store can hold
a lone UTF-16 surrogate (which JSON's "\\ud800" escapes can smuggle into a Python string).
Also what a refusal looks like, which the rubric judge and the gold-pair maker both ask."""

from __future__ import annotations

import re

_REFUSAL = re.compile(
    r"\b(I can(?:no|')t (?:help|assist|do that|comply)|I cannot|I'm sorry,? but|I am sorry,? but|"
    r"I won't|I will not|I'm (?:not able|unable) to|I am (?:not able|unable) to|as an AI)\b",
    re.IGNORECASE,
)


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text))


def text_problem(value: str) -> str | None:
    """Why `value` cannot be stored, as the end of a sentence naming the field, or None."""
    if "\x00" in value:
        return "contains a NUL character (\\x00), which the store refuses (PostgreSQL text cannot hold it)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired UTF-16 surrogate (not valid Unicode text)"
    return None
