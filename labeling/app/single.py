"""Single-response mode: thumbs up or down on one answer, with an optional comment.

This is the unpaired signal KTO trains on. It follows the pairwise page's rules: the card
on screen lives in server-side session state with its own idempotency key, the rater comes
from the server-side session, a replayed key records nothing, a failed save offers Retry.
"""

import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import gradio as gr
from sqlalchemy.exc import SQLAlchemyError

from feedback_store.models import Response
from feedback_store.queue import next_response_for
from feedback_store.votes import VoteError, record_rating
from labeling.app.annotate import screen_frame
from labeling.app.auth import AccessDenied, Caller, caller_for
from labeling.app.ui import (
    TEXT_LIMITS,
    TextRefused,
    ProgressMemo,
    Tone,
    card_screen_html,
    empty_queue_html,
    progress_markdown,
    prompt_html,
    response_html,
    status_html,
    text_input,
)

SAVED_KEYS_KEPT = 64
THUMBS = (("up", "Good", "u"), ("down", "Bad", "d"))  # no emoji: not every system has the font


@dataclass
class Card:
    response_id: int
    key: str


@dataclass
class Tray:
    rater_id: int | None = None
    card: Card | None = None
    skipped: set = field(default_factory=set)
    saved_keys: OrderedDict = field(default_factory=OrderedDict)
    failed_thumb: str | None = None
    progress: ProgressMemo = field(default_factory=ProgressMemo)


@dataclass(frozen=True)
class CardScreen:
    """A None field keeps what is already on screen."""

    status: str
    screen_html: str | None = None
    key: str | None = None
    progress_md: str | None = None
    clear_inputs: bool = False

    @property
    def has_card(self) -> bool | None:
        return None if self.key is None else bool(self.key)

    @property
    def failed(self) -> bool:
        return "pf-failed" in self.status


def _bind(tray: Tray | None, caller: Caller) -> Tray:
    return tray if tray is not None and tray.rater_id == caller.id else Tray(rater_id=caller.id)


def _deal(tray: Tray, caller: Caller, session) -> None:
    response = next_response_for(caller.id, session=session, exclude=tray.skipped)
    tray.card = Card(response.id, uuid.uuid4().hex) if response is not None else None


def _screen(
    state, tray: Tray, caller: Caller, session, status: str = "", *, clear_inputs: bool = False
) -> CardScreen:
    progress = progress_markdown(tray.progress.current(caller.id, session), ratings=True)
    if tray.card is None:
        detail = (
            "You skipped the rest in this sitting: press the button below to see them again."
            if tray.skipped
            else "You have rated every response there is."
        )
        return CardScreen(
            status,
            empty_queue_html("Nothing left to rate", detail),
            key="",
            progress_md=progress,
            clear_inputs=clear_inputs,
        )
    response = session.get(Response, tray.card.response_id)
    screen = card_screen_html(
        prompt_html(state, response.prompt_id, session), response_html(state, response.id, session)
    )
    return CardScreen(
        status, screen, key=tray.card.key, progress_md=progress, clear_inputs=clear_inputs
    )


def open_tray(
    state, tray: Tray | None, caller: Caller, *, forget_skipped: bool = False
) -> tuple[Tray, CardScreen]:
    tray = _bind(tray, caller)
    if forget_skipped:
        tray.skipped.clear()
    with state.session() as session:
        if tray.card is None:
            _deal(tray, caller, session)
        return tray, _screen(state, tray, caller, session)


def rate(
    state, tray: Tray | None, caller: Caller, thumb: str, key: str, comment: str | None = None
) -> tuple[Tray, CardScreen]:
    tray = _bind(tray, caller)
    if key and key in tray.saved_keys:
        with state.session() as session:
            return tray, _screen(
                state, tray, caller, session, status_html("Already saved.", Tone.info)
            )
    card = tray.card
    if card is None or key != card.key:
        with state.session() as session:
            if card is None:
                _deal(tray, caller, session)
            message = "That response is no longer on your screen, so nothing was saved."
            return tray, _screen(state, tray, caller, session, status_html(message, Tone.warn))
    if thumb not in ("up", "down"):
        return tray, CardScreen(status_html(f"Not saved: unknown rating {thumb!r}.", Tone.error))
    try:
        with state.session() as session:
            record_rating(
                card.response_id,
                caller.id,
                thumb == "up",
                session=session,
                comment=(comment or "").strip() or None,
                idempotency_key=key,
            )
    except VoteError as error:
        return tray, CardScreen(status_html(f"Not saved: {error}.", Tone.error))
    except SQLAlchemyError as error:
        tray.failed_thumb = thumb
        reason = type(getattr(error, "orig", None) or error).__name__
        message = f"Save failed ({reason}). Your rating is NOT recorded yet: press Retry."
        return tray, CardScreen(status_html(message, Tone.error, failed=True))
    tray.saved_keys[key] = card.response_id
    while len(tray.saved_keys) > SAVED_KEYS_KEPT:
        tray.saved_keys.popitem(last=False)
    tray.failed_thumb = None
    tray.progress.add_rating()
    with state.session() as session:
        _deal(tray, caller, session)
        return tray, _screen(
            state, tray, caller, session, status_html("Saved ✓", Tone.ok), clear_inputs=True
        )


