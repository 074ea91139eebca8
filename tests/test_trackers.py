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


def test_ppo_sends_its_curves_to_the_tracker(sqlite_url, tmp_path, capsys):
    """PPO runs its own loop, but logs through Trainer.log: the tracker gets reward, KL and losses."""
    from labeling.cli import main

    preference_store(sqlite_url, n_prompts=6, ratings=False)
    out = tmp_path / "ppo"
    argv = ["train", "ppo", "--db", sqlite_url, "--model", tiny_model(tmp_path), "--no-progress",
            "--reward-rubric", "shorter", "--max-steps", "2", "--rollout-batch-size", "4", "--mini-batch-size", "2",
            "--batch-size", "2", "--ppo-epochs", "1", "--max-new-tokens", "4", "--output-dir", str(out),
            "--report-to", "tensorboard", "--set", "trainer.optim=adamw_torch"]
    assert main(argv) == 0, capsys.readouterr().err
    events = list(out.rglob("events.out.tfevents.*"))
    assert events

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent)).Reload()
    logged = accumulator.Tags()["scalars"]
    for curve in ("reward", "kl", "policy_loss", "value_loss", "entropy"):
        tag = next((t for t in logged if t.endswith("/" + curve)), None)
        assert tag is not None, (curve, logged)
        assert [event.step for event in accumulator.Scalars(tag)] == [1, 2]


@pytest.mark.parametrize(("value", "message"), [
    ("nosuch", "unknown tracker 'nosuch' (transformers reports to: "),
    ("tensorboard,all", "'all' and 'none' stand alone"),
    ("comet_ml", "tracker 'comet_ml' is not installed: pip install comet-ml"),
])
def test_bad_trackers_are_refused_before_anything_runs(sqlite_url, tmp_path, capsys, value, message):
    from labeling.cli import main

    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exited:
        main(["train", "dpo", "--db", sqlite_url, "--model", str(tmp_path / "no-model"), "--output-dir", str(out),
              "--report-to", value])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
