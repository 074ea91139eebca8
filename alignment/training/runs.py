"""The life of a training run in the store: a `TrainingRun` row from start to finish.

    run_id = start_run(engine, kind="dpo", config=..., snapshot=(ids, sha), seed=0, ...)
    trainer.add_callback(RunMetricsCallback(engine, run_id))   # metric curves, as logged
    finish_run(engine, run_id, metrics=..., output_path=...)    # status done
    fail_run(engine, run_id, reason, status=RunStatus.aborted)  # or failed
    register_policy(engine, run_id, base_model=..., adapter_path=...)  # a new PolicyVersion
    find_policy(engine, "latest")    # what `--from-policy NAME|latest` names (LookupError if nothing)
    lineage(engine, "dpo-7")         # [root, ..., dpo-7]: the policies it grew from, oldest first

Each call is its own short transaction, so the row reflects the run while it trains (the
dashboard reads it) and a killed process leaves a `running` row that `--resume` picks up.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import col, delete, select
from transformers import TrainerCallback

from feedback_store.db import session_scope
from feedback_store.models import PolicyVersion, RunMetric, RunStatus, TrainingRun, utcnow


def git_commit() -> str | None:
    """The commit of the prefloop checkout that runs the training, '+dirty' with local changes."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        # An installed wheel: git would walk up from site-packages and could name the commit
        # of whatever repository holds the virtualenv, which is not the code that ran.
        return None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit


def start_run(engine: Engine, *, kind: str, config: dict, snapshot_ids: dict, snapshot_hash: str | None,
              seed: int | None, base_model: str | None) -> int:
    with session_scope(engine) as session:
        run = TrainingRun(kind=kind, status=RunStatus.running, config=config, snapshot_ids=snapshot_ids,
                          snapshot_hash=snapshot_hash, git_commit=git_commit(), seed=seed, base_model=base_model)
        session.add(run)
        session.flush()
        return run.id


def get_run(engine: Engine, run_id: int) -> TrainingRun | None:
    with session_scope(engine) as session:
        return session.get(TrainingRun, run_id)


def latest_unfinished_run(engine: Engine, kind: str, output_dir: str | None = None) -> TrainingRun | None:
    """The run `--resume` continues: the newest of this kind not done (optionally in output_dir)."""
    with session_scope(engine) as session:
        query = (
            select(TrainingRun)
            .where(TrainingRun.kind == kind, col(TrainingRun.status) != RunStatus.done)
            .order_by(col(TrainingRun.id).desc())
        )
        for run in session.exec(query):
            if output_dir is None or _run_output_dir(run) == Path(output_dir).resolve():
                return run
    return None


def _run_output_dir(run: TrainingRun) -> Path | None:
    """Where a run writes: its resolved settings keep it under settings.run.output_dir."""
    saved = (run.config.get("settings") or {}).get("run") or {}
    return Path(saved["output_dir"]).resolve() if saved.get("output_dir") else None


def update_config(engine: Engine, run_id: int, config: dict) -> None:
    with session_scope(engine) as session:
        run = session.get(TrainingRun, run_id)
        run.config = config
        session.add(run)


def reopen_run(engine: Engine, run_id: int, *, resumed_at_step: int = 0) -> None:
    """Mark a run running again from a checkpoint of step `resumed_at_step`. The metrics it
    logged past that step (a process killed between logging a step and saving its checkpoint)
    are dropped: the resumed steps log them again, so each step's curve point stays single."""
    with session_scope(engine) as session:
        run = session.get(TrainingRun, run_id)
        run.status, run.error, run.finished_at = RunStatus.running, None, None
        session.add(run)
        session.exec(delete(RunMetric).where(RunMetric.run_id == run_id, RunMetric.step > resumed_at_step))


def finish_run(engine: Engine, run_id: int, *, metrics: dict, output_path: str | None) -> None:
    with session_scope(engine) as session:
        run = session.get(TrainingRun, run_id)
        run.status = RunStatus.done
        run.metrics = _finite(metrics)
        run.output_path = output_path
        run.error = None
        run.finished_at = utcnow()
        session.add(run)


def fail_run(engine: Engine, run_id: int, reason: str, *, status: RunStatus = RunStatus.failed,
             metrics: dict | None = None) -> None:
    with session_scope(engine) as session:
        run = session.get(TrainingRun, run_id)
        run.status = status
        run.error = reason
        if metrics:
            run.metrics = _finite(metrics)
        run.finished_at = utcnow()
        session.add(run)


def register_policy(engine: Engine, run_id: int, *, name: str, base_model: str, adapter_path: str | None,
                    parent_name: str | None, description: str | None = None) -> int:
    """A new PolicyVersion for a finished policy run, its parent the policy it started from."""
    from feedback_store.catalog import get_or_create_policy, get_policy

    with session_scope(engine) as session:
        if get_policy(name, session=session) is not None:
            raise ValueError(f"a policy named {name!r} already exists")
        parent = None
        if parent_name is not None:
            parent = get_policy(parent_name, session=session) or get_or_create_policy(
                parent_name, session=session, base_model=parent_name
            )
        policy = PolicyVersion(name=name, base_model=base_model, adapter_path=adapter_path,
                               parent_id=parent.id if parent else None, training_run_id=run_id,
                               description=description)
        session.add(policy)
        session.flush()
        return policy.id


LATEST = "latest"


def find_policy(engine: Engine, name: str) -> PolicyVersion:
    """The policy `name` names; "latest" is the newest one a training run registered.
    A LookupError names what is stored when there is no such policy."""
    with session_scope(engine) as session:
        if name == LATEST:
            query = select(PolicyVersion).where(col(PolicyVersion.training_run_id).is_not(None))
            policy = session.exec(query.order_by(col(PolicyVersion.id).desc())).first()
            if policy is None:
                raise LookupError("no trained policy yet: 'latest' names the newest policy a training run "
                                  "registered (train one first, or name a policy)")
            return policy
        policy = session.exec(select(PolicyVersion).where(PolicyVersion.name == name)).first()
        if policy is None:
            known = [p.name for p in session.exec(select(PolicyVersion).order_by(col(PolicyVersion.id).desc()))]
            shown = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "") if known else "none yet"
            raise LookupError(f"no policy named {name!r} (stored policies, newest first: {shown})")
        return policy


def lineage(engine: Engine, name: str) -> list[PolicyVersion]:
    """The policy and its ancestors by parent_id, root first."""
    chain = [find_policy(engine, name)]
    with session_scope(engine) as session:
        while chain[0].parent_id is not None and len(chain) < 10_000:  # a cycle would be a corrupt store
            parent = session.get(PolicyVersion, chain[0].parent_id)
            if parent is None:
                break
            chain.insert(0, parent)
    return chain


def run_metrics(engine: Engine, run_id: int) -> list[RunMetric]:
    with session_scope(engine) as session:
        return list(session.exec(select(RunMetric).where(RunMetric.run_id == run_id).order_by(RunMetric.id)))


class RunMetricsCallback(TrainerCallback):
    """Every logged number (loss, rewards/accuracies, learning_rate, ...) becomes a RunMetric row."""

    def __init__(self, engine: Engine, run_id: int) -> None:
        self.engine, self.run_id = engine, run_id

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        rows = [
            RunMetric(run_id=self.run_id, step=state.global_step, name=name, value=float(value))
            for name, value in logs.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
        ]
        if rows:
            with session_scope(self.engine) as session:
                session.add_all(rows)


def _finite(metrics: dict) -> dict:
    """JSON columns take no NaN/inf: keep them as strings so the value still shows."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = str(value)
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[key] = value
    return out
