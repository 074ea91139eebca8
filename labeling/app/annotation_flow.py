"""The annotation state machine that both feedback pages run: the pairwise page deals pairs
and records votes (annotate.py), the single-response page deals response cards and records
ratings (single.py). A page supplies a `Mode` (what it deals, how it records, what it shows)
and its layout; everything else lives here, once.

Per browser session the page holds a `Sitting` in `gr.State` (server side): the item on
screen with its idempotency key, the items skipped in this sitting, the keys already saved,
the choice of a save that failed (for Retry) and the rater's progress. The key travels to
the page in a hidden box and comes back with each submission, so that:

- a double click or a retry sends the same key twice: the second finds the key among those
  already saved and records nothing;
- a submission whose key is not the one of the item on screen (an old tab, a replay) is
  refused without writing, rather than landing on whatever item is current;
- a judgement and the next item are one transaction (the mode's `save_and_deal`, over the
  store's record_vote_and_next / record_rating_and_next): if any part fails nothing is
  kept, the item and its key stay on screen, and Retry resends the same key, which the
  store's idempotency makes safe even if the first attempt did commit.

The rater is never taken from the submission: every handler receives the server-side
`Caller` (see auth.py), and a sitting built for someone else (or for the other page) is
replaced by a fresh one.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import gradio as gr
from sqlalchemy.exc import SQLAlchemyError

from feedback_store.edits import EditError
from feedback_store.progress import RaterProgress
from feedback_store.votes import VoteError
from labeling.app.auth import AccessDenied, Caller, caller_for
from labeling.app.ui import ProgressMemo, TextRefused, Tone, status_html

SAVED_KEYS_KEPT = 64  # keys remembered per sitting for "Already saved"


@dataclass(kw_only=True)
class Item:
    """What is on screen: one thing to judge, and the idempotency key of its judgement."""

    key: str

    @property
    def item_id(self) -> int:
        """The store id skips and saved keys refer to (a comparison, a response)."""
        raise NotImplementedError


ItemT = TypeVar("ItemT", bound=Item)
ExtrasT = TypeVar("ExtrasT")


@dataclass
class Sitting(Generic[ItemT]):
    """One browser session's state on one page, for one rater."""

    rater_id: int | None = None
    item: ItemT | None = None
    skipped: set[int] = field(default_factory=set)
    saved_keys: OrderedDict[str, int] = field(default_factory=OrderedDict)  # key -> item id
    failed_choice: str | None = None  # the choice of a save that failed, for Retry
    progress: ProgressMemo = field(default_factory=ProgressMemo)

    def remember_saved(self, key: str, item_id: int) -> None:
        self.saved_keys[key] = item_id
        while len(self.saved_keys) > SAVED_KEYS_KEPT:
            self.saved_keys.popitem(last=False)


@dataclass(frozen=True)
class Screen:
    """What the page shows after an event; a None field keeps what is already on screen."""

    status: str
    screen_html: str | None = None  # the item, or the empty-queue message
    key: str | None = None  # the item's key; "" when there is none
    progress_md: str | None = None
    clear_inputs: bool = False

    @property
    def has_item(self) -> bool | None:
        return None if self.key is None else bool(self.key)

    @property
    def failed(self) -> bool:
        return "pf-failed" in self.status


class Mode(ABC, Generic[ItemT, ExtrasT]):
    """What a page deals and what it records. `ExtrasT` holds the page's optional inputs that
    go with a choice (a vote's strength, rationale and edit; a rating's comment)."""

    sitting_type: ClassVar[type[Sitting]] = Sitting
    screen_type: ClassVar[type[Screen]] = Screen
    stale_message: ClassVar[str]  # a key that is not the one on screen
    answer_noun: ClassVar[str]  # "Your {answer_noun} is NOT recorded yet"
    refusals: ClassVar[tuple[type[Exception], ...]] = (VoteError, EditError)

    @abstractmethod
    def deal(self, state, sitting: Sitting[ItemT], caller: Caller, session) -> ItemT | None:
        """The rater's next item (reserving it where the mode reserves), or None."""

    @abstractmethod
    def save_and_deal(
        self,
        state,
        sitting: Sitting[ItemT],
        caller: Caller,
        item: ItemT,
        choice: str,
        extras: ExtrasT,
        session,
    ) -> ItemT | None:
        """Record `choice` on `item` under `item.key` and return the next item, in `session`
        (one transaction). Input it cannot record raises one of `refusals` before any write
        is kept."""

    def release(self, caller: Caller, item: ItemT, session) -> None:
        """Give a skipped item back (a reservation); nothing by default."""

    @abstractmethod
    def item_html(self, state, item: ItemT, session) -> str: ...

    @abstractmethod
    def empty_html(self, sitting: Sitting[ItemT]) -> str: ...

    @abstractmethod
    def progress_md(self, progress: RaterProgress) -> str: ...

    @abstractmethod
    def count_saved(self, progress: ProgressMemo) -> None:
        """Keep the local progress count up to date after a save."""


