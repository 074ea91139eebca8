"""The pairwise page: one prompt, two responses side by side, one judgement.

What the page holds per browser session is a `Desk` in `gr.State` (server side): the pair
on screen, its idempotency key, the pairs skipped in this sitting. The key travels to the
page in a hidden box and comes back with each submission, so that:

- a double click or a retry sends the same key twice: the second finds the key among
  those already saved and records nothing;
- a submission whose key is not the one of the pair on screen (an old tab, a replay) is
  refused without writing, rather than landing on whatever pair is current;
- a failed save leaves the pair and its key on screen: Retry resends the same key, and the
  store's idempotency makes that safe even if the first attempt did commit.

The rater is never taken from the submission: every handler receives the server-side
`Caller` (see auth.py), and the desk is reset if it was built for someone else.
"""

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import timedelta

import gradio as gr
from sqlalchemy.exc import SQLAlchemyError

from feedback_store.catalog import add_comparison, add_response, get_or_create_policy
from feedback_store.models import Choice, Comparison, Response
from feedback_store.queue import next_comparison_for, release
from feedback_store.votes import VoteError, record_vote
from labeling.app.auth import AccessDenied, Caller, caller_for
from labeling.app.ui import (
    TEXT_LIMITS,
    TextRefused,
    ProgressMemo,
    Tone,
    empty_queue_html,
    pair_screen_html,
    progress_markdown,
    prompt_html,
    response_html,
    status_html,
    text_input,
)

SIDES = ("left", "right", "tie", "both_bad")
STRENGTHS = {"slightly better": 1, "clearly better": 2}
HUMAN_EDIT_POLICY = "human-edit"
SAVED_KEYS_KEPT = 64
BUTTONS = (  # side, label, keyboard key
    ("left", "A is better", "1"),
    ("right", "B is better", "2"),
    ("tie", "Tie", "3"),
    ("both_bad", "Both bad", "4"),
)


@dataclass
class Slot:
    """The pair on screen. `a_id`/`b_id` are the comparison's canonical order."""

    comparison_id: int
    prompt_id: int
    a_id: int
    b_id: int
    left_id: int
    key: str
    shown_at: float
    edit_source_id: int | None = None

    @property
    def right_id(self) -> int:
        return self.b_id if self.left_id == self.a_id else self.a_id


@dataclass
class Desk:
    rater_id: int | None = None
    slot: Slot | None = None
    skipped: set = field(default_factory=set)
    saved_keys: OrderedDict = field(default_factory=OrderedDict)  # key -> comparison id
    failed_side: str | None = None  # the choice of a save that failed, for Retry
    progress: ProgressMemo = field(default_factory=ProgressMemo)


@dataclass(frozen=True)
class PairScreen:
    """What the page shows after an event; a None field keeps what is already on screen."""

    status: str
    screen_html: str | None = None  # the prompt and both responses, or the empty-queue message
    key: str | None = None
    progress_md: str | None = None
    clear_inputs: bool = False

    @property
    def has_pair(self) -> bool | None:
        return None if self.key is None else bool(self.key)

    @property
    def failed(self) -> bool:
        return "pf-failed" in self.status


class EditError(ValueError):
    """An edit that cannot be stored as given."""


def _bind(desk: Desk | None, caller: Caller) -> Desk:
    # A desk belongs to one rater: a session hash reused by someone else starts from scratch.
    return desk if desk is not None and desk.rater_id == caller.id else Desk(rater_id=caller.id)


def _assign(state, desk: Desk, caller: Caller, session) -> None:
    assignment = next_comparison_for(
        caller.id,
        session=session,
        exclude=desk.skipped,
        reservation=timedelta(seconds=state.config.reservation_s),
    )
    if assignment is None:
        desk.slot = None
        return
    comparison = session.get(Comparison, assignment.comparison_id)
    desk.slot = Slot(
        comparison_id=comparison.id,
        prompt_id=comparison.prompt_id,
        a_id=comparison.response_a_id,
        b_id=comparison.response_b_id,
        left_id=assignment.left_response_id,
        key=uuid.uuid4().hex,
        shown_at=time.time(),
    )


