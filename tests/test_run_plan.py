"""A run is planned once, the same way for a new run and for its `--resume`: equal plans but for
what a resume must change (`resumed`, `checkpoint`, `notes`), and a plan cannot be changed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from alignment.training import runs
from alignment.training.plan import DATA_FILE, RunPlan, TrainRequest, plan_run, training_data
from feedback_store.models import RunStatus
from tests.train_helpers import preference_store, tiny_model

WHAT_A_RESUME_CHANGES = {"resumed", "checkpoint", "notes"}


@pytest.fixture
def store(sqlite_url):
    return preference_store(sqlite_url, n_prompts=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("models"))


def request_for(model_dir, tmp_path, **run) -> TrainRequest:
    return TrainRequest("dpo", model=model_dir, overrides=[{
        "trainer": {"max_steps": 4, "save_steps": 2, "learning_rate": 1e-3},
        "run": {"runs_dir": str(tmp_path / "runs"), **run}}])


def a_policy_to_start_from(engine, model_dir) -> str:
    """A registered policy that is its base model (no adapter): `--from-policy latest` names it."""
    run_id = runs.start_run(engine, kind="sft", config={}, snapshot_ids={}, snapshot_hash=None, seed=0,
                            base_model=model_dir)
    runs.register_policy(engine, run_id, name="sft-parent", base_model=model_dir, adapter_path=None,
                         parent_name=None)
    runs.finish_run(engine, run_id, metrics={}, output_path=None)
    return "sft-parent"


def differences(a: RunPlan, b: RunPlan) -> set[str]:
    return {f.name for f in dataclasses.fields(RunPlan) if getattr(a, f.name) != getattr(b, f.name)}


@pytest.mark.parametrize("from_policy", [None, "latest"])
def test_new_and_resumed_runs_of_one_request_make_equal_plans(from_policy, store, model_dir, tmp_path):
    parent = a_policy_to_start_from(store, model_dir) if from_policy else None
    request = request_for(model_dir, tmp_path, **({"from_policy": from_policy} if from_policy else {}))

    new, rows = plan_run(request, engine=store)
    assert rows is not None and len(rows) == 8
    assert training_data(new, rows) is rows and new.data_file == new.output_dir / DATA_FILE
    assert new.data_file.is_file()  # what the resume reads back
    assert not new.resumed and new.checkpoint is None and new.notes == () and new.main
    assert new.options.output_dir == str(new.output_dir)  # as the run resolved it
    assert (new.start.name if new.start else None) == parent
    assert new.options.from_policy == parent  # "latest" as it resolved
    record = runs.get_run(store, new.run_id)
    assert record.status == RunStatus.running and record.snapshot_hash == new.snapshot_hash
    assert record.config["settings"]["trainer"] == dict(new.trainer)

    # The run dies before its first checkpoint: the resume restarts it from step 0, and says so.
    runs.fail_run(store, new.run_id, "interrupted (resume with --resume)", status=RunStatus.aborted)
    resumed, rows = plan_run(request, engine=store, resume=True)
    assert rows is None
    assert differences(new, resumed) == {"resumed", "notes"}
    assert resumed.resumed and resumed.checkpoint is None
    assert resumed.notes == (f"run {new.run_id} had no checkpoint yet: it restarted from step 0",)
    assert runs.get_run(store, new.run_id).status == RunStatus.running  # reopened
    assert len(training_data(resumed)) == 8  # read back, and its hash checked

    # Killed after a checkpoint (the flag alone asks for the resume, as `prefloop train dpo --resume`).
    checkpoint = new.output_dir / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    runs.fail_run(store, new.run_id, "interrupted (resume with --resume)", status=RunStatus.aborted)
    again, _ = plan_run(dataclasses.replace(request, overrides=[*request.overrides, {"run": {"resume": True}}]),
                        engine=store)
    assert differences(new, again) == {"resumed", "checkpoint"} <= WHAT_A_RESUME_CHANGES
    assert again.checkpoint == str(checkpoint) and again.notes == ()
    assert dataclasses.replace(again, resumed=False, checkpoint=None) == new


def test_a_resumed_plan_takes_this_commands_flags_over_the_runs_own(store, model_dir, tmp_path):
    new, rows = plan_run(request_for(model_dir, tmp_path), engine=store)
    training_data(new, rows)
    resumed, _ = plan_run(TrainRequest("dpo", overrides=[{"trainer": {"max_steps": 9}, "run": {"resume": True}}]),
                          engine=store)
    assert resumed.run_id == new.run_id and resumed.model == new.model  # the run's model, not the default
    assert resumed.trainer == {**new.trainer, "max_steps": 9}


def test_a_resume_whose_snapshot_changed_fails(store, model_dir, tmp_path):
    from alignment.training.common import TrainingError

    new, rows = plan_run(request_for(model_dir, tmp_path), engine=store)
    training_data(new, rows)
    rows.select(range(5)).to_parquet(str(new.data_file))
    resumed, _ = plan_run(request_for(model_dir, tmp_path), engine=store, resume=True)
    with pytest.raises(TrainingError, match="does not match the run's snapshot hash"):
        training_data(resumed)


def test_a_plan_is_frozen(store, model_dir, tmp_path):
    plan, _ = plan_run(request_for(model_dir, tmp_path), engine=store)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.run_id = 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.options.output_dir = str(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.model.model = "other"
    with pytest.raises(TypeError):
        plan.trainer["max_steps"] = 100  # a read-only view of the resolved settings
    assert isinstance(plan.output_dir, Path)


def test_resume_finds_the_unfinished_run_by_its_output_dir(store, model_dir, tmp_path):
    """`--resume --output-dir D` (and `prefloop loop`, which resumes a round's run by its
    directory) continues the run writing to D, and no other."""
    chosen = str(tmp_path / "chosen")
    new, rows = plan_run(request_for(model_dir, tmp_path, output_dir=chosen), engine=store)
    training_data(new, rows)  # the snapshot a resume reads back
    other, _ = plan_run(request_for(model_dir, tmp_path), engine=store)  # newer, elsewhere
    for plan in (new, other):
        runs.fail_run(store, plan.run_id, "interrupted", status=RunStatus.aborted)

    assert runs.latest_unfinished_run(store, "dpo", chosen).id == new.run_id
    assert runs.latest_unfinished_run(store, "dpo").id == other.run_id
    assert runs.latest_unfinished_run(store, "dpo", str(tmp_path / "nowhere")) is None
    resumed, _ = plan_run(request_for(model_dir, tmp_path, output_dir=chosen, resume=True), engine=store)
    assert resumed.run_id == new.run_id and resumed.resumed
