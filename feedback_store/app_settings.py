"""Admin-set values shared by every server process: guidelines, target overlap."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from feedback_store.models import AppSetting, utcnow
from feedback_store.queue import OVERLAP_SETTING

GUIDELINES_SETTING = "guidelines"
DEFAULT_GUIDELINES = """\
**Pick the response that better serves the person who asked.**

- Correct and honest beats fluent. A confident wrong answer is worse than a hedged right one.
- Follows the instructions in the prompt (format, length, language).
- Safe and respectful; refuses only what should be refused.
- *Tie*: equally good. *Both bad*: neither is acceptable.
"""


def get_setting(key: str, default: Any = None, *, session: Session) -> Any:
    setting = session.get(AppSetting, key)
    return default if setting is None or setting.value is None else setting.value


def set_setting(key: str, value: Any, *, session: Session) -> AppSetting:
    setting = session.get(AppSetting, key) or AppSetting(key=key)
    setting.value = value
    setting.updated_at = utcnow()
    session.add(setting)
    session.flush()
    return setting


def guidelines(*, session: Session) -> str:
    return str(get_setting(GUIDELINES_SETTING, DEFAULT_GUIDELINES, session=session))


def set_target_overlap(overlap: int, *, session: Session) -> None:
    """How many human votes each comparison should collect before it leaves the queue."""
    if int(overlap) < 1:
        raise ValueError(f"target overlap must be at least 1 (got {overlap})")
    set_setting(OVERLAP_SETTING, int(overlap), session=session)
