"""PPO on the online reward sources it shares with GRPO/RLOO (alignment/training/online_rewards.py):
rubric rules and the AI judge (over real HTTP, billing its ledger) compare each completion with the
reference policy's answer to the same prompt; their errors are one line and record no run."""

from __future__ import annotations

import pytest
from sqlmodel import select

from alignment.training.job import TrainRequest, run_training
from alignment.training.runs import run_metrics
from feedback_store.db import read_scope
from feedback_store.models import JudgeRun, PolicyVersion, RunStatus, TrainingRun
from labeling.cli import main
from tests.openai_server import OpenAIServer, ServerScript
from tests.train_helpers import preference_store, tiny_model

# 8 prompts, 4 per rollout: two steps draw 8 distinct prompts, one completion each
FAST = {"max_steps": 2, "save_steps": 1000, "rollout_batch_size": 4, "mini_batch_size": 2,
        "per_device_train_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 4, "optim": "adamw_torch"}
CLI_FAST = ["--max-steps", "2", "--rollout-batch-size", "4", "--mini-batch-size", "2", "--batch-size", "2",
            "--ppo-epochs", "1", "--max-new-tokens", "4", "--set", "trainer.optim=adamw_torch", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("models"))


@pytest.fixture
def store(sqlite_url):
    return preference_store(sqlite_url, n_prompts=8, ratings=False)


def rewards(engine, run_id):
    return [m.value for m in sorted(run_metrics(engine, run_id), key=lambda m: m.step) if m.name == "reward"]


def test_rubric_reward_trains_two_steps_against_the_reference(store, model_dir, tmp_path):
    result = run_training(TrainRequest("ppo", model=model_dir, overrides=[{
        "trainer": {**FAST, "reward_rubric": "shorter"}, "run": {"runs_dir": str(tmp_path / "runs")}}]),
        engine=store, progress=False)
    assert result.status == "done" and result.metrics["global_step"] == 2
    curve = rewards(store, result.run_id)
    # each completion scores 1, 0.5 or 0 against the reference's answer: the mean of 4 is a multiple of 1/8
    assert len(curve) == 2 and all(0.0 <= r <= 1.0 and (r * 8).is_integer() for r in curve), curve
    with read_scope(store) as session:
        run = session.get(TrainingRun, result.run_id)
        assert run.config["trainer"]["reward_rubric"] == "shorter"
        assert session.exec(select(PolicyVersion).where(PolicyVersion.training_run_id == run.id)).one()


def test_score_online_compares_with_the_reference_answers(store, model_dir, tmp_path):
    """The reward sees each prompt twice: the policy's completion, then the reference's answer."""
    from alignment.training.ppo import PPOTrainer

    seen = {}

    def rule(prompts, completions, **columns):
        seen.update(prompts=prompts, completions=completions, columns=columns)
        return [0.25 * i for i in range(len(completions))]

    trainer = PPOTrainer.__new__(PPOTrainer)  # only what _score_online reads
    trainer.online_reward = rule
    trainer.columns = {"prompt_id": [10, 11, 12]}
    trainer.prompt_ids = [[1], [2], [3]]
    trainer.stop_ids = {0}
    trainer._picked = ([2, 0], 5)
    calls = []
    trainer._generate = lambda ids, step, salt=0: calls.append((ids, step, salt)) or [[7, 0, 9], [8, 8, 0]]
    trainer._decode = lambda row, mask: " ".join(str(t) for t, m in zip(row, mask) if m and t != 0)
    trainer._reference = lambda: __import__("contextlib").nullcontext()

    class Model:
        training = False

        def eval(self):
            pass

    trainer.model = Model()
    assert trainer._score_online(["a", "b"], ["p", "q"]) == [0.0, 0.25]
    assert calls == [([[3], [1]], 5, 1)]  # the picked prompts, another seed than the policy's samples
    assert seen == {"prompts": ["p", "q", "p", "q"], "completions": ["a", "b", "7", "8 8"],
                    "columns": {"prompt_id": [12, 10, 12, 10]}}


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("PREFLOOP_JUDGE_API_KEY", "test-key")
    with OpenAIServer(ServerScript(marker="good")) as server:
        yield server


def test_cli_trains_ppo_on_the_judge_and_bills_its_ledger(sqlite_url, store, model_dir, server, tmp_path, capsys):
    code = main(["train", "ppo", "--db", sqlite_url, "--model", model_dir, "--reward-judge",
                 "--judge-model", "scripted-judge", "--judge-base-url", server.url, "--judge-price-prompt", "1",
                 "--output-dir", str(tmp_path / "out"), *CLI_FAST])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "registered policy 'ppo-" in out
    with read_scope(store) as session:
        run = session.exec(select(TrainingRun).where(TrainingRun.kind == "ppo")).one()
        assert run.status == RunStatus.done and run.config["trainer"]["reward_judge"] is True
        ledger = session.exec(select(JudgeRun).order_by(JudgeRun.id.desc())).first()
        assert ledger.status == RunStatus.done
        # the probe, then 2 steps x 4 prompts x (completion vs reference's answer) x 2 orders
        assert ledger.n_requests == 1 + 2 * 4 * 2 == server.log.by_status[200]
        assert ledger.prompt_tokens == server.log.prompt_tokens and ledger.cost > 0
    assert len(rewards(store, run.id)) == 2


def test_online_reward_errors_are_one_line_and_record_no_run(sqlite_url, store, model_dir, capsys):
    base = ["train", "ppo", "--db", sqlite_url, "--model", model_dir, "--no-progress"]
    cases = [
        (["--reward-rubric", "kindest"], "unknown rubric rule"),
        (["--reward-rubric", "shorter", "--reward-function", "tests.test_train_ppo:good_share"],
         "give one reward, not --reward-rubric and --reward-function"),
        (["--reward-judge"], "--judge-model"),
        (["--reward-judge", "--judge-model", "m", "--judge-base-url", "http://127.0.0.1:9/v1",
          "--judge-max-attempts", "1", "--judge-timeout", "2"], "--reward-judge: the judge"),
        ([], "--reward-rubric RULES"),
    ]
    for flags, message in cases:
        code = main(base + flags)
        err = capsys.readouterr().err.strip()
        assert code != 0 and message in err and len(err.splitlines()) == 1, (flags, err)
    with read_scope(store) as session:
        assert session.exec(select(TrainingRun)).all() == []
