"""Single-response mode: thumbs up or down on one answer, with an optional comment.

This is the unpaired signal KTO trains on. The page runs the annotation state machine the
pairwise page runs (annotation_flow.py): this module says what it deals (`Card`: a response
the rater has not rated) and what it records (a rating: feedback_store.votes.
record_rating_and_next, one transaction with picking the next card), and lays the page out.
"""

import uuid
from dataclasses import dataclass

import gradio as gr

from feedback_store.models import Response
from feedback_store.queue import next_response_for
from feedback_store.sittings import record_rating_and_next
from feedback_store.votes import VoteError
from labeling.app.annotation_flow import (
    FAST,
    AnnotationFlow,
    Item,
    Mode,
    PageEvents,
    Screen,
    Sitting,
    screen_frame,
)
from labeling.app.auth import Caller
from labeling.app.ui import (
    TEXT_LIMITS,
    ProgressMemo,
    card_screen_html,
    empty_queue_html,
    progress_markdown,
    prompt_html,
    response_html,
    text_input,
)

THUMBS = (("up", "Good", "u"), ("down", "Bad", "d"))  # no emoji: not every system has the font


@dataclass
class Card(Item):
    """The response on screen."""

    response_id: int

    @property
    def item_id(self) -> int:
        return self.response_id


@dataclass
class Tray(Sitting[Card]):
    """The single-response page's sitting; `card` is the response on screen."""

    @property
    def card(self) -> Card | None:
        return self.item

    @card.setter
    def card(self, card: Card | None) -> None:
        self.item = card


@dataclass(frozen=True)
class CardScreen(Screen):
    @property
    def has_card(self) -> bool | None:
        return self.has_item


@dataclass(frozen=True)
class RatingExtras:
    """The optional input that goes with a rating."""

    comment: str | None = None


class Cards(Mode[Card, RatingExtras]):
    """Deals responses the rater has not rated, records ratings."""

    sitting_type = Tray
    screen_type = CardScreen
    stale_message = "That response is no longer on your screen, so nothing was saved."
    answer_noun = "rating"

    @staticmethod
    def _card(response: Response | None) -> Card | None:
        return Card(key=uuid.uuid4().hex, response_id=response.id) if response is not None else None

    def deal(self, state, sitting, caller, session) -> Card | None:
        return self._card(next_response_for(caller.id, session=session, exclude=sitting.skipped))

    def save_and_deal(
        self, state, sitting, caller, card: Card, thumb: str, extras: RatingExtras, session
    ):
        if thumb not in ("up", "down"):
            raise VoteError(f"unknown rating {thumb!r}")
        _, response = record_rating_and_next(
            card.response_id,
            caller.id,
            thumb == "up",
            session=session,
            comment=(extras.comment or "").strip() or None,
            idempotency_key=card.key,
            exclude=sitting.skipped,
        )
        return self._card(response)

    def item_html(self, state, card: Card, session) -> str:
        response = session.get(Response, card.response_id)
        return card_screen_html(
            prompt_html(state, response.prompt_id, session),
            response_html(state, response.id, session),
        )

    def empty_html(self, sitting) -> str:
        detail = (
            "You skipped the rest in this sitting: press the button below to see them again."
            if sitting.skipped
            else "You have rated every response there is."
        )
        return empty_queue_html("Nothing left to rate", detail)

    def progress_md(self, progress) -> str:
        return progress_markdown(progress, ratings=True)

    def count_saved(self, progress: ProgressMemo) -> None:
        progress.add_rating()


CARDS: AnnotationFlow[Card, RatingExtras] = AnnotationFlow(Cards())


def open_tray(
    state, tray: Tray | None, caller: Caller, *, forget_skipped: bool = False
) -> tuple[Tray, CardScreen]:
    return CARDS.open(state, tray, caller, forget_skipped=forget_skipped)


def rate(
    state, tray: Tray | None, caller: Caller, thumb: str, key: str, comment: str | None = None
) -> tuple[Tray, CardScreen]:
    return CARDS.submit(state, tray, caller, thumb, key, RatingExtras(comment))


def retry(
    state, tray: Tray | None, caller: Caller, key: str, comment: str | None = None
) -> tuple[Tray, CardScreen]:
    return CARDS.retry(state, tray, caller, key, RatingExtras(comment))


def skip(state, tray: Tray | None, caller: Caller, key: str) -> tuple[Tray, CardScreen]:
    return CARDS.skip(state, tray, caller, key)


# ---- the Gradio tab ------------------------------------------------------------------------


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
    run = PageEvents(state, CARDS, cleared=("",)).run

    def on_load(tray_value, request: gr.Request):
        return run(lambda caller: CARDS.open(state, tray_value, caller), request)

    def on_again(tray_value, request: gr.Request):
        return run(
            lambda caller: CARDS.open(state, tray_value, caller, forget_skipped=True), request
        )

    def make_rate(thumb: str):
        def on_rate(tray_value, key, comment_value, request: gr.Request):
            return run(
                lambda caller: CARDS.submit(
                    state,
                    tray_value,
                    caller,
                    thumb,
                    text_input(key, "key"),
                    RatingExtras(text_input(comment_value, "comment")),
                ),
                request,
                tray_value,
            )

        return on_rate

    def on_retry(tray_value, key, comment_value, request: gr.Request):
        return run(
            lambda caller: CARDS.retry(
                state,
                tray_value,
                caller,
                text_input(key, "key"),
                RatingExtras(text_input(comment_value, "comment")),
            ),
            request,
            tray_value,
        )

    def on_skip(tray_value, key, request: gr.Request):
        return run(
            lambda caller: CARDS.skip(state, tray_value, caller, text_input(key, "key")),
            request,
            tray_value,
        )

    fast = FAST
    for thumb, button in buttons.items():
        button.click(
            make_rate(thumb), [tray, key_box, comment], outputs, api_name=f"rate_{thumb}", **fast
        )
    retry_button.click(on_retry, [tray, key_box, comment], outputs, api_name="retry_rating", **fast)
    skip_button.click(on_skip, [tray, key_box], outputs, api_name="skip_response", **fast)
    again_button.click(on_again, [tray], outputs, api_name="responses_again", **fast)
    return {"load": (on_load, [tray], outputs, fast)}
