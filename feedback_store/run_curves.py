"""Training runs and their logged metric curves, for the dashboard."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from sqlmodel import Session, col, select

from feedback_store.models import RunMetric, TrainingRun


@dataclass
class RunCurves:
    run: TrainingRun
    curves: dict[str, tuple[list[int], list[float]]] = field(
        default_factory=dict
    )  # name -> (steps, values)

    @property
    def label(self) -> str:
        status = getattr(self.run.status, "value", self.run.status)
        return f"#{self.run.id} {self.run.kind} ({status})"


def recent_run_curves(*, session: Session, limit: int = 8) -> list[RunCurves]:
    """The latest `limit` training runs, newest first, each with every metric it logged."""
    runs = list(session.exec(select(TrainingRun).order_by(col(TrainingRun.id).desc()).limit(limit)))
    if not runs:
        return []
    rows = session.execute(
        select(RunMetric.run_id, RunMetric.name, RunMetric.step, RunMetric.value)
        .where(col(RunMetric.run_id).in_([run.id for run in runs]))
        .order_by(RunMetric.run_id, RunMetric.name, RunMetric.step, RunMetric.id)
    ).all()
    series: dict[int, dict[str, tuple[list[int], list[float]]]] = defaultdict(dict)
    for run_id, name, step, value in rows:
        steps, values = series[run_id].setdefault(name, ([], []))
        steps.append(step)
        values.append(value)
    return [RunCurves(run, series.get(run.id, {})) for run in runs]
