"""The pairwise page: one prompt, two responses side by side, one judgement.

The page runs the annotation state machine both feedback pages share (annotation_flow.py):
this module says what it deals (`Slot`: a pair reserved for the rater, with the side shown on
the left) and what it records (a vote, with an edit if any: feedback_store.votes.
record_vote_and_next, one transaction with the next reservation), and lays the page out.
"""

import random
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import gradio as gr

from feedback_store.edits import EditError
from feedback_store.gold import next_pair_for
from feedback_store.models import Choice, Comparison, Response
from feedback_store.queue import release
from feedback_store.sittings import record_vote_and_next
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
    TextRefused,
    empty_queue_html,
    pair_screen_html,
    progress_markdown,
    prompt_html,
    response_html,
    text_input,
)

SIDES = ("left", "right", "tie", "both_bad")
STRENGTHS = {"slightly better": 1, "clearly better": 2}
BUTTONS = (  # side, label, keyboard key
    ("left", "A is better", "1"),
    ("right", "B is better", "2"),
    ("tie", "Tie", "3"),
    ("both_bad", "Both bad", "4"),
)


@dataclass
class Slot(Item):
    """The pair on screen. `a_id`/`b_id` are the comparison's canonical order."""

    comparison_id: int
    prompt_id: int
    a_id: int
    b_id: int
    left_id: int
    shown_at: float
    edit_source_id: int | None = None

    @property
    def item_id(self) -> int:
        return self.comparison_id

    @property
    def right_id(self) -> int:
        return self.b_id if self.left_id == self.a_id else self.a_id


@dataclass
class Desk(Sitting[Slot]):
    """The pairwise page's sitting; `slot` is the pair on screen."""

    @property
    def slot(self) -> Slot | None:
        return self.item

    @slot.setter
    def slot(self, slot: Slot | None) -> None:
        self.item = slot


@dataclass(frozen=True)
class PairScreen(Screen):
    @property
    def has_pair(self) -> bool | None:
        return self.has_item


@dataclass(frozen=True)
class VoteExtras:
    """The optional inputs that go with a vote."""

    strength: str | None = None
    rationale: str | None = None
    edit_text: str | None = None


def _canonical_choice(slot: Slot, side: str) -> Choice:
    if side in ("left", "right"):
        picked = slot.left_id if side == "left" else slot.right_id
        return Choice.a if picked == slot.a_id else Choice.b
    if side in ("tie", "both_bad"):
        return Choice(side)
    raise VoteError(f"choice must be one of {', '.join(SIDES)} (got {side!r})")


def _strength(side: str, strength: str | None) -> int | None:
    if side not in ("left", "right") or not strength:
        return None  # strength qualifies a preference; a tie has none
    if strength not in STRENGTHS:
        raise VoteError(f"strength must be one of {', '.join(STRENGTHS)} (got {strength!r})")
    return STRENGTHS[strength]


