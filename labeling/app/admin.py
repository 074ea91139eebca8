"""The admin page: prompts in, background jobs, exports, users, overlap and guidelines, and the
queue's order, gold pairs and rater quality (strategy, gold rate, quality threshold, weights).

Every handler starts by resolving the caller from the server-side session and refusing
non-admins, so hiding the tab is a convenience and the check holds for direct HTTP API
calls too. Long work (generation, judging, training) runs as `prefloop` subprocesses.
"""

import math
import tempfile
from pathlib import Path

import gradio as gr

from feedback_store.app_settings import (
    GUIDELINES_SETTING,
    gold_rate,
    guidelines,
    quality_threshold,
    set_gold_rate,
    set_quality_threshold,
    set_setting,
    set_target_overlap,
)
from feedback_store.models import RaterKind, Role
from feedback_store.queue import target_overlap
from feedback_store.queue_strategies import STRATEGIES, current_strategy
from feedback_store.raters import create_user, get_rater, list_users
from labeling.app.auth import AccessDenied, Caller, admin_for
from labeling.app.jobs import JOB_COMMANDS, Job
from labeling.app.markup import render_markdown

EXPORT_FORMATS = ("dpo", "kto", "reward", "sft")


class AdminError(ValueError):
    """A refused admin action, shown to the admin as one line."""


# ---- actions (plain functions of the store, tested directly) --------------------------------


def import_prompt_file(state, caller: Caller, path: str | None) -> str:
    from feedback_store.importing import ImportFileError, import_prompts

    if not path:
        raise AdminError("choose a file to import first")
    try:
        with state.session() as session:
            report = import_prompts(path, session=session, source=f"upload:{Path(path).name}")
    except (ImportFileError, ValueError) as error:
        raise AdminError(str(error)) from None
    return report.summary()


def export_dataset(state, caller: Caller, kind: str, out_dir: Path | None = None) -> Path:
    """Write one training dataset as JSON lines and return the file (for download)."""
    from feedback_store.export import EXPORTERS, export, write_dataset

    if kind not in EXPORTERS:
        raise AdminError(f"unknown export {kind!r} (known: {', '.join(EXPORTERS)})")
    with state.session() as session:
        dataset = export(kind, session=session)
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="prefloop-export-"))
    return write_dataset(dataset, out_dir / f"prefloop-{kind}.jsonl")


def users_table(state, caller: Caller) -> list[list]:
    with state.session() as session:
        return [
            [u.name, (u.role or Role.annotator).value, "yes" if u.active else "no"]
            for u in list_users(session=session)
        ]


def save_user(state, caller: Caller, name: str, password: str, role: str) -> str:
    name = (name or "").strip()
    try:
        role = Role(role)
    except ValueError:
        raise AdminError(f"role must be one of {', '.join(r.value for r in Role)}") from None
    try:
        with state.session() as session:
            existed = get_rater(name, session=session) is not None
            create_user(name, password or "", session=session, role=role)
    except ValueError as error:
        raise AdminError(str(error)) from None
    return f"{'updated' if existed else 'added'} {role.value} {name}"


def set_user_active(state, caller: Caller, name: str, active: bool) -> str:
    name = (name or "").strip()
    if not active and name == caller.name:
        raise AdminError("you cannot deactivate your own account")
    with state.session() as session:
        rater = get_rater(name, session=session)
        if rater is None or rater.kind != RaterKind.human:
            raise AdminError(f"no user named {name!r}")
        rater.active = active
        session.add(rater)
    return f"{name} is now {'active' if active else 'deactivated'}"


def save_overlap(state, caller: Caller, overlap) -> str:
    try:
        value = int(overlap)
        with state.session() as session:
            set_target_overlap(value, session=session)
    except (TypeError, ValueError) as error:
        raise AdminError(f"target overlap: {error}") from None
    return f"target overlap set to {value} vote(s) per pair"


def save_guidelines(state, caller: Caller, text: str) -> str:
    with state.session() as session:
        set_setting(GUIDELINES_SETTING, text or "", session=session)
    return "guidelines saved"