class AnnotationFlow(Generic[ItemT, ExtrasT]):
    """The state machine: open, submit, retry, skip. Every method takes the session's sitting
    (None on a first visit) and the server-side caller, and returns the sitting to keep and
    the screen to show."""

    def __init__(self, mode: Mode[ItemT, ExtrasT]) -> None:
        self.mode = mode

    def bind(self, sitting: Sitting[ItemT] | None, caller: Caller) -> Sitting[ItemT]:
        """A sitting belongs to one rater on one page: anything else starts from scratch."""
        if isinstance(sitting, self.mode.sitting_type) and sitting.rater_id == caller.id:
            return sitting
        return self.mode.sitting_type(rater_id=caller.id)

    def screen(
        self,
        state,
        sitting: Sitting[ItemT],
        caller: Caller,
        session,
        status: str = "",
        *,
        clear_inputs: bool = False,
    ) -> Screen:
        progress = self.mode.progress_md(sitting.progress.current(caller.id, session))
        if sitting.item is None:
            html, key = self.mode.empty_html(sitting), ""
        else:
            html, key = self.mode.item_html(state, sitting.item, session), sitting.item.key
        return self.mode.screen_type(
            status, html, key=key, progress_md=progress, clear_inputs=clear_inputs
        )

    def _deal(self, state, sitting: Sitting[ItemT], caller: Caller, session) -> None:
        sitting.item = self.mode.deal(state, sitting, caller, session)

    def open(
        self, state, sitting: Sitting[ItemT] | None, caller: Caller, *, forget_skipped: bool = False
    ) -> tuple[Sitting[ItemT], Screen]:
        """The page as it should look now (page load, reload; "see skipped items again")."""
        sitting = self.bind(sitting, caller)
        if forget_skipped:
            sitting.skipped.clear()
        with state.session() as session:
            if sitting.item is None:
                self._deal(state, sitting, caller, session)
            return sitting, self.screen(state, sitting, caller, session)

    def submit(
        self,
        state,
        sitting: Sitting[ItemT] | None,
        caller: Caller,
        choice: str,
        key: str | None,
        extras: ExtrasT,
    ) -> tuple[Sitting[ItemT], Screen]:
        """Record the caller's `choice` on the item on screen, once, and move to the next."""
        sitting = self.bind(sitting, caller)
        if key and key in sitting.saved_keys:
            with state.session() as session:
                return sitting, self.screen(
                    state, sitting, caller, session, status_html("Already saved.", Tone.info)
                )
        item = sitting.item
        if item is None or key != item.key:
            with state.session() as session:
                if item is None:
                    self._deal(state, sitting, caller, session)
                message = status_html(self.mode.stale_message, Tone.warn)
                return sitting, self.screen(state, sitting, caller, session, message)
        progress_before = dataclasses.replace(sitting.progress)
        try:
            # One transaction: the judgement and the next item. If any part fails nothing is
            # kept, and Retry (same key) does it all again.
            with state.session() as session:
                sitting.item = self.mode.save_and_deal(
                    state, sitting, caller, item, choice, extras, session
                )
                self.mode.count_saved(sitting.progress)
                screen = self.screen(
                    state,
                    sitting,
                    caller,
                    session,
                    status_html("Saved ✓", Tone.ok),
                    clear_inputs=True,
                )
        except self.mode.refusals as error:
            # Nothing was written: the item stays on screen with the inputs as they were.
            sitting.item, sitting.progress = item, progress_before
            return sitting, self.mode.screen_type(status_html(f"Not saved: {error}.", Tone.error))
        except SQLAlchemyError as error:
            # The database is unreachable or busy past its timeout: keep the screen and the key,
            # without touching the database again, and offer Retry.
            sitting.item, sitting.progress = item, progress_before
            sitting.failed_choice = choice
            reason = type(getattr(error, "orig", None) or error).__name__
            message = f"Save failed ({reason}). Your {self.mode.answer_noun} is NOT recorded yet: press Retry."
            return sitting, self.mode.screen_type(status_html(message, Tone.error, failed=True))
        sitting.remember_saved(key, item.item_id)
        sitting.failed_choice = None
        return sitting, screen

    def retry(
        self,
        state,
        sitting: Sitting[ItemT] | None,
        caller: Caller,
        key: str | None,
        extras: ExtrasT,
    ) -> tuple[Sitting[ItemT], Screen]:
        """Resend the choice of the save that failed, with the same key (and the inputs now on screen)."""
        sitting = self.bind(sitting, caller)
        if sitting.failed_choice is None:
            return self.open(state, sitting, caller)
        return self.submit(state, sitting, caller, sitting.failed_choice, key, extras)

    def skip(
        self, state, sitting: Sitting[ItemT] | None, caller: Caller, key: str | None
    ) -> tuple[Sitting[ItemT], Screen]:
        sitting = self.bind(sitting, caller)
        with state.session() as session:
            item = sitting.item
            if item is not None and item.key == key:
                self.mode.release(caller, item, session)
                sitting.skipped.add(item.item_id)
                sitting.failed_choice = None
                self._deal(state, sitting, caller, session)
                return sitting, self.screen(
                    state,
                    sitting,
                    caller,
                    session,
                    status_html("Skipped.", Tone.info),
                    clear_inputs=True,
                )
            return sitting, self.screen(state, sitting, caller, session)


