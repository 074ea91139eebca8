"""`prefloop train`: presets and config files under CLI flags, errors as one line, and a run
killed for real (SIGKILL) that `--resume` finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignment.training import presets
from alignment.training.job import TrainRequest, resolve_settings
from alignment.training.runs import get_run, run_metrics
from feedback_store.models import RunStatus
from labeling.cli import main
from tests.train_helpers import preference_store, tiny_model

PREFLOOP = Path(sys.executable).parent / "prefloop"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("models"))


def test_seed_preset_is_the_seed_recipe():
    settings = resolve_settings(TrainRequest("sft", preset="seed-qlora"))
    assert settings["model"] == {"quantize": "4bit", "quant_type": "nf4", "double_quant": False,
                                 "compute_dtype": "auto"}
    assert settings["adapter"] == {"method": "lora", "r": 64, "alpha": 16, "dropout": 0.1,
                                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]}
    trainer = settings["trainer"]
    assert (trainer["optim"], trainer["learning_rate"], trainer["max_grad_norm"], trainer["warmup_steps"]) == (
        "paged_adamw_32bit", 2e-4, 0.3, 0.03)
    assert trainer["lr_scheduler_type"] == "constant_with_warmup"
    assert trainer["train_sampling_strategy"] == "group_by_length"


def test_layers_cli_over_config_file_over_preset(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("trainer:\n  learning_rate: 5e-5\n  max_steps: 7\ndpo:\n  beta: 0.3\nadapter:\n  r: 8\n")
    request = TrainRequest("dpo", preset="cpu-lora", config_file=str(config),
                           overrides=[{"trainer": {"max_steps": 9}}, presets.parse_assignment("dpo.beta=0.5")])
    settings = resolve_settings(request)
    assert settings["trainer"]["max_steps"] == 9  # CLI over file
    assert settings["trainer"]["beta"] == 0.5  # --set over file's method section
    assert settings["trainer"]["learning_rate"] == "5e-5"  # YAML's string; coerced when built
    assert settings["adapter"]["r"] == 8 and settings["adapter"]["alpha"] == 32  # file over preset
    assert settings["_sources"]["adapter.r"] == str(config)
    from alignment.training.dpo import DPOConfig

    field = {f.name: f for f in __import__("dataclasses").fields(DPOConfig)}["learning_rate"]
    assert presets.coerce(field, "5e-5", "x") == 5e-5


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(presets.PresetError, match="unknown preset 'nope' \\(known presets: cpu-lora, seed-qlora"):
        presets.load_preset("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapter:\n  alpah: 8\n")
    from alignment.models.adapters import AdapterConfig

    settings = presets.settings_for(presets.merge(presets.load_yaml(bad)), "dpo")
    with pytest.raises(presets.PresetError, match=f"{bad}: adapter.alpah: not a setting.*did you mean 'alpha'"):
        presets.build(AdapterConfig, settings["adapter"], "adapter", settings["_sources"])
    (tmp_path / "worse.yaml").write_text("trainers:\n  x: 1\n")
    with pytest.raises(presets.PresetError, match="unknown section 'trainers' \\(did you mean 'trainer'"):
        presets.load_yaml(tmp_path / "worse.yaml")
    with pytest.raises(presets.PresetError, match="expected section.key=value"):
        presets.parse_assignment("learning_rate=3")


def test_cli_trains_dpo_with_method_flags(sqlite_url, model_dir, tmp_path, capsys):
    engine = preference_store(sqlite_url, n_prompts=8)
    out = tmp_path / "run"
    code = main(["train", "dpo", "--db", sqlite_url, "--model", model_dir, "--max-steps", "2", "--output-dir",
                 str(out), "--beta", "0.2", "--loss-type", "ipo", "--raters", "human", "--no-progress",
                 "--set", "trainer.save_steps=1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "run 1 done" in printed and "registered policy 'dpo-1'" in printed
    run = get_run(engine, 1)
    assert run.config["trainer"]["beta"] == 0.2 and run.config["trainer"]["loss_type"] == ["ipo"]
    assert run.config["settings"]["selection"] == {"rater_kinds": "human"}
    assert run.output_path == str(out / "adapter")


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--set", "trainer.learning_rat=1"], "trainer.learning_rat: not a setting of DPOConfig"),
    (["--data", "missing.parquet"], "--data missing.parquet: no such file"),
])
def test_cli_errors_are_one_line(argv, message, sqlite_url, model_dir, capsys):
    preference_store(sqlite_url, n_prompts=4)
    code = main(["train", "dpo", "--db", sqlite_url, "--model", model_dir, "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow  # two process start-ups and a real kill: ~20 s idle, ~50 s on a busy machine
def test_killed_run_resumes_from_its_checkpoint(sqlite_url, model_dir, tmp_path):
    engine = preference_store(sqlite_url, n_prompts=12)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    argv = [str(PREFLOOP), "train", "dpo", "--db", sqlite_url, "--model", model_dir, "--output-dir", str(out),
            "--max-steps", "400", "--batch-size", "2", "--set", "trainer.save_steps=2", "--no-progress"]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("checkpoint-*/trainer_state.json")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.2)
    time.sleep(0.5)  # let a checkpoint finish writing
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert get_run(engine, 1).status == RunStatus.running  # a killed process leaves its row running
    done = sorted(int(p.parent.name.split("-")[1]) for p in out.glob("checkpoint-*/trainer_state.json"))
    resumed_from = done[-1]
    finish = resumed_from + 2
    result = subprocess.run([str(PREFLOOP), "train", "dpo", "--db", sqlite_url, "--resume", "--max-steps",
                             str(finish), "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    run = get_run(engine, 1)
    assert run.status == RunStatus.done and run.metrics["global_step"] == finish
    steps = [m.step for m in run_metrics(engine, 1) if m.name == "loss"]
    assert steps[-2:] == [finish - 1, finish] and max(steps) == finish


@pytest.mark.slow  # two ranks on two cores: ~30-50 s
def test_two_process_launch_records_one_run(sqlite_url, model_dir, tmp_path):
    """What `accelerate launch --config_file configs/accelerate/ddp.yaml` does (torchrun, one
    process per device), on CPU: DDP training, one run row, one policy, rank 0 reporting."""
    engine = preference_store(sqlite_url, n_prompts=12)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(PREFLOOP), "train", "dpo", "--db",
                             sqlite_url, "--model", model_dir, "--max-steps", "2", "--output-dir", str(tmp_path / "r"),
                             "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("run 1 done") == 1 and "run 2" not in result.stdout
    run = get_run(engine, 1)
    assert run.status == RunStatus.done and get_run(engine, 2) is None
    # 12 pairs split over two ranks: 6 each, 2 steps of batch 4 per epoch (one process: 3 steps)
    assert run.metrics["epoch"] == pytest.approx(1.0)
    assert (tmp_path / "r" / "adapter" / "adapter_model.safetensors").is_file()