def move_prompts(state, caller: Caller, ids_text: str, split: str) -> str:
    """Move prompts to train or eval (eval prompts never reach a training export)."""
    from feedback_store.splits import parse_id_ranges, set_prompt_split, split_counts

    try:
        ids = parse_id_ranges(ids_text or "")
        with state.session() as session:
            changed = set_prompt_split(ids, split, session=session)
            counts = split_counts(session=session)
    except ValueError as error:
        raise AdminError(f"{error} (nothing moved)") from None
    return f"moved {changed} prompts to {split}; train {counts['train']}, eval {counts['eval']}"


# ---- queue order, gold pairs, rater quality -------------------------------------------------
# The Gradio handlers refuse non-admins first (admin_for); these check the caller again, so a
# new handler that forgets cannot open them to an annotator.

RATER_COLUMNS = ["name", "kind", "votes", "score", "source", "gold", "agreement", "weight", "suggested", "flagged"]


def _require_admin(caller: Caller) -> None:
    if not caller.is_admin:
        raise AdminError(f"{caller.name} is not an admin")


def run_queue_strategy(state, caller: Caller, strategy: str) -> str:
    """Rewrite the open pairs' priorities by `strategy` (labeling.cli.queue_command.prioritize):
    `uncertainty` scores them with the latest finished reward run, in this process."""
    from labeling.cli.queue_command import prioritize

    _require_admin(caller)
    if strategy not in STRATEGIES:
        raise AdminError(f"strategy must be one of {', '.join(STRATEGIES)}")
    try:
        return prioritize(state.engine, strategy)["message"]
    except (ValueError, LookupError) as error:
        raise AdminError(f"{strategy}: {error}") from None
    except Exception as error:  # a reward model that will not load
        if type(error).__name__ in ("ModelError", "TrainingError"):
            raise AdminError(f"{strategy}: {error}") from None
        raise


def save_gold_rate(state, caller: Caller, rate) -> str:
    _require_admin(caller)
    try:
        with state.session() as session:
            set_gold_rate(float(rate), session=session)
    except (TypeError, ValueError) as error:
        raise AdminError(f"gold rate: {error}") from None
    return f"gold rate set to {float(rate):g} (share of a person's pairs that are gold pairs)"


def save_quality_threshold(state, caller: Caller, threshold) -> str:
    _require_admin(caller)
    try:
        with state.session() as session:
            set_quality_threshold(float(threshold), session=session)
    except (TypeError, ValueError) as error:
        raise AdminError(f"quality threshold: {error}") from None
    return f"rater quality threshold set to {float(threshold):g}"


def _fmt(value) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.3f}"


def rater_quality_table(state, caller: Caller) -> list[list]:
    """One row per rater with votes (every kind): quality (feedback_store.rater_quality) and weight."""
    from sqlmodel import select

    from feedback_store.models import Rater
    from feedback_store.rater_quality import rater_quality
    from feedback_store.stats import KINDS
    from feedback_store.vote_table import load_raters, load_votes

    _require_admin(caller)
    with state.session() as session:
        table = load_raters(session=session)
        rows = rater_quality(load_votes(table, session=session), table, kinds=KINDS,
                             threshold=quality_threshold(session=session))
        weights = dict(session.exec(select(Rater.name, Rater.weight)).all())
    return [
        [r.rater, r.kind, r.votes, _fmt(r.score), r.score_source or "", _fmt(r.gold_accuracy),
         _fmt(r.majority_agreement), _fmt(weights.get(r.rater)), _fmt(r.suggested_weight),
         "below" if r.below_threshold else ""]
        for r in rows
    ]


def save_rater_weight(state, caller: Caller, name: str, weight) -> str:
    """Set one rater's vote weight, as `prefloop raters weight NAME W` does."""
    _require_admin(caller)
    name = (name or "").strip()
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise AdminError("the weight must be a number >= 0") from None
    if not 0 <= value < float("inf"):
        raise AdminError("the weight must be a number >= 0")
    with state.session() as session:
        rater = get_rater(name, session=session)
        if rater is None:
            raise AdminError(f"no rater named {name!r}")
        rater.weight = value
        session.add(rater)
    return f"{name}: weight {value:g}"


def auto_rater_weights(state, caller: Caller) -> str:
    """Every scored rater's weight from its quality, as `prefloop raters weight --auto` does."""
    from feedback_store.rater_quality import auto_weights

    _require_admin(caller)
    with state.session() as session:
        weights = auto_weights(session=session)
    return f"{len(weights)} raters weighted from their quality (clip(2 * score - 1, 0, 1))"


