"""`prefloop loop`: the loop turned many times, each turn measured.

    reports = run_loop(engine, LoopConfig(rounds=2, method="dpo", pairs=32), RubricJudge("shorter"))

Each round, from the current policy (the start policy, then the last one promoted):
1. sample: two responses per train prompt from the current policy (the first `pairs × round`
   train prompts, so an unpromoted round still brings new data), stored and paired;
2. label: the judge decides those pairs (`labels="judge"`), or the loop waits until annotators
   have given each the target overlap of human votes (`labels="human"`), saying what is missing;
3. train: a run of `method` from the current policy (its reference and the candidate's parent)
   on the stored preferences, registered as policy `<loop>-r<round>`;
4. evaluate: the candidate against the current policy on the eval prompts, both orders;
5. promote the candidate only when the low end of its win rate's interval is above 50 %.

Every step's outcome is stored on the round (`feedback_store.loops`) as it ends, and every step
is idempotent on its own (generation skips answered prompts, the judge skips decided pairs,
training resumes its run from the last checkpoint, an evaluation is reused), so a killed loop,
rerun, continues where it stopped without redoing finished work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import Engine

from alignment.training.methods import LOOP_METHOD_NAMES
from alignment.generation import GenerationJob, SamplingConfig, register_policies, run_generation
from feedback_store.catalog import get_policy, list_prompts
from feedback_store.db import read_scope, session_scope
from feedback_store.loops import (
    finish_step,
    missing_human_labels,
    open_round,
    pairs_of_policy,
    prioritize_for_humans,
    rounds,
)
from feedback_store.models import Evaluation, LoopRound, PolicyVersion, TrainingRun
from feedback_store.queue import target_overlap
from labeling.judge.backends import JudgeBackend
from labeling.judge.evaluation import EvalConfig, EvaluationError, evaluate_policy
from labeling.judge.runner import JudgeRunConfig, run_judge

LOOP_METHODS = LOOP_METHOD_NAMES
LABEL_SOURCES = ("judge", "human")


class LoopError(RuntimeError):
    """A loop that cannot go on: one line saying what is wrong and what to do."""


@dataclass(frozen=True)
class LoopConfig:
    name: str = field(default="loop", metadata={"help": "the loop's name: its rounds and policies are named after it"})
    rounds: int = field(default=2, metadata={"help": "run until this many rounds are done"})
    method: str = field(default="dpo", metadata={"help": "training method of each round: dpo, kto or ppo"})
    pairs: int = field(default=32, metadata={"help": "new train prompts sampled per round, two responses each"})
    labels: str = field(default="judge", metadata={"help": "who labels the pairs: judge, or human (the loop waits)"})
    start_policy: str = field(default="default", metadata={"help": "the policy round 1 starts from"})
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(samples=2, max_new_tokens=128, temperature=0.8, seed=0)
    )
    preset: str | None = field(default=None, metadata={"help": "training preset of every round (default: auto)"})
    train_overrides: tuple[dict, ...] = field(
        default=(), metadata={"help": "settings layers for every round's training (e.g. trainer.max_steps)"}
    )
    runs_dir: str = field(default="runs", metadata={"help": "each round trains into RUNS_DIR/<loop>-r<round>"})
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    judge: JudgeRunConfig = field(default_factory=lambda: JudgeRunConfig(progress=True))
    poll_s: float = field(default=15.0, metadata={"help": "human labels: seconds between checks"})
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1 (got {self.rounds})")
        if self.method not in LOOP_METHODS:
            raise ValueError(f"method {self.method!r}: a loop trains with one of {', '.join(LOOP_METHODS)}")
        if self.labels not in LABEL_SOURCES:
            raise ValueError(f"labels {self.labels!r}: expected judge or human")
        if self.pairs < 1:
            raise ValueError(f"pairs must be at least 1 (got {self.pairs})")
        if self.sampling.samples < 2:
            raise ValueError("a round samples at least 2 responses per prompt to pair them")


@dataclass(frozen=True)
class RoundReport:
    round: int
    start_policy: str
    candidate: str | None
    pairs: int
    training_run_id: int | None
    train_loss: float | None
    win_rate: float | None
    ci_low: float | None
    ci_high: float | None
    n: int | None
    ties: int | None
    mean_length_candidate: float | None
    mean_length_start: float | None
    promoted: bool | None
    minutes: float | None


def run_loop(engine: Engine, config: LoopConfig, judge: JudgeBackend | None, *,
             console: Console | None = None, train: Callable | None = None) -> list[RoundReport]:
    """Run (or continue) the loop until `config.rounds` rounds are done; one report per round.

    `judge` labels the pairs (unless `labels="human"`) and judges every evaluation. `train`
    stands in for `alignment.training.job.run_training` (tests)."""
    console = console or loop_console()
    if judge is None:
        raise LoopError("a loop needs a judge: it judges each candidate against its parent")
    _check_start(engine, config)
    for number in range(1, config.rounds + 1):
        with read_scope(engine) as session:
            done = [r for r in rounds(config.name, session=session) if r.round < number]
        current = _current_policy(done, config, engine)
        (current_id,) = register_policies(engine, (current,))
        with session_scope(engine) as session:
            round_ = open_round(config.name, number, method=config.method, start_policy_id=current_id,
                                session=session)
            round_id, step = round_.id, round_.step
            start_name = session.get(PolicyVersion, round_.start_policy_id).name
        if step == "done":
            continue
        console.rule(f"[bold]{config.name} round {number}/{config.rounds}[/] from [cyan]{start_name}[/]")
        started = time.perf_counter()
        if step == "sample":
            step = _sample(engine, config, round_id, number, start_name, console)
        if step == "label":
            step = _label(engine, config, round_id, judge, console)
        if step == "train":
            step = _train(engine, config, round_id, number, start_name, console, train)
        if step == "evaluate":
            _evaluate(engine, config, round_id, start_name, judge, console)
        console.print(f"round {number} took {(time.perf_counter() - started) / 60:.1f} min")
    return loop_reports(engine, config.name)


def _check_start(engine: Engine, config: LoopConfig) -> None:
    """What would fail later, refused before any work: an unknown start policy, no train or
    no eval prompts."""
    from feedback_store.splits import EVAL, split_counts

    with read_scope(engine) as session:
        if get_policy(config.start_policy, session=session) is None and config.start_policy != "default":
            raise LoopError(f"start policy {config.start_policy!r} is not stored (prefloop stats lists policies)")
        counts = split_counts(session=session)
    if not counts.get("train"):
        raise LoopError("no train prompts: import some first (prefloop prompts import FILE)")
    if not counts.get(EVAL):
        raise LoopError("no eval prompts: a loop judges each candidate on held-out prompts (import prompts "
                        "with a split column, or move some with prefloop prompts split)")


def _current_policy(done: list[LoopRound], config: LoopConfig, engine: Engine) -> str:
    """The policy the next round starts from: the last promoted candidate, else the start."""
    with read_scope(engine) as session:
        for round_ in reversed(done):
            if round_.promoted:
                return session.get(PolicyVersion, round_.candidate_policy_id).name
    return config.start_policy


def _sample(engine, config: LoopConfig, round_id: int, number: int, start: str, console: Console) -> str:
    console.print(f"[bold]1. sample[/] {config.pairs} new train prompts × {config.sampling.samples} from {start}")
    job = GenerationJob(policies=(start,), prompts=config.pairs * number, split="train", sampling=config.sampling,
                        quantize=config.evaluation.quantize, dtype=config.evaluation.dtype)
    report = run_generation(engine, job, show_progress=config.show_progress)
    console.print(f"   {report.summary()}")
    with session_scope(engine) as session:
        policy_id = get_policy(start, session=session).id
        # The same prompts `run_generation` just took: the first N of the train split, in id order.
        prompt_ids = [p.id for p in list_prompts(session=session, limit=config.pairs * number, split="train")]
        comparisons = pairs_of_policy(policy_id, prompt_ids, session=session)
        if not comparisons:
            raise LoopError(f"round {number}: {start} gave no pair on {len(prompt_ids)} train prompts "
                            "(every response empty?)")
        finish_step(round_id, "label", session=session, comparison_ids=comparisons)
    return "label"


def _label(engine, config: LoopConfig, round_id: int, judge: JudgeBackend, console: Console) -> str:
    with read_scope(engine) as session:
        comparisons = list(session.get(LoopRound, round_id).comparison_ids)
    if config.labels == "human":
        _wait_for_humans(engine, config, comparisons, console)
    else:
        console.print(f"[bold]2. label[/] {len(comparisons)} pairs with {judge.model_id}")
        summary = run_judge(engine, judge, replace(config.judge, comparison_ids=tuple(comparisons), limit=None,
                                                   progress=config.show_progress))
        if summary.status == "aborted":
            raise KeyboardInterrupt
        if summary.failed and not summary.decided:
            raise LoopError(f"the judge {summary.rater} failed every request ({summary.failed} failed): "
                            "nothing to train on; check the judge's endpoint and key, then rerun the loop")
        console.print(f"   {summary.decided} decided, {summary.failed} failed")
    with session_scope(engine) as session:
        finish_step(round_id, "train", session=session)
    return "train"


def _wait_for_humans(engine, config: LoopConfig, comparisons: list[int], console: Console) -> None:
    with session_scope(engine) as session:
        prioritize_for_humans(comparisons, session=session)
    while True:
        with read_scope(engine) as session:
            overlap = target_overlap(session=session)
            missing = missing_human_labels(comparisons, overlap, session=session)
        if missing == 0:
            console.print(f"[bold]2. label[/] all {len(comparisons)} pairs have {overlap} human votes")
            return
        console.print(f"[bold]2. label[/] waiting for annotators: {missing} human votes still needed on "
                      f"{len(comparisons)} pairs (overlap {overlap}); prefloop serve shows them first")
        time.sleep(config.poll_s)


def candidate_name(config: LoopConfig, number: int) -> str:
    return f"{config.name}-r{number}"


def _train(engine, config: LoopConfig, round_id: int, number: int, start: str, console: Console,
           train: Callable | None) -> str:
    from alignment.training import runs
    from alignment.training.job import TrainingError, TrainRequest, run_training
    from alignment.training.presets import AUTO_PRESET

    name = candidate_name(config, number)
    output_dir = str((Path(config.runs_dir) / name).resolve())
    with read_scope(engine) as session:
        existing = get_policy(name, session=session)
    if existing is None:
        resume = runs.latest_unfinished_run(engine, config.method, output_dir) is not None
        console.print(f"[bold]3. train[/] {config.method} from {start} → {name}" + (" (resuming)" if resume else ""))
        run_options = {"from_policy": start, "policy_name": name, "output_dir": output_dir, "resume": resume}
        selection = {"raters": "human"} if config.labels == "human" else {}
        root = runs.lineage(engine, start)[0].base_model  # the run trains on the base its start grew from
        layers = [{"model": {"model": root}}, *config.train_overrides,
                  {"run": run_options, **({"selection": selection} if selection else {})}]
        try:
            result = (train or run_training)(TrainRequest(config.method, preset=config.preset or AUTO_PRESET, overrides=layers), engine=engine,
                                             progress=config.show_progress)
        except TrainingError as error:
            raise LoopError(f"round {number}: training failed: {error}") from None
        run_id = result.run_id
    else:
        run_id = existing.training_run_id
    with session_scope(engine) as session:
        candidate = get_policy(name, session=session)
        finish_step(round_id, "evaluate", session=session, training_run_id=run_id, candidate_policy_id=candidate.id)
    return "evaluate"


def _evaluate(engine, config: LoopConfig, round_id: int, start: str, judge: JudgeBackend, console: Console) -> None:
    with read_scope(engine) as session:
        candidate = session.get(PolicyVersion, session.get(LoopRound, round_id).candidate_policy_id).name
    console.print(f"[bold]4. evaluate[/] {candidate} against {start} on the eval prompts")
    try:
        result = evaluate_policy(engine, candidate, judge, replace(config.evaluation, against=start))
    except EvaluationError as error:
        raise LoopError(str(error)) from None
    console.print("   " + result.summary().replace("\n", "\n   "))
    promoted = result.beats_opponent
    console.print(f"[bold]5. {'promote' if promoted else 'keep'}[/] " + (
        f"{candidate}: the interval lies above 50 %" if promoted
        else f"{start}: {candidate}'s interval reaches down to {result.ci_low:.1%}, not above 50 %"))
    with session_scope(engine) as session:
        finish_step(round_id, "done", session=session, evaluation_id=result.evaluation_id, promoted=promoted)


def loop_reports(engine: Engine, loop: str) -> list[RoundReport]:
    with read_scope(engine) as session:
        reports = []
        for round_ in rounds(loop, session=session):
            run = session.get(TrainingRun, round_.training_run_id) if round_.training_run_id else None
            evaluation = session.get(Evaluation, round_.evaluation_id) if round_.evaluation_id else None
            candidate = session.get(PolicyVersion, round_.candidate_policy_id) if round_.candidate_policy_id else None
            metrics = (run.metrics or {}) if run is not None else {}
            minutes = ((round_.finished_at - round_.started_at).total_seconds() / 60
                       if round_.finished_at and round_.started_at else None)
            reports.append(RoundReport(
                round=round_.round,
                start_policy=session.get(PolicyVersion, round_.start_policy_id).name,
                candidate=candidate.name if candidate else None,
                pairs=len(round_.comparison_ids or []),
                training_run_id=round_.training_run_id,
                train_loss=metrics.get("train_loss"),
                win_rate=evaluation.win_rate if evaluation else None,
                ci_low=evaluation.ci_low if evaluation else None,
                ci_high=evaluation.ci_high if evaluation else None,
                n=evaluation.n if evaluation else None,
                ties=evaluation.ties if evaluation else None,
                mean_length_candidate=evaluation.mean_length_policy if evaluation else None,
                mean_length_start=evaluation.mean_length_against if evaluation else None,
                promoted=round_.promoted,
                minutes=minutes,
            ))
        return reports


def loop_console() -> Console:
    """A console whose rounds table stays readable in logs and pipes too (rich assumes 80 columns there)."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def rounds_table(reports: list[RoundReport], title: str = "rounds") -> Table:
    table = Table(title=title)
    for column in ("round", "from", "candidate", "pairs", "run", "train loss", "win rate (95% CI)", "n", "ties",
                   "mean length cand./from", "promoted", "min"):
        table.add_column(column, justify="right" if column not in ("from", "candidate") else "left")
    for r in reports:
        table.add_row(
            str(r.round), r.start_policy, r.candidate or "-", str(r.pairs), str(r.training_run_id or "-"),
            f"{r.train_loss:.3f}" if r.train_loss is not None else "-",
            f"{r.win_rate:.1%} ({r.ci_low:.1%}-{r.ci_high:.1%})" if r.win_rate is not None else "-",
            str(r.n) if r.n is not None else "-", str(r.ties) if r.ties is not None else "-",
            f"{r.mean_length_candidate:.0f}/{r.mean_length_start:.0f}" if r.mean_length_candidate is not None else "-",
            {True: "yes", False: "no", None: "-"}[r.promoted], f"{r.minutes:.1f}" if r.minutes is not None else "-",
        )
    return table