# ---- the Gradio side both pages share ---------------------------------------------------------


def screen_frame(prefix: str):
    """What both feedback pages show: a top bar (progress, status, Retry), the hidden box with
    the idempotency key of the item on screen, and the screen itself. Element ids start with
    `prefix` (the CSS and the keyboard script address them)."""
    with gr.Row(elem_classes="pf-topbar", equal_height=True):
        progress = gr.Markdown("", elem_id=f"{prefix}-progress")
        status = gr.HTML("", elem_id=f"{prefix}-status", js_on_load=None)
        retry_button = gr.Button(
            "Retry save",
            variant="stop",
            elem_id=f"{prefix}-retry",
            elem_classes="pf-when-failed",
            size="sm",
            scale=0,
            min_width=120,
        )
    key_box = gr.Textbox(visible="hidden", elem_id=f"{prefix}-key")
    screen_html = gr.HTML("", elem_id=f"{prefix}-screen", js_on_load=None)
    return progress, status, retry_button, key_box, screen_html


# Inputs arrive raw (preprocess=False) and are checked by ui.text_input; outputs are plain
# values (postprocess=False). Both skip Gradio's per-component thread hops on each event.
FAST = {"preprocess": False, "postprocess": False, "show_progress": "minimal"}


class PageEvents:
    """A page's event handlers around its flow. The outputs of every event are
    [sitting, screen, key, progress, status, *inputs], the inputs being those a save clears
    (to the values in `cleared`)."""

    def __init__(self, state, flow: AnnotationFlow, cleared: tuple) -> None:
        self.state, self.flow, self.cleared = state, flow, cleared

    def updates(self, sitting, screen: Screen) -> tuple:
        # Plain values only on the common path: any gr.update() makes Gradio rebuild a component.
        keep = gr.update()
        return (
            sitting,
            keep if screen.screen_html is None else screen.screen_html,
            keep if screen.key is None else screen.key,
            keep if screen.progress_md is None else screen.progress_md,
            screen.status,
            *(self.cleared if screen.clear_inputs else (keep,) * len(self.cleared)),
        )

    def caller_of(self, request: gr.Request) -> Caller:
        try:
            return caller_for(self.state, request.username)
        except AccessDenied as error:
            raise gr.Error(str(error)) from None

    def run(
        self, action: Callable[[Caller], tuple[Any, Screen]], request: gr.Request, held=None
    ) -> tuple:
        """Run `action` for the signed-in caller, one event of theirs at a time. Client text
        refused by ui.text_input stores nothing: the item and the inputs stay as they were."""
        caller = self.caller_of(request)
        with self.state.rater_lock(caller.id):
            try:
                return self.updates(*action(caller))
            except TextRefused as refusal:
                return self.updates(
                    held, self.flow.mode.screen_type(status_html(str(refusal), Tone.error))
                )
