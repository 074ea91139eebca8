"""Text every backend can store: PostgreSQL text cannot hold NUL, and no UTF-8 store can hold
a lone UTF-16 surrogate (which JSON's "\\ud800" escapes can smuggle into a Python string)."""

from __future__ import annotations


def text_problem(value: str) -> str | None:
    """Why `value` cannot be stored, as the end of a sentence naming the field, or None."""
    if "\x00" in value:
        return "contains a NUL character (\\x00), which the store refuses (PostgreSQL text cannot hold it)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired UTF-16 surrogate (not valid Unicode text)"
    return None