def start_job(state, caller: Caller, command: str, arguments: str) -> Job:
    try:
        return state.jobs.start(command, arguments, started_by=caller.name)
    except (ValueError, OSError) as error:
        raise AdminError(str(error)) from None


def job_view(state, job_id) -> tuple[str, float | None, str]:
    """Status line, fraction done and log tail of one job."""
    job = state.jobs.get(int(job_id)) if job_id not in (None, "") else None
    if job is None:
        return "No job selected.", None, ""
    return (
        f"**{job.label()}** · started by {job.started_by} · `prefloop {' '.join(job.argv)}`",
        job.progress(),
        job.tail(),
    )


def progress_bar_html(fraction: float | None) -> str:
    if fraction is None:
        return '<div class="pf-bar"><div class="pf-bar-fill pf-bar-unknown"></div></div>'
    percent = max(0.0, min(100.0, fraction * 100))
    return (
        f'<div class="pf-bar" role="progressbar" aria-valuenow="{percent:.0f}">'
        f'<div class="pf-bar-fill" style="width:{percent:.0f}%"></div><span>{percent:.0f}%</span></div>'
    )


# ---- the Gradio tab ------------------------------------------------------------------------


def build_admin_tab(state) -> dict:
    def admin(request: gr.Request) -> Caller:
        try:
            return admin_for(state, request.username)
        except AccessDenied as error:
            raise gr.Error(str(error)) from None

    def attempt(action):
        try:
            return action()
        except AdminError as error:
            raise gr.Error(str(error)) from None

    with gr.Accordion("Import prompts", open=True):
        upload = gr.File(
            label="JSONL, CSV or parquet: `prompt` or `messages` per row (optional `chosen`/`rejected`)",
            file_types=[".jsonl", ".ndjson", ".csv", ".parquet", ".pq"],
            type="filepath",
            elem_id="pf-admin-upload",
            height=140,
        )
        import_button = gr.Button("Import", elem_id="pf-admin-import")
        import_result = gr.Markdown("")

    with gr.Accordion("Background jobs", open=True):
        with gr.Row():
            command = gr.Dropdown(list(JOB_COMMANDS), value="generate", label="Command", scale=1)
            arguments = gr.Textbox(
                label="Arguments (as on the command line, allow-listed flags only; "
                "--endpoint NAME for a server-configured endpoint; --help shows the usage)",
                placeholder="e.g. dpo --max-steps 50, --endpoint NAME, or --help",
                scale=4,
                elem_id="pf-admin-args",
            )
            start_button = gr.Button("Start", variant="primary", scale=1, elem_id="pf-admin-start")
        with gr.Row():
            job_select = gr.Dropdown([], label="Job", scale=3, elem_id="pf-admin-job")
            stop_button = gr.Button("Stop job", variant="stop", scale=1)
        job_status = gr.Markdown("No job selected.")
        job_progress = gr.HTML(progress_bar_html(None), js_on_load=None)
        job_log = gr.Code("", label="Log (live)", language=None, lines=12, interactive=False)
        timer = gr.Timer(1.0, active=False)

    with gr.Accordion("Export datasets", open=False):
        with gr.Row():
            export_kind = gr.Dropdown(list(EXPORT_FORMATS), value="dpo", label="Dataset")
            export_button = gr.Button("Export", elem_id="pf-admin-export")
        export_file = gr.File(label="Download", interactive=False)

    with gr.Accordion("Users", open=False):
        users = gr.Dataframe(
            headers=["name", "role", "active"], interactive=False, elem_id="pf-admin-users"
        )
        with gr.Row():
            user_name = gr.Textbox(label="Name", elem_id="pf-admin-user-name")
            user_password = gr.Textbox(
                label="Password (8+ characters)", type="password", elem_id="pf-admin-user-pw"
            )
            user_role = gr.Radio([r.value for r in Role], value=Role.annotator.value, label="Role")
        with gr.Row():
            save_user_button = gr.Button("Add or reset user", elem_id="pf-admin-save-user")
            activate_button = gr.Button("Activate")
            deactivate_button = gr.Button("Deactivate", variant="stop")
        user_result = gr.Markdown("")

    with gr.Accordion("Overlap and guidelines", open=False):
        with gr.Row():
            overlap = gr.Number(
                label="Target overlap: human votes wanted per pair", precision=0, minimum=1
            )
            overlap_button = gr.Button("Save overlap", elem_id="pf-admin-overlap")
        guidelines_box = gr.Textbox(
            label="Guidelines (Markdown, shown to every annotator)", lines=8
        )
        guidelines_button = gr.Button("Save guidelines")
        settings_result = gr.Markdown("")

    with gr.Accordion("Prompt splits", open=False):  # train feeds exports; eval judges policies
        with gr.Row():
            split_ids = gr.Textbox(label="Prompt ids (e.g. 3 7 10-20)", scale=3)
            split_to = gr.Radio(["train", "eval"], value="eval", label="Move to", scale=1)
            split_button = gr.Button("Move", scale=1, elem_id="pf-admin-split")
        split_result = gr.Markdown("")

    with gr.Accordion("Queue order, gold pairs and rater quality", open=False):
        with gr.Row():
            strategy = gr.Dropdown(list(STRATEGIES), value="fewest-votes", scale=3, elem_id="pf-admin-strategy",
                                   label="Which pair a person sees next (rewrites the open pairs' priorities; "
                                         "re-run as votes come in)")
            strategy_button = gr.Button("Prioritize", scale=1, elem_id="pf-admin-prioritize")
        with gr.Row():
            gold_box = gr.Number(label="Gold rate: share of a person's pairs that are gold (0-1)",
                                 minimum=0, maximum=1, elem_id="pf-admin-gold-rate")
            gold_button = gr.Button("Save gold rate")
            threshold_box = gr.Number(label="Rater quality threshold (0-1): flag raters below it",
                                      minimum=0, maximum=1, elem_id="pf-admin-threshold")
            threshold_button = gr.Button("Save threshold")
        # Filled on demand (Dawid-Skene over every vote is not free): "Show raters' quality".
        raters_table = gr.Dataframe(headers=RATER_COLUMNS, interactive=False, elem_id="pf-admin-raters")
        with gr.Row():
            weight_name = gr.Textbox(label="Rater", scale=2, elem_id="pf-admin-weight-name")
            weight_value = gr.Number(label="Weight (>= 0; 0 silences the rater)", minimum=0, scale=1)
            weight_button = gr.Button("Set weight", scale=1, elem_id="pf-admin-weight")
            auto_button = gr.Button("Weights from quality", scale=1)
            raters_refresh = gr.Button("Show raters' quality", scale=1, elem_id="pf-admin-raters-refresh")
        quality_result = gr.Markdown("")

    def on_strategy(value, request: gr.Request):
        caller = admin(request)
        return attempt(lambda: run_queue_strategy(state, caller, value))

    def on_gold_rate(value, request: gr.Request):
        caller = admin(request)
        return attempt(lambda: save_gold_rate(state, caller, value))

    def on_threshold(value, request: gr.Request):
        caller = admin(request)
        message = attempt(lambda: save_quality_threshold(state, caller, value))
        return rater_quality_table(state, caller), message

    def on_weight(name, value, request: gr.Request):
        caller = admin(request)
        message = attempt(lambda: save_rater_weight(state, caller, name, value))
        return rater_quality_table(state, caller), message

    def on_auto_weights(request: gr.Request):
        caller = admin(request)
        message = attempt(lambda: auto_rater_weights(state, caller))
        return rater_quality_table(state, caller), message

    def on_raters(request: gr.Request):
        caller = admin(request)
        return rater_quality_table(state, caller)

    strategy_button.click(on_strategy, [strategy], [quality_result], api_name="admin_prioritize")
    gold_button.click(on_gold_rate, [gold_box], [quality_result], api_name="admin_set_gold_rate")
    threshold_button.click(on_threshold, [threshold_box], [raters_table, quality_result],
                           api_name="admin_set_quality_threshold")
    weight_button.click(on_weight, [weight_name, weight_value], [raters_table, quality_result],
                        api_name="admin_set_rater_weight")
    auto_button.click(on_auto_weights, [], [raters_table, quality_result], api_name="admin_auto_weights")
    raters_refresh.click(on_raters, [], [raters_table], api_name="admin_rater_quality")

    def on_split(ids_text, split, request: gr.Request):
        caller = admin(request)
        return attempt(lambda: move_prompts(state, caller, ids_text, split))

    split_button.click(on_split, [split_ids, split_to], [split_result], api_name="admin_set_split")

    def job_choices():
        return [(job.label(), str(job.id)) for job in state.jobs.all()]

    def on_import(path, request: gr.Request):
        caller = admin(request)
        return attempt(lambda: import_prompt_file(state, caller, path))

    def on_start(command_value, arguments_value, request: gr.Request):
        caller = admin(request)
        job = attempt(lambda: start_job(state, caller, command_value, arguments_value))
        status, fraction, log = job_view(state, job.id)
        return (
            gr.update(choices=job_choices(), value=str(job.id)),
            status,
            progress_bar_html(fraction),
            log,
        )

    def on_tick(job_id, request: gr.Request):
        admin(request)
        status, fraction, log = job_view(state, job_id)
        return (
            gr.update(choices=job_choices(), value=job_id),
            status,
            progress_bar_html(fraction),
            log,
        )

    def on_stop(job_id, request: gr.Request):
        admin(request)
        if job_id:
            state.jobs.stop(int(job_id))
        return on_tick(job_id, request)

    def on_export(kind, request: gr.Request):
        caller = admin(request)
        return str(attempt(lambda: export_dataset(state, caller, kind)))

    def on_save_user(name, password, role, request: gr.Request):
        caller = admin(request)
        message = attempt(lambda: save_user(state, caller, name, password, role))
        return users_table(state, caller), message, ""

    def make_set_active(active: bool):
        def on_set_active(name, request: gr.Request):
            caller = admin(request)
            message = attempt(lambda: set_user_active(state, caller, name, active))
            return users_table(state, caller), message

        return on_set_active

    def on_overlap(value, request: gr.Request):
        caller = admin(request)
        return attempt(lambda: save_overlap(state, caller, value))

    def on_guidelines(text, request: gr.Request):
        caller = admin(request)
        return attempt(lambda: save_guidelines(state, caller, text))

    def on_load(request: gr.Request):
        """Fill the admin tab for admins; for anyone else, leave it empty and the timer off."""
        try:
            caller = admin_for(state, request.username)
        except AccessDenied:
            return ([], gr.update(), gr.update(), gr.Timer(active=False), gr.update(choices=[]),
                    gr.update(), gr.update(), gr.update())
        with state.session() as session:
            current_overlap, current_guidelines = (
                target_overlap(session=session),
                guidelines(session=session),
            )
            current = (current_strategy(session=session), gold_rate(session=session),
                       quality_threshold(session=session))
        return (
            users_table(state, caller),
            current_overlap,
            current_guidelines,
            gr.Timer(active=True),
            gr.update(choices=job_choices()),
            *current,
        )

    import_button.click(on_import, [upload], [import_result], api_name="admin_import")
    job_outputs = [job_select, job_status, job_progress, job_log]
    start_button.click(on_start, [command, arguments], job_outputs, api_name="admin_start_job")
    timer.tick(
        on_tick, [job_select], job_outputs, api_name="admin_job_tick", show_progress="hidden"
    )
    job_select.change(
        on_tick, [job_select], job_outputs, api_visibility="private", show_progress="hidden"
    )
    stop_button.click(on_stop, [job_select], job_outputs, api_name="admin_stop_job")
    export_button.click(on_export, [export_kind], [export_file], api_name="admin_export")
    save_user_button.click(
        on_save_user,
        [user_name, user_password, user_role],
        [users, user_result, user_password],
        api_name="admin_save_user",
    )
    activate_button.click(
        make_set_active(True), [user_name], [users, user_result], api_name="admin_activate_user"
    )
    deactivate_button.click(
        make_set_active(False), [user_name], [users, user_result], api_name="admin_deactivate_user"
    )
    overlap_button.click(on_overlap, [overlap], [settings_result], api_name="admin_set_overlap")
    guidelines_button.click(
        on_guidelines, [guidelines_box], [settings_result], api_name="admin_set_guidelines"
    )
    return {"load": (on_load, [], [users, overlap, guidelines_box, timer, job_select, strategy, gold_box,
                                   threshold_box])}


def guidelines_html(state) -> str:
    with state.session() as session:
        return render_markdown(guidelines(session=session))
