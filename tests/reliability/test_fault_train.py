"""Faults: a training run killed (-9) after a checkpoint and resumed with `--resume` reaches the
step count it was started for, every step logged once, in the same run row with the same
data snapshot, and registers its policy with the lineage it started with: its parent is the
policy it was trained from, whose own record the kill and the resume leave alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlmodel import select

from alignment.training.runs import get_run, lineage, run_metrics
from feedback_store.db import session_scope
from feedback_store.models import PolicyVersion, RunStatus, TrainingRun
from labeling.cli import main
from tests.reliability.figures import record
from tests.train_helpers import preference_store, tiny_model

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
PREFLOOP = Path(sys.executable).parent / "prefloop"
STEPS, SAVE_EVERY = 40, 5


def policies(engine) -> dict[str, tuple]:
    with session_scope(engine) as session:
        return {p.name: (p.id, p.parent_id, p.training_run_id, p.adapter_path, p.base_model)
                for p in session.exec(select(PolicyVersion))}


def checkpoints(directory: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in directory.glob("checkpoint-*/trainer_state.json"))


def test_killed_training_resumes_to_the_same_step_count_and_lineage(sqlite_url, tmp_path):
    engine = preference_store(sqlite_url, n_prompts=12)
    model_dir = tiny_model(tmp_path)
    # The parent: a short finished run, so the killed run starts from a trained policy.
    assert main(["train", "dpo", "--db", sqlite_url, "--model", model_dir, "--max-steps", "2",
                 "--output-dir", str(tmp_path / "parent"), "--no-progress"]) == 0
    parent_before = policies(engine)["dpo-1"]

    out = tmp_path / "child"
    argv = [str(PREFLOOP), "train", "dpo", "--db", sqlite_url, "--model", model_dir, "--from-policy", "dpo-1",
            "--output-dir", str(out),
            "--max-steps", str(STEPS), "--batch-size", "2", "--set", f"trainer.save_steps={SAVE_EVERY}",
            "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not checkpoints(out) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.1)
    time.sleep(0.2)  # into the steps after the checkpoint: the kill loses some work
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    killed = get_run(engine, 2)
    saved = checkpoints(out)
    assert killed.status == RunStatus.running and saved and saved[-1] < STEPS, "killed before the end"
    steps_before = max(m.step for m in run_metrics(engine, 2) if m.name == "loss")

    # Resumed in this process (torch is loaded already): the same code path as the CLI's.
    assert main(["train", "dpo", "--db", sqlite_url, "--resume", "--no-progress"]) == 0

    run = get_run(engine, 2)
    assert run.status == RunStatus.done and run.metrics["global_step"] == STEPS
    logged = Counter(m.step for m in run_metrics(engine, 2) if m.name == "loss")
    # Steps after the last checkpoint ran twice (before the kill and again); each is stored once.
    assert sorted(logged) == list(range(1, STEPS + 1)) and max(logged.values()) == 1
    assert (run.snapshot_hash, run.snapshot_ids, run.seed) == (killed.snapshot_hash, killed.snapshot_ids, killed.seed)
    assert run.config["from_policy"] == killed.config["from_policy"] == {"name": "dpo-1", "id": parent_before[0]}
    with session_scope(engine) as session:
        assert len(session.exec(select(TrainingRun)).all()) == 2  # the resume made no new run
    after = policies(engine)
    assert after["dpo-1"] == parent_before
    child = after["dpo-2"]
    assert child[1] == parent_before[0] and child[2] == 2
    chain = [p.name for p in lineage(engine, "dpo-2")]
    assert chain[-2:] == ["dpo-1", "dpo-2"] and len(chain) == 3
    record(
        "fault-kill-9-train",
        faults_injected=1,
        faults_survived=1,
        steps_planned=STEPS,
        steps_reached=run.metrics["global_step"],
        killed_after_step=steps_before,
        resumed_from_checkpoint=saved[-1],
        lineage=" > ".join(chain[1:]),
    )
