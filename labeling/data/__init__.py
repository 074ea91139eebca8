"""Data files bundled with prefloop, and the first-run import of the default prompt set.

    added = ensure_default_prompts(session)   # imports prompts.jsonl into an empty store

`prompts.jsonl` holds a few dozen varied instruction prompts written for this project, in
English and French (one JSON object per line: "prompt", optional "tags").
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).parent
DEFAULT_PROMPTS = DATA_DIR / "prompts.jsonl"
DEFAULT_PROMPTS_SOURCE = "prefloop-default"
# `prefloop demo --loop`: short explanatory prompts, a third held out (`split: eval`) so each
# round's candidate is judged on enough unseen prompts for a meaningful interval.
LOOP_PROMPTS = DATA_DIR / "loop_prompts.jsonl"
LOOP_PROMPTS_SOURCE = "prefloop-loop-demo"


def ensure_default_prompts(session) -> int:
    """Import the bundled prompt set when the store has no prompt yet; returns how many were
    added (0 when the store already had prompts). Runs in the caller's transaction."""
    from feedback_store.catalog import list_prompts
    from feedback_store.importing import import_prompts

    if list_prompts(session=session, limit=1):
        return 0
    return import_prompts(DEFAULT_PROMPTS, session=session, source=DEFAULT_PROMPTS_SOURCE).prompts_created


def ensure_loop_prompts(session) -> int:
    """Import the loop demo's prompt set (idempotent: re-importing adds nothing)."""
    from feedback_store.importing import import_prompts

    return import_prompts(LOOP_PROMPTS, session=session, source=LOOP_PROMPTS_SOURCE).prompts_created
