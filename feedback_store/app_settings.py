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


# ---- gold pairs and rater quality (feedback_store.gold, feedback_store.rater_quality) ----------

GOLD_RATE_SETTING = "gold_rate"
DEFAULT_GOLD_RATE = 1 / 20
QUALITY_THRESHOLD_SETTING = "rater_quality_threshold"
DEFAULT_QUALITY_THRESHOLD = 0.7


def gold_rate(*, session: Session) -> float:
    """The share of a human's pairs that are gold pairs (feedback_store.gold.gold_due); 0 = none."""
    return float(get_setting(GOLD_RATE_SETTING, DEFAULT_GOLD_RATE, session=session))


def set_gold_rate(rate: float, *, session: Session) -> None:
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"gold rate must be between 0 and 1 (got {rate})")
    set_setting(GOLD_RATE_SETTING, float(rate), session=session)


def quality_threshold(*, session: Session) -> float:
    """Raters whose quality score (feedback_store.rater_quality) is below this are flagged."""
    return float(get_setting(QUALITY_THRESHOLD_SETTING, DEFAULT_QUALITY_THRESHOLD, session=session))


def set_quality_threshold(threshold: float, *, session: Session) -> None:
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"quality threshold must be between 0 and 1 (got {threshold})")
    set_setting(QUALITY_THRESHOLD_SETTING, float(threshold), session=session)
