"""Train and eval prompts: which prompts a policy may learn from and which judge it.

Every prompt is in one split. Import sets it from a `split` column; otherwise
`default_split` puts a prompt in `eval` when its content hash falls in the first 10 % of
the hash space. The hash is of the conversation itself, so the same prompt lands in the
same split on every machine, in every store, whatever order it was imported in; migration
0003 applies the same rule to the prompts stored before splits existed.

Training exports and pair generation for labelling read `train` prompts; `prefloop eval`
reads `eval` prompts. An admin may move prompts with `set_prompt_split`.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func
from sqlmodel import Session, col, select

from feedback_store.models import Prompt

TRAIN, EVAL = "train", "eval"
SPLITS = (TRAIN, EVAL)
EVAL_PERCENT = 10
_CHUNK = 900  # ids per IN (...), under every backend's limit on bound parameters


def default_split(content_hash: str) -> str:
    """`eval` for EVAL_PERCENT % of prompts, chosen by their sha256 content hash (hex)."""
    return EVAL if int(content_hash, 16) % 100 < EVAL_PERCENT else TRAIN


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected 'train' or 'eval')")
    return split


def parse_id_ranges(text: str) -> list[int]:
    """Prompt ids as an admin types them: "3 7 10-20" or "3,7,10-20"."""
    ids: list[int] = []
    for value in text.replace(",", " ").split():
        first, _, last = value.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise ValueError(f"not a prompt id or range: {value!r}") from None
        if low > high:
            raise ValueError(f"empty range {value!r}")
        ids.extend(range(low, high + 1))
    return ids


def set_prompt_split(ids: Iterable[int], split: str, *, session: Session) -> int:
    """Move these prompts to `split`; returns how many changed. Unknown ids are an error and
    nothing moves (the caller's transaction rolls back)."""
    check_split(split)
    wanted = sorted({int(i) for i in ids})
    if not wanted:
        raise ValueError("no prompt ids given")
    changed = 0
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        found = list(session.exec(select(Prompt).where(col(Prompt.id).in_(chunk))))
        missing = sorted(set(chunk) - {p.id for p in found})
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise ValueError(f"no prompt with id {shown}")
        for prompt in found:
            if prompt.split != split:
                prompt.split = split
                session.add(prompt)
                changed += 1
    session.flush()
    return changed


def split_counts(*, session: Session) -> dict[str, int]:
    """Prompts per split, every split listed."""
    counts = dict(session.exec(select(Prompt.split, func.count()).group_by(Prompt.split)).all())
    return {split: int(counts.get(split, 0)) for split in SPLITS}
