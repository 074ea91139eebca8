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

from feedback_store.models import Prompt, Response
from feedback_store.progress import rater_progress
from feedback_store.queue import next_response_for
from feedback_store.votes import VoteError, record_rating
from labeling.app.auth import AccessDenied, Caller, caller_for
from labeling.app.markup import render_markdown, render_messages
from labeling.app.ui import Tone, empty_queue_html, progress_markdown, status_html

SAVED_KEYS_KEPT = 64
THUMBS = (("up", "👍 Good", "u"), ("down", "👎 Bad", "d"))


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


@dataclass(frozen=True)
class CardScreen:
    """A None field keeps what is already on screen."""

    status: str
    has_card: bool = True
    prompt_html: str | None = None
    response_html: str | None = None
    key: str | None = None
    progress_md: str | None = None
    empty_html: str | None = None
    failed: bool = False
    clear_inputs: bool = False


def _bind(tray: Tray | None, caller: Caller) -> Tray:
    return tray if tray is not None and tray.rater_id == caller.id else Tray(rater_id=caller.id)


def _deal(tray: Tray, caller: Caller, session) -> None:
    response = next_response_for(caller.id, session=session, exclude=tray.skipped)
    tray.card = Card(response.id, uuid.uuid4().hex) if response is not None else None


def _screen(tray: Tray, caller: Caller, session, status: str = "", *, clear_inputs: bool = False) -> CardScreen:
    progress = progress_markdown(rater_progress(caller.id, session=session))
    if tray.card is None:
        detail = (
            "You skipped the rest in this sitting: press the button below to see them again."
            if tray.skipped
            else "You have rated every response there is."
        )
        return CardScreen(status, has_card=False, key="", progress_md=progress, clear_inputs=clear_inputs,
                          empty_html=empty_queue_html("Nothing left to rate", detail))
    response = session.get(Response, tray.card.response_id)
    prompt = session.get(Prompt, response.prompt_id)
    return CardScreen(
        status,
        prompt_html=render_messages(prompt.messages),
        response_html=render_markdown(response.text),
        key=tray.card.key,
        progress_md=progress,
        clear_inputs=clear_inputs,
    )


def open_tray(state, tray: Tray | None, caller: Caller, *, forget_skipped: bool = False) -> tuple[Tray, CardScreen]:
    tray = _bind(tray, caller)
    if forget_skipped:
        tray.skipped.clear()
    with state.session() as session:
        if tray.card is None:
            _deal(tray, caller, session)
        return tray, _screen(tray, caller, session)


def rate(state, tray: Tray | None, caller: Caller, thumb: str, key: str,
         comment: str | None = None) -> tuple[Tray, CardScreen]:
    tray = _bind(tray, caller)
    if key and key in tray.saved_keys:
        with state.session() as session:
            return tray, _screen(tray, caller, session, status_html("Already saved.", Tone.info))
    card = tray.card
    if card is None or key != card.key:
        with state.session() as session:
            if card is None:
                _deal(tray, caller, session)
            message = "That response is no longer on your screen, so nothing was saved."
            return tray, _screen(tray, caller, session, status_html(message, Tone.warn))
    if thumb not in ("up", "down"):
        return tray, CardScreen(status_html(f"Not saved: unknown rating {thumb!r}.", Tone.error), key=card.key)
    try:
        with state.session() as session:
            record_rating(card.response_id, caller.id, thumb == "up", session=session,
                          comment=(comment or "").strip() or None, idempotency_key=key)
    except VoteError as error:
        return tray, CardScreen(status_html(f"Not saved: {error}.", Tone.error), key=card.key)
    except SQLAlchemyError as error:
        tray.failed_thumb = thumb
        reason = type(getattr(error, "orig", None) or error).__name__
        message = f"Save failed ({reason}). Your rating is NOT recorded yet: press Retry."
        return tray, CardScreen(status_html(message, Tone.error), key=card.key, failed=True)
    tray.saved_keys[key] = card.response_id
    while len(tray.saved_keys) > SAVED_KEYS_KEPT:
        tray.saved_keys.popitem(last=False)
    tray.failed_thumb = None
    with state.session() as session:
        _deal(tray, caller, session)
        return tray, _screen(tray, caller, session, status_html("Saved ✓", Tone.ok), clear_inputs=True)


