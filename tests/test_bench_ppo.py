"""bench/ppo.py keeps working: both of its workers (prefloop's `train ppo` and the four-copies
script) run one PPO step on a tiny random model, in process, and report what the RESULT line
needs. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.tiny_models import save_tiny_causal_lm

BENCH = Path(__file__).resolve().parents[1] / "bench" / "ppo.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_ppo", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_bench_ppo_workers_run_one_step(bench, tmp_path):
    model = str(save_tiny_causal_lm(tmp_path / "policy"))
    reward = str(bench.build_reward_dir(model, tmp_path / "reward_model"))
    data = str(bench.write_prompts(tmp_path / "prompts.jsonl", n=6))
    sizes = bench.Sizes(steps=1, rollout_batch_size=2, mini_batch_size=2, per_device_train_batch_size=1,
                        ppo_epochs=1, max_new_tokens=4, generation_batch_size=2)
    reports = {}
    for name, worker in bench.WORKERS.items():
        out = tmp_path / name
        out.mkdir()
        report = worker(model, reward, data, sizes, str(out))
        report["peak_rss_mb"] = bench.peak_rss_mb()
        assert report["counts"]["steps"] == 1 and report["counts"]["tokens"] >= 2, (name, report)
        assert report["train_seconds"] > 0 and report["timers"]["generate"] > 0, (name, report)
        assert report["timers"]["rollout"] >= report["timers"]["generate"], (name, report)
        reports[name] = report
    assert reports["prefloop"]["timers"]["reward"] > 0  # scored by the reward model directory built above
    # ... which is a LoRA reward run on the policy's base: prefloop scores with it on the policy's own model
    assert reports["prefloop"]["counts"]["shared_reward_batches"] >= 1
    manifest = json.loads((Path(reward) / "prefloop_run.json").read_text())
    assert manifest["adapter_kind"] == "peft" and manifest["head"] == "reward"

    figures, line = bench.summarize(reports["prefloop"], reports["separate"], load=1.0)
    assert line.startswith("RESULT ppo ratio=") and "steps_per_s=" in line and "rollout_tokens_per_s=" in line
    assert "rollout_share=" in line and line.endswith("load=1.0")
    assert 0 < figures["rollout_share"] <= 1