class Pairs(Mode[Slot, VoteExtras]):
    """Deals reserved pairs, records votes (and edits).

    Dealing mixes gold pairs in at the admin-set gold rate (feedback_store.gold.next_pair_for):
    a gold pair is reserved, shown and voted on exactly like any other, so nothing the page
    sends tells it apart. `rng` draws the gold pairs and the left side (None: the system's
    random source; tests pass a seeded one)."""

    sitting_type = Desk
    screen_type = PairScreen
    stale_message = (
        "That pair is no longer on your screen, so nothing was saved. Here is your current pair."
    )
    answer_noun = "answer"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng

    def _slot(self, assignment, session) -> Slot | None:
        if assignment is None:
            return None
        comparison = session.get(Comparison, assignment.comparison_id)
        return Slot(
            key=uuid.uuid4().hex,
            comparison_id=comparison.id,
            prompt_id=comparison.prompt_id,
            a_id=comparison.response_a_id,
            b_id=comparison.response_b_id,
            left_id=assignment.left_response_id,
            shown_at=time.time(),
        )

    def deal(self, state, sitting, caller, session) -> Slot | None:
        assignment = next_pair_for(
            caller.id,
            session=session,
            exclude=sitting.skipped,
            reservation=timedelta(seconds=state.config.reservation_s),
            rng=self.rng,
        )
        return self._slot(assignment, session)

    def save_and_deal(
        self, state, sitting, caller, slot: Slot, side: str, extras: VoteExtras, session
    ):
        choice, strength = _canonical_choice(slot, side), _strength(side, extras.strength)
        edit_text = extras.edit_text if extras.edit_text and extras.edit_text.strip() else None
        # An edit improves the side marked better, or the side the edit was started from.
        edit_source = {"left": slot.left_id, "right": slot.right_id}.get(side, slot.edit_source_id)
        if edit_text is not None and edit_source is None:
            raise EditError(
                "to submit an edit, mark A or B as better, or start the edit from one of them"
            )
        _, assignment = record_vote_and_next(
            slot.comparison_id,
            caller.id,
            choice,
            session=session,
            idempotency_key=slot.key,
            strength=strength,
            rationale=(extras.rationale or "").strip() or None,
            left_response_id=slot.left_id,
            time_spent_ms=int((time.time() - slot.shown_at) * 1000),
            edit_text=edit_text,
            edit_source_id=edit_source,
            exclude=sitting.skipped,
            reservation=timedelta(seconds=state.config.reservation_s),
            rng=self.rng,
        )
        return self._slot(assignment, session)

    def release(self, caller, slot: Slot, session) -> None:
        release(caller.id, slot.comparison_id, session=session)

    def item_html(self, state, slot: Slot, session) -> str:
        return pair_screen_html(
            prompt_html(state, slot.prompt_id, session),
            response_html(state, slot.left_id, session),
            response_html(state, slot.right_id, session),
        )

    def empty_html(self, sitting) -> str:
        detail = (
            f"You skipped {len(sitting.skipped)} pair(s) in this sitting: press the button below to see them again."
            if sitting.skipped
            else "Every pair has its votes for now. New pairs appear when an admin generates them; "
            "meanwhile, try the single-response tab."
        )
        return empty_queue_html("Nothing left to rank right now", detail)

    def progress_md(self, progress) -> str:
        return progress_markdown(progress)

    def count_saved(self, progress: ProgressMemo) -> None:
        progress.add_vote()


PAIRS: AnnotationFlow[Slot, VoteExtras] = AnnotationFlow(Pairs())


def open_desk(state, desk: Desk | None, caller: Caller) -> tuple[Desk, PairScreen]:
    """The page as it should look now (page load, reload button)."""
    return PAIRS.open(state, desk, caller)


def show_skipped_again(state, desk: Desk | None, caller: Caller) -> tuple[Desk, PairScreen]:
    return PAIRS.open(state, desk, caller, forget_skipped=True)


def submit(
    state,
    desk: Desk | None,
    caller: Caller,
    side: str,
    key: str,
    strength: str | None = None,
    rationale: str | None = None,
    edit_text: str | None = None,
) -> tuple[Desk, PairScreen]:
    """Record the caller's judgement of the pair on screen, once, and move to the next pair."""
    return PAIRS.submit(state, desk, caller, side, key, VoteExtras(strength, rationale, edit_text))


def retry(
    state,
    desk: Desk | None,
    caller: Caller,
    key: str,
    strength: str | None = None,
    rationale: str | None = None,
    edit_text: str | None = None,
) -> tuple[Desk, PairScreen]:
    return PAIRS.retry(state, desk, caller, key, VoteExtras(strength, rationale, edit_text))


def skip(state, desk: Desk | None, caller: Caller, key: str) -> tuple[Desk, PairScreen]:
    return PAIRS.skip(state, desk, caller, key)


def start_edit(state, desk: Desk | None, caller: Caller, side: str, key: str) -> tuple[Desk, str]:
    """Copy one side's text into the editor; an edit then improves that response."""
    desk = PAIRS.bind(desk, caller)
    if desk.slot is None or desk.slot.key != key or side not in ("left", "right"):
        return desk, ""
    desk.slot.edit_source_id = desk.slot.left_id if side == "left" else desk.slot.right_id
    with state.session() as session:
        return desk, session.get(Response, desk.slot.edit_source_id).text


# ---- the Gradio tab ------------------------------------------------------------------------