def _screen(
    state, desk: Desk, caller: Caller, session, status: str = "", *, clear_inputs: bool = False
) -> PairScreen:
    progress = progress_markdown(desk.progress.current(caller.id, session))
    if desk.slot is None:
        detail = (
            f"You skipped {len(desk.skipped)} pair(s) in this sitting: press the button below to see them again."
            if desk.skipped
            else "Every pair has its votes for now. New pairs appear when an admin generates them; "
            "meanwhile, try the single-response tab."
        )
        return PairScreen(
            status,
            empty_queue_html("Nothing left to rank right now", detail),
            key="",
            progress_md=progress,
            clear_inputs=clear_inputs,
        )
    slot = desk.slot
    screen = pair_screen_html(
        prompt_html(state, slot.prompt_id, session),
        response_html(state, slot.left_id, session),
        response_html(state, slot.right_id, session),
    )
    return PairScreen(status, screen, key=slot.key, progress_md=progress, clear_inputs=clear_inputs)


def open_desk(state, desk: Desk | None, caller: Caller) -> tuple[Desk, PairScreen]:
    """The page as it should look now (page load, reload button)."""
    desk = _bind(desk, caller)
    with state.session() as session:
        if desk.slot is None:
            _assign(state, desk, caller, session)
        return desk, _screen(state, desk, caller, session)


def show_skipped_again(state, desk: Desk | None, caller: Caller) -> tuple[Desk, PairScreen]:
    desk = _bind(desk, caller)
    desk.skipped.clear()
    return open_desk(state, desk, caller)


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


def _store_edit(session, slot: Slot, side: str, caller: Caller, text: str, key: str) -> None:
    """An edited answer becomes a response of its own (an SFT example) and a pair it wins."""
    source_id = {"left": slot.left_id, "right": slot.right_id}.get(side, slot.edit_source_id)
    if source_id is None:
        raise EditError(
            "to submit an edit, mark A or B as better, or start the edit from one of them"
        )
    source = session.get(Response, source_id)
    if text.strip() == source.text.strip():
        return  # untouched: nothing to learn from
    policy = get_or_create_policy(
        HUMAN_EDIT_POLICY,
        session=session,
        base_model="human",
        description="answers edited by annotators",
    )
    edited, _ = add_response(
        slot.prompt_id,
        policy.id,
        text.strip(),
        session=session,
        edited_from_id=source.id,
        author_rater_id=caller.id,
    )
    pair, _ = add_comparison(edited, source, session=session, source="human-edit")
    choice = Choice.a if pair.response_a_id == edited.id else Choice.b
    record_vote(
        pair.id,
        caller.id,
        choice,
        session=session,
        rationale="edited answer",
        idempotency_key=f"{key}:edit",
    )


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
    desk = _bind(desk, caller)
    if key and key in desk.saved_keys:
        with state.session() as session:
            return desk, _screen(
                state, desk, caller, session, status_html("Already saved.", Tone.info)
            )
    slot = desk.slot
    if slot is None or key != slot.key:
        with state.session() as session:
            if slot is None:
                _assign(state, desk, caller, session)
            message = "That pair is no longer on your screen, so nothing was saved. Here is your current pair."
            return desk, _screen(state, desk, caller, session, status_html(message, Tone.warn))
    progress_before = desk.progress.value
    try:
        # One transaction: the vote, an edit if any, and the next reservation. If any part
        # fails nothing is kept, and Retry (same key) does it all again.
        with state.session() as session:
            record_vote(
                slot.comparison_id,
                caller.id,
                _canonical_choice(slot, side),
                session=session,
                strength=_strength(side, strength),
                rationale=(rationale or "").strip() or None,
                left_response_id=slot.left_id,
                time_spent_ms=int((time.time() - slot.shown_at) * 1000),
                idempotency_key=key,
            )
            if edit_text and edit_text.strip():
                _store_edit(session, slot, side, caller, edit_text, key)
            desk.slot = None
            _assign(state, desk, caller, session)
            desk.progress.add_vote()
            screen = _screen(
                state, desk, caller, session, status_html("Saved ✓", Tone.ok), clear_inputs=True
            )
    except (VoteError, EditError) as error:
        # Nothing was written: the pair stays on screen with the inputs as they were.
        desk.slot, desk.progress.value = slot, progress_before
        return desk, PairScreen(status_html(f"Not saved: {error}.", Tone.error))
    except SQLAlchemyError as error:
        # The database is unreachable or busy past its timeout: keep the screen and the key,
        # without touching the database again, and offer Retry.
        desk.slot, desk.progress.value = slot, progress_before
        desk.failed_side = side
        reason = type(getattr(error, "orig", None) or error).__name__
        message = f"Save failed ({reason}). Your answer is NOT recorded yet: press Retry."
        return desk, PairScreen(status_html(message, Tone.error, failed=True))
    desk.saved_keys[key] = slot.comparison_id
    while len(desk.saved_keys) > SAVED_KEYS_KEPT:
        desk.saved_keys.popitem(last=False)
    desk.failed_side = None
    return desk, screen


