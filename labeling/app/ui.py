"""Small pieces of markup shared by the app's pages."""

from __future__ import annotations

import html
from enum import Enum

from feedback_store.progress import RaterProgress


class Tone(str, Enum):
    info = "info"
    ok = "ok"
    warn = "warn"
    error = "error"


def status_html(text: str, tone: Tone = Tone.info) -> str:
    if not text:
        return ""
    return f'<div class="pf-status pf-{tone.value}" role="status">{html.escape(text)}</div>'


def progress_markdown(progress: RaterProgress, *, unit: str = "pairs") -> str:
    done = progress.votes_today + progress.ratings_today
    return (
        f"**{done}** done today · **{progress.remaining}** {unit} left for you · "
        f"target overlap **{progress.target_overlap}** vote{'s' if progress.target_overlap != 1 else ''} per pair"
    )


def empty_queue_html(title: str, detail: str) -> str:
    return (
        f'<div class="pf-empty"><div class="pf-empty-title">{html.escape(title)}</div>'
        f"<div>{html.escape(detail)}</div></div>"
    )