def retry(
    state, tray: Tray | None, caller: Caller, key: str, comment: str | None = None
) -> tuple[Tray, CardScreen]:
    tray = _bind(tray, caller)
    if tray.failed_thumb is None:
        return open_tray(state, tray, caller)
    return rate(state, tray, caller, tray.failed_thumb, key, comment)


def skip(state, tray: Tray | None, caller: Caller, key: str) -> tuple[Tray, CardScreen]:
    tray = _bind(tray, caller)
    with state.session() as session:
        if tray.card is not None and tray.card.key == key:
            tray.skipped.add(tray.card.response_id)
            tray.failed_thumb = None
            _deal(tray, caller, session)
            return tray, _screen(
                state, tray, caller, session, status_html("Skipped.", Tone.info), clear_inputs=True
            )
        return tray, _screen(state, tray, caller, session)


# ---- the Gradio tab ------------------------------------------------------------------------


def _updates(tray: Tray, screen: CardScreen) -> tuple:
    keep = gr.update()
    return (
        tray,
        keep if screen.screen_html is None else screen.screen_html,
        keep if screen.key is None else screen.key,
        keep if screen.progress_md is None else screen.progress_md,
        screen.status,
        "" if screen.clear_inputs else keep,
    )


def build_single_tab(state) -> dict:
    """Laid out like the pairwise page, with the same CSS-driven visibility (see annotate.py)."""
    tray = gr.State(None)
    with gr.Column(elem_id="pf-single"):
        progress, status, retry_button, key_box, screen_html = screen_frame("pf1")
        again_button = gr.Button(
            "Show skipped responses again",
            size="sm",
            elem_id="pf1-again",
            elem_classes="pf-when-empty",
        )
        with gr.Row(elem_classes="pf-choices pf-when-pair"):
            buttons = {
                thumb: gr.Button(
                    f"{label}  [{shortcut.upper()}]",
                    variant="primary",
                    elem_id=f"pf1-{thumb}",
                    elem_classes=f"pf-key-{shortcut}",
                )
                for thumb, label, shortcut in THUMBS
            }
            skip_button = gr.Button("Skip  [S]", elem_id="pf1-skip", elem_classes="pf-key-s")
        comment = gr.Textbox(
            label="Comment (optional)",
            lines=1,
            max_lines=4,
            max_length=TEXT_LIMITS["comment"],
            elem_id="pf1-comment",
            elem_classes="pf-when-pair",
        )

    outputs = [tray, screen_html, key_box, progress, status, comment]

    def run(action, request: gr.Request, held: Tray | None = None):
        try:
            caller = caller_for(state, request.username)
        except AccessDenied as error:
            raise gr.Error(str(error)) from None
        with state.rater_lock(caller.id):
            try:
                return _updates(*action(caller))
            except TextRefused as refusal:  # nothing stored: the response and the comment stay
                return _updates(held, CardScreen(status_html(str(refusal), Tone.error)))

    def on_load(tray_value, request: gr.Request):
        return run(lambda caller: open_tray(state, tray_value, caller), request)

    def on_again(tray_value, request: gr.Request):
        return run(
            lambda caller: open_tray(state, tray_value, caller, forget_skipped=True), request
        )

    def make_rate(thumb: str):
        def on_rate(tray_value, key, comment_value, request: gr.Request):
            return run(
                lambda caller: rate(
                    state, tray_value, caller, thumb, text_input(key, "key"), text_input(comment_value, "comment")
                ),
                request,
                tray_value,
            )

        return on_rate

    def on_retry(tray_value, key, comment_value, request: gr.Request):
        return run(
            lambda caller: retry(
                state, tray_value, caller, text_input(key, "key"), text_input(comment_value, "comment")
            ),
            request,
            tray_value,
        )

    def on_skip(tray_value, key, request: gr.Request):
        return run(lambda caller: skip(state, tray_value, caller, text_input(key, "key")), request, tray_value)

    fast = dict(preprocess=False, postprocess=False, show_progress="minimal")
    for thumb, button in buttons.items():
        button.click(
            make_rate(thumb), [tray, key_box, comment], outputs, api_name=f"rate_{thumb}", **fast
        )
    retry_button.click(on_retry, [tray, key_box, comment], outputs, api_name="retry_rating", **fast)
    skip_button.click(on_skip, [tray, key_box], outputs, api_name="skip_response", **fast)
    again_button.click(on_again, [tray], outputs, api_name="responses_again", **fast)
    return {"load": (on_load, [tray], outputs, fast)}
