"""A run killed between logging a step and saving its checkpoint logged metrics that the resumed
run logs again: reopening it from its checkpoint drops them, so each curve point stays single."""

from __future__ import annotations

from alignment.training import runs
from feedback_store.db import engine_for, session_scope
from feedback_store.models import RunMetric, RunStatus


def test_reopening_from_a_checkpoint_drops_the_metrics_logged_after_it(db_url):
    engine = engine_for(db_url)
    run_id = runs.start_run(engine, kind="dpo", config={}, snapshot_ids={}, snapshot_hash=None, seed=0,
                            base_model="tiny")
    with session_scope(engine) as session:
        for step in range(1, 7):  # step 6 was logged, its checkpoint never written
            session.add(RunMetric(run_id=run_id, step=step, name="loss", value=1.0 / step))
    runs.fail_run(engine, run_id, "killed")
    runs.reopen_run(engine, run_id, resumed_at_step=5)
    assert [m.step for m in runs.run_metrics(engine, run_id)] == [1, 2, 3, 4, 5]
    assert runs.get_run(engine, run_id).status == RunStatus.running
    runs.reopen_run(engine, run_id)  # no checkpoint: the run restarts from step 0
    assert runs.run_metrics(engine, run_id) == []
