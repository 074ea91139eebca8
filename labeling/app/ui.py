"""Small pieces of markup shared by the app's pages."""

from __future__ import annotations

import dataclasses
import html
import time
from dataclasses import dataclass
from enum import Enum

from feedback_store.progress import RaterProgress, rater_progress
from feedback_store.text import text_problem
from labeling.app.markup import render_markdown, render_messages


class Tone(str, Enum):
    info = "info"
    ok = "ok"
    warn = "warn"
    error = "error"


def status_html(text: str, tone: Tone = Tone.info, *, failed: bool = False) -> str:
    """A one-line status. `failed` marks a save to retry: the stylesheet shows Retry beside it."""
    if not text:
        return ""
    marker = " pf-failed" if failed else ""
    return f'<div class="pf-status pf-{tone.value}{marker}" role="status">{html.escape(text)}</div>'


def progress_markdown(progress: RaterProgress, *, ratings: bool = False) -> str:
    """Done today, and what is left: pairs (with the overlap they aim for) or, in the
    single-response mode, today's ratings."""
    done = f"**{progress.votes_today + progress.ratings_today}** done today"
    if ratings:
        return f"{done} · **{progress.ratings_today}** of them ratings"
    votes = "vote" if progress.target_overlap == 1 else "votes"
    loops = "".join(
        f" · loop **{html.escape(loop)}** round {number} waits for **{missing}** more {'vote' if missing == 1 else 'votes'}"
        for loop, number, missing in progress.loops_waiting
    )
    return (
        f"{done} · **{progress.remaining}** pairs left for you · "
        f"target overlap **{progress.target_overlap}** {votes} per pair{loops}"
    )


def empty_queue_html(title: str, detail: str) -> str:
    """The screen when there is nothing to judge; `pf-nothing` hides the choice buttons (CSS)."""
    return (
        f'<div class="pf-empty pf-nothing"><div class="pf-empty-title">{html.escape(title)}</div>'
        f"<div>{html.escape(detail)}</div></div>"
    )


def pair_screen_html(prompt: str, left: str, right: str) -> str:
    """Prompt above, the two responses side by side: one block, so one output per event."""
    return (
        f'<div class="pf-screen"><div class="pf-card pf-prompt" id="pf-prompt">{prompt}</div>'
        '<div class="pf-sides">'
        f'<section><h4 class="pf-side-title">Response A</h4><div class="pf-card pf-response" id="pf-left">{left}</div></section>'
        f'<section><h4 class="pf-side-title">Response B</h4><div class="pf-card pf-response" id="pf-right">{right}</div></section>'
        "</div></div>"
    )


def card_screen_html(prompt: str, response: str) -> str:
    return (
        f'<div class="pf-screen"><div class="pf-card pf-prompt" id="pf1-prompt">{prompt}</div>'
        f'<h4 class="pf-side-title">Response</h4><div class="pf-card pf-response" id="pf1-response">{response}</div>'
        "</div>"
    )


# The longest text each field accepts, in characters: generous for people, small for the store.
TEXT_LIMITS = {"key": 100, "strength": 40, "rationale": 5_000, "comment": 5_000, "edit": 20_000}


class TextRefused(ValueError):
    """Client text the app will not store; the message names the field and says why."""


def text_input(value, field: str) -> str | None:
    """A text field as sent by a client, which may send anything: a string or nothing.

    Longer than its limit, or holding what no store can keep (NUL, a lone surrogate), it is
    refused with TextRefused, whose message says which field and why: the page shows it in its
    status line, nothing is stored and the item stays on screen."""
    if not isinstance(value, str):
        return None
    limit = TEXT_LIMITS[field]
    if len(value) > limit:
        raise TextRefused(f"Not saved: the {field} is {len(value):,} characters long; the limit is {limit:,}.")
    problem = text_problem(value)  # NUL, lone surrogates: no store can hold them
    if problem:
        raise TextRefused(f"Not saved: the {field} {problem}.")
    return value


@dataclass
class ProgressMemo:
    """A rater's progress, counted exactly now and then and kept up to date locally in between:
    the exact count scans every pair, too much to repeat on every click."""

    value: RaterProgress | None = None
    counted_at: float = 0.0
    max_age_s: float = 30.0

    def current(self, rater_id: int, session) -> RaterProgress:
        if self.value is None or time.monotonic() - self.counted_at > self.max_age_s:
            self.value = rater_progress(rater_id, session=session)
            self.counted_at = time.monotonic()
        return self.value

    def add_vote(self) -> None:
        if self.value is not None:
            self.value = dataclasses.replace(
                self.value,
                votes_today=self.value.votes_today + 1,
                remaining=max(0, self.value.remaining - 1),
            )

    def add_rating(self) -> None:
        if self.value is not None:
            self.value = dataclasses.replace(self.value, ratings_today=self.value.ratings_today + 1)


def response_html(state, response_id: int, session) -> str:
    """A response's text as safe HTML; stored text never changes, so it is rendered once."""
    from feedback_store.models import Response

    return state.renders.get(
        ("response", response_id), lambda: render_markdown(session.get(Response, response_id).text)
    )


def prompt_html(state, prompt_id: int, session) -> str:
    from feedback_store.models import Prompt

    return state.renders.get(
        ("prompt", prompt_id), lambda: render_messages(session.get(Prompt, prompt_id).messages)
    )