def retry(
    state,
    desk: Desk | None,
    caller: Caller,
    key: str,
    strength: str | None = None,
    rationale: str | None = None,
    edit_text: str | None = None,
) -> tuple[Desk, PairScreen]:
    desk = _bind(desk, caller)
    if desk.failed_side is None:
        return open_desk(state, desk, caller)
    return submit(state, desk, caller, desk.failed_side, key, strength, rationale, edit_text)


def skip(state, desk: Desk | None, caller: Caller, key: str) -> tuple[Desk, PairScreen]:
    desk = _bind(desk, caller)
    with state.session() as session:
        if desk.slot is not None and desk.slot.key == key:
            release(caller.id, desk.slot.comparison_id, session=session)
            desk.skipped.add(desk.slot.comparison_id)
            desk.slot = None
            desk.failed_side = None
            _assign(state, desk, caller, session)
            return desk, _screen(
                state, desk, caller, session, status_html("Skipped.", Tone.info), clear_inputs=True
            )
        return desk, _screen(state, desk, caller, session)


def start_edit(state, desk: Desk | None, caller: Caller, side: str, key: str) -> tuple[Desk, str]:
    """Copy one side's text into the editor; an edit then improves that response."""
    desk = _bind(desk, caller)
    if desk.slot is None or desk.slot.key != key or side not in ("left", "right"):
        return desk, ""
    desk.slot.edit_source_id = desk.slot.left_id if side == "left" else desk.slot.right_id
    with state.session() as session:
        return desk, session.get(Response, desk.slot.edit_source_id).text


# ---- the Gradio tab ------------------------------------------------------------------------


def _updates(desk: Desk, screen: PairScreen) -> tuple:
    # Plain values only on the common path: any gr.update() makes Gradio rebuild a component.
    keep = gr.update()
    clear = screen.clear_inputs
    return (
        desk,
        keep if screen.screen_html is None else screen.screen_html,
        keep if screen.key is None else screen.key,
        keep if screen.progress_md is None else screen.progress_md,
        screen.status,
        None if clear else keep,
        "" if clear else keep,
        "" if clear else keep,
    )


def screen_frame(prefix: str):
    """What both feedback modes show: a top bar (progress, status, Retry), the hidden box with
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

    def caller_of(request: gr.Request) -> Caller:
        try:
            return caller_for(state, request.username)
        except AccessDenied as error:
            raise gr.Error(str(error)) from None

    def run(action, request: gr.Request, held: Desk | None = None):
        caller = caller_of(request)
        with state.rater_lock(caller.id):
            try:
                return _updates(*action(caller))
            except TextRefused as refusal:  # nothing stored: the pair and the inputs stay as they were
                return _updates(held, PairScreen(status_html(str(refusal), Tone.error)))

    def on_load(desk_value, request: gr.Request):
        return run(lambda caller: open_desk(state, desk_value, caller), request)

    def on_again(desk_value, request: gr.Request):
        return run(lambda caller: show_skipped_again(state, desk_value, caller), request)

    def make_vote(side: str):
        def on_vote(
            desk_value, key, strength_value, rationale_value, edit_value, request: gr.Request
        ):
            return run(
                lambda caller: submit(
                    state,
                    desk_value,
                    caller,
                    side,
                    text_input(key, "key"),
                    text_input(strength_value, "strength"),
                    text_input(rationale_value, "rationale"),
                    text_input(edit_value, "edit"),
                ),
                request,
                desk_value,
            )

        return on_vote

    def on_retry(desk_value, key, strength_value, rationale_value, edit_value, request: gr.Request):
        return run(
            lambda caller: retry(
                state,
                desk_value,
                caller,
                text_input(key, "key"),
                text_input(strength_value, "strength"),
                text_input(rationale_value, "rationale"),
                text_input(edit_value, "edit"),
            ),
            request,
            desk_value,
        )

    def on_skip(desk_value, key, request: gr.Request):
        return run(lambda caller: skip(state, desk_value, caller, text_input(key, "key")), request, desk_value)

    def make_copy(side: str):
        def on_copy(desk_value, key, request: gr.Request):
            caller = caller_of(request)
            with state.rater_lock(caller.id):
                try:
                    key = text_input(key, "key")
                except TextRefused as refusal:
                    raise gr.Error(str(refusal)) from None
                return start_edit(state, desk_value, caller, side, key)

        return on_copy

    # Inputs arrive raw (preprocess=False) and are checked by text_input; outputs are plain
    # strings (postprocess=False). Both skip Gradio's per-component thread hops on each vote.
    fast = dict(preprocess=False, postprocess=False, show_progress="minimal")
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