def retry(state, tray: Tray | None, caller: Caller, key: str, comment: str | None = None) -> tuple[Tray, CardScreen]:
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
            return tray, _screen(tray, caller, session, status_html("Skipped.", Tone.info), clear_inputs=True)
        return tray, _screen(tray, caller, session)


# ---- the Gradio tab ------------------------------------------------------------------------


def _updates(tray: Tray, screen: CardScreen) -> tuple:
    def value(v):
        return gr.update() if v is None else v

    return (
        tray,
        value(screen.prompt_html),
        value(screen.response_html),
        value(screen.key),
        value(screen.progress_md),
        screen.status,
        gr.update(visible=screen.failed),
        gr.update(visible=screen.has_card),
        gr.update(visible=not screen.has_card),
        value(screen.empty_html),
        "" if screen.clear_inputs else gr.update(),
    )


def build_single_tab(state) -> dict:
    tray = gr.State(None)
    with gr.Row(elem_classes="pf-topbar", equal_height=True):
        progress = gr.Markdown("", elem_id="pf1-progress")
        status = gr.HTML("", elem_id="pf1-status", js_on_load=None)
        retry_button = gr.Button("Retry save", variant="stop", visible=False, elem_id="pf1-retry", size="sm",
                                 scale=0, min_width=120)
    key_box = gr.Textbox(visible="hidden", elem_id="pf1-key")
    with gr.Column(visible=False) as empty_area:
        empty_html = gr.HTML("", js_on_load=None)
        again_button = gr.Button("Show skipped responses again", size="sm", elem_id="pf1-again")
    with gr.Column() as card_area:
        prompt_html = gr.HTML("", elem_id="pf1-prompt", elem_classes="pf-box pf-prompt", js_on_load=None)
        gr.Markdown("#### Response", elem_classes="pf-side-title")
        response_html = gr.HTML("", elem_id="pf1-response", elem_classes="pf-box pf-response", js_on_load=None)
        with gr.Row(elem_classes="pf-choices"):
            buttons = {
                thumb: gr.Button(f"{label}  [{shortcut.upper()}]", variant="primary", elem_id=f"pf1-{thumb}",
                                 elem_classes=f"pf-key-{shortcut}")
                for thumb, label, shortcut in THUMBS
            }
            skip_button = gr.Button("Skip  [S]", elem_id="pf1-skip", elem_classes="pf-key-s")
        comment = gr.Textbox(label="Comment (optional)", lines=1, max_lines=4, elem_id="pf1-comment")

    outputs = [tray, prompt_html, response_html, key_box, progress, status, retry_button, card_area,
               empty_area, empty_html, comment]

    def run(action, request: gr.Request):
        try:
            caller = caller_for(state, request.username)
        except AccessDenied as error:
            raise gr.Error(str(error)) from None
        return _updates(*action(caller))

    def on_load(tray_value, request: gr.Request):
        return run(lambda caller: open_tray(state, tray_value, caller), request)

    def on_again(tray_value, request: gr.Request):
        return run(lambda caller: open_tray(state, tray_value, caller, forget_skipped=True), request)

    def make_rate(thumb: str):
        def on_rate(tray_value, key, comment_value, request: gr.Request):
            return run(lambda caller: rate(state, tray_value, caller, thumb, key, comment_value), request)

        return on_rate

    def on_retry(tray_value, key, comment_value, request: gr.Request):
        return run(lambda caller: retry(state, tray_value, caller, key, comment_value), request)

    def on_skip(tray_value, key, request: gr.Request):
        return run(lambda caller: skip(state, tray_value, caller, key), request)

    for thumb, button in buttons.items():
        button.click(make_rate(thumb), [tray, key_box, comment], outputs, api_name=f"rate_{thumb}",
                     show_progress="minimal")
    retry_button.click(on_retry, [tray, key_box, comment], outputs, api_name="retry_rating", show_progress="minimal")
    skip_button.click(on_skip, [tray, key_box], outputs, api_name="skip_response", show_progress="minimal")
    again_button.click(on_again, [tray], outputs, api_name="responses_again")
    return {"load": (on_load, [tray], outputs)}
