"""Experiment trackers: `prefloop train --report-to tensorboard` reaches TRL's trainer (as
`trainer.report_to`), which writes TensorBoard event files under the run's output directory,
offline. (prefloop's own metric curves go to the store either way.)"""

from __future__ import annotations

import pytest

from tests.train_helpers import preference_store, tiny_model

pytest.importorskip("tensorboard")


def test_report_to_tensorboard_from_the_cli(sqlite_url, tmp_path, capsys):
    from alignment.training.runs import run_metrics
    from labeling.cli import main

    engine = preference_store(sqlite_url, n_prompts=6, ratings=False)
    model_dir = tiny_model(tmp_path)
    out = tmp_path / "out"
    argv = ["train", "dpo", "--db", sqlite_url, "--model", model_dir, "--no-progress", "--max-steps", "2",
            "--output-dir", str(out), "--report-to", "tensorboard",
            "--set", "trainer.logging_steps=1", "--set", "trainer.per_device_train_batch_size=2"]
    assert main(argv) == 0, capsys.readouterr().err
    events = list(out.rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert any(tag.endswith("loss") for tag in logged), logged
    assert {m.step for m in run_metrics(engine, 1) if m.name == "loss"} == {1, 2}  # and the store's curve