def build_annotate_tab(state) -> dict:
    """Lay out the pairwise page inside the current Blocks and wire its events.

    Which controls show (Retry, the choice buttons, "check again") follows from the markup
    of the screen and the status (see assets.CSS), so an event never has to send layout
    updates: that keeps each vote to one small set of plain values.
    """
    desk = gr.State(None)
    with gr.Column(elem_id="pf-annotate"):
        progress, status, retry_button, key_box, screen_html = screen_frame("pf")
        again_button = gr.Button(
            "Check for pairs again", elem_id="pf-again", size="sm", elem_classes="pf-when-empty"
        )
        with gr.Row(elem_classes="pf-choices pf-when-pair"):
            buttons = {
                side: gr.Button(
                    f"{label}  [{shortcut}]",
                    variant="primary" if side in ("left", "right") else "secondary",
                    elem_id=f"pf-vote-{side}",
                    elem_classes=f"pf-key-{shortcut}",
                )
                for side, label, shortcut in BUTTONS
            }
            skip_button = gr.Button(
                "Skip  [S]", variant="secondary", elem_id="pf-skip", elem_classes="pf-key-s"
            )
        with gr.Row(elem_classes="pf-when-pair"):
            strength = gr.Radio(
                list(STRENGTHS),
                value=None,
                label="How much better? (optional)",
                elem_id="pf-strength",
            )
            rationale = gr.Textbox(
                label="Why? (optional)",
                lines=1,
                max_lines=4,
                max_length=TEXT_LIMITS["rationale"],
                elem_id="pf-rationale",
            )
        with gr.Accordion(
            "Edit the better answer (optional)", open=False, elem_classes="pf-when-pair"
        ):
            with gr.Row():
                copy_left = gr.Button("Start from A", size="sm", elem_id="pf-copy-left")
                copy_right = gr.Button("Start from B", size="sm", elem_id="pf-copy-right")
            edit_box = gr.Textbox(
                label="Improved answer: saved with your vote as a new, preferred response",
                lines=6,
                max_length=TEXT_LIMITS["edit"],
                elem_id="pf-edit",
            )

    outputs = [desk, screen_html, key_box, progress, status, strength, rationale, edit_box]
    events = PageEvents(state, PAIRS, cleared=(None, "", ""))
    run = events.run

    def extras(strength_value, rationale_value, edit_value) -> VoteExtras:
        return VoteExtras(
            text_input(strength_value, "strength"),
            text_input(rationale_value, "rationale"),
            text_input(edit_value, "edit"),
        )

    def on_load(desk_value, request: gr.Request):
        return run(lambda caller: PAIRS.open(state, desk_value, caller), request)

    def on_again(desk_value, request: gr.Request):
        return run(
            lambda caller: PAIRS.open(state, desk_value, caller, forget_skipped=True), request
        )

    def make_vote(side: str):
        def on_vote(
            desk_value, key, strength_value, rationale_value, edit_value, request: gr.Request
        ):
            return run(
                lambda caller: PAIRS.submit(
                    state,
                    desk_value,
                    caller,
                    side,
                    text_input(key, "key"),
                    extras(strength_value, rationale_value, edit_value),
                ),
                request,
                desk_value,
            )

        return on_vote

    def on_retry(desk_value, key, strength_value, rationale_value, edit_value, request: gr.Request):
        return run(
            lambda caller: PAIRS.retry(
                state,
                desk_value,
                caller,
                text_input(key, "key"),
                extras(strength_value, rationale_value, edit_value),
            ),
            request,
            desk_value,
        )

    def on_skip(desk_value, key, request: gr.Request):
        return run(
            lambda caller: PAIRS.skip(state, desk_value, caller, text_input(key, "key")),
            request,
            desk_value,
        )

    def make_copy(side: str):
        def on_copy(desk_value, key, request: gr.Request):
            caller = events.caller_of(request)
            with state.rater_lock(caller.id):
                try:
                    key = text_input(key, "key")
                except TextRefused as refusal:
                    raise gr.Error(str(refusal)) from None
                return start_edit(state, desk_value, caller, side, key)

        return on_copy

    fast = FAST
    vote_inputs = [desk, key_box, strength, rationale, edit_box]
    for side, button in buttons.items():
        button.click(make_vote(side), vote_inputs, outputs, api_name=f"vote_{side}", **fast)
    retry_button.click(on_retry, vote_inputs, outputs, api_name="retry_vote", **fast)
    skip_button.click(on_skip, [desk, key_box], outputs, api_name="skip_pair", **fast)
    again_button.click(on_again, [desk], outputs, api_name="pairs_again", **fast)
    copy_left.click(
        make_copy("left"), [desk, key_box], [desk, edit_box], api_name="edit_from_a", **fast
    )
    copy_right.click(
        make_copy("right"), [desk, key_box], [desk, edit_box], api_name="edit_from_b", **fast
    )
    return {"load": (on_load, [desk], outputs, fast)}
