"""GRPO and RLOO (TRL's trainers) end to end: a tiny policy learns what a reward asks for, the
reward sources (function, rubric rule, reward model, the AI judge over real HTTP) and their
one-line errors, and a judge that fails in the middle of a run."""

from __future__ import annotations


def good_share(prompts, completions, **columns):
    """Share of the words of each completion that are "good" (TRL's reward signature)."""
    texts = [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]
    return [sum(word == "good" for word in text.split()) / max(1, len(text.split())) for text in texts]


GOOD_WORDS = {"good", "yes", "answer", "explain", "capital", "paris", "the", "a", "is", "of"}


def good_words(prompts, completions, **columns):
    """A denser reward for short runs: the share of words from a small set."""
    texts = [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]
    return [sum(word in GOOD_WORDS for word in text.split()) / max(1, len(text.split())) for text in texts]


# --------------------------------------------------------------------------- fixtures and helpers

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from sqlmodel import select  # noqa: E402

from alignment.training.common import TrainingError  # noqa: E402
from alignment.training.job import TrainRequest, run_training  # noqa: E402
from alignment.training.online_rewards import rubric_reward, use_judge, win_rates  # noqa: E402
from alignment.training.runs import run_metrics  # noqa: E402
from feedback_store.db import read_scope  # noqa: E402
from feedback_store.models import JudgeRun, PolicyVersion, RunStatus, TrainingRun  # noqa: E402
from labeling.cli import main  # noqa: E402
from tests.openai_server import OpenAIServer, ServerScript  # noqa: E402
from tests.tiny_models import save_tiny_causal_lm  # noqa: E402
from tests.train_helpers import preference_store  # noqa: E402

FAST = {"max_steps": 1, "per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 4,
        "optim": "adamw_torch", "save_steps": 1000, "lr_scheduler_type": "constant"}


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory):
    """A tiny Llama with larger random weights, so that a LoRA moves its logits within a few steps."""
    return str(save_tiny_causal_lm(tmp_path_factory.mktemp("models") / "sharp", initializer_range=0.3))


@pytest.fixture
def store(sqlite_url):
    return preference_store(sqlite_url, n_prompts=8, ratings=False)


def train(method, engine, model, tmp_path, *, callbacks=(), **trainer):
    overrides = {"trainer": {**FAST, **trainer}, "run": {"runs_dir": str(tmp_path / "runs")}}
    return run_training(TrainRequest(method, model=model, overrides=[overrides]), engine=engine, progress=False,
                        callbacks=callbacks)


def curve(engine, run_id, name="reward"):
    return [m.value for m in sorted(run_metrics(engine, run_id), key=lambda m: m.step) if m.name == name]


def policies(engine):
    with read_scope(engine) as session:
        return {p.name: p for p in session.exec(select(PolicyVersion)).all()}


# --------------------------------------------------------------------------- rewards


def test_rubric_reward_is_the_win_rate_within_each_prompts_group():
    reward = rubric_reward("shorter")
    prompts = ["p", "p", "p", "q", "q"]
    completions = ["a b c", "a", "a b", "x", "x"]
    assert reward(prompts, completions) == [0.0, 1.0, 0.5, 0.5, 0.5]
    chats = [[{"role": "user", "content": "p"}]] * 2
    assert reward(chats, [[{"role": "assistant", "content": "aa"}], [{"role": "assistant", "content": "a"}]]) \
        == [0.0, 1.0]
    assert win_rates(1, lambda i, j: 1.0) == [0.5]


# --------------------------------------------------------------------------- learning


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_policy_learns_what_the_reward_asks_for(method, store, sharp_model_dir, tmp_path):
    result = train(method, store, sharp_model_dir, tmp_path, reward_function="tests.test_train_grpo_rloo:good_words",
                   max_steps=10, learning_rate=2e-2, per_device_train_batch_size=8, num_generations=4,
                   max_completion_length=6, num_iterations=2, temperature=1.0,
                   beta=0.0 if method == "grpo" else 0.01)
    rewards = curve(store, result.run_id)
    assert len(rewards) >= 4, rewards
    assert max(rewards[-2:]) > rewards[0], rewards
    assert result.policy_name == f"{method}-{result.run_id}" and result.policy_name in policies(store)


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_cli_trains_on_a_reward_function_and_registers_the_policy(method, sqlite_url, store, sharp_model_dir,
                                                                   tmp_path, capsys):
    code = main(["train", method, "--db", sqlite_url, "--model", sharp_model_dir, "--no-progress",
                 "--reward-function", "tests.test_train_grpo_rloo:good_words", "--max-steps", "1",
                 "--batch-size", "4", "--num-generations", "2", "--max-completion-length", "4",
                 "--output-dir", str(tmp_path / "out"), "--set", "trainer.optim=adamw_torch"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"registered policy '{method}-" in out and "first_reward=" in out
    with read_scope(store) as session:
        run = session.exec(select(TrainingRun).where(TrainingRun.kind == method)).one()
        assert run.status == RunStatus.done
        assert run.config["settings"]["trainer"]["reward_function"] == "tests.test_train_grpo_rloo:good_words"
    assert (Path(run.output_path) / "prefloop_run.json").is_file()


def test_reward_errors_are_one_line_and_record_no_run(sqlite_url, store, sharp_model_dir, tmp_path, capsys):
    base = ["train", "grpo", "--db", sqlite_url, "--model", sharp_model_dir, "--no-progress"]
    cases = [
        ([], "GRPO needs a reward"),
        (["--reward-rubric", "shorter", "--reward-function", "tests.test_train_grpo_rloo:good_words"],
         "give one reward"),
        (["--reward-rubric", "kindest"], "unknown rubric rule"),
        (["--reward-run", "99"], "no training run with that id"),
        (["--reward-judge"], "--judge-model"),
        (["--reward-judge", "--judge-model", "m", "--judge-base-url", "http://127.0.0.1:9/v1",
          "--judge-max-attempts", "1", "--judge-timeout", "2"], "--reward-judge: the judge"),
    ]
    for flags, message in cases:
        code = main(base + flags)
        err = capsys.readouterr().err.strip()
        assert code != 0 and message in err and len(err.splitlines()) == 1, (flags, err)
    with read_scope(store) as session:
        assert session.exec(select(TrainingRun)).all() == []


def test_prompts_are_needed(store, sharp_model_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(TrainingError, match="prompt"):
        run_training(TrainRequest("grpo", model=sharp_model_dir, overrides=[{
            "trainer": {**FAST, "reward_rubric": "shorter"}, "run": {"data": str(data)}}]), engine=store)


# --------------------------------------------------------------------------- a reward model's tokenizer


def test_reward_model_without_a_tokenizer_on_another_vocabulary_is_refused(store, sharp_model_dir, tmp_path):
    from tests.tiny_models import VOCAB, build

    folder = tmp_path / "foreign-reward"
    build("llama-reward", vocab_size=VOCAB + 8).save_pretrained(folder)  # no tokenizer saved beside it
    (folder / "prefloop_run.json").write_text(json.dumps({"head": "reward", "method": "reward",
                                                          "adapter_kind": "model", "base_model": str(folder)}))
    with pytest.raises(TrainingError, match="no tokenizer of its own and its vocabulary") as caught:
        train("rloo", store, sharp_model_dir, tmp_path, reward_model=str(folder))
    assert len(str(caught.value).splitlines()) == 1
    with read_scope(store) as session:
        run = session.exec(select(TrainingRun)).one()
        assert run.status == RunStatus.failed and "vocabulary" in run.error
    assert "rloo-1" not in policies(store)


# --------------------------------------------------------------------------- the AI judge


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("PREFLOOP_JUDGE_API_KEY", "test-key")
    with OpenAIServer(ServerScript(marker="good")) as server:
        yield server


def test_cli_trains_on_the_judge_and_bills_its_ledger(sqlite_url, store, sharp_model_dir, server, tmp_path, capsys):
    code = main(["train", "grpo", "--db", sqlite_url, "--model", sharp_model_dir, "--no-progress",
                 "--reward-judge", "--judge-model", "scripted-judge", "--judge-base-url", server.url,
                 "--judge-price-prompt", "1", "--max-steps", "1", "--batch-size", "4", "--num-generations", "2",
                 "--max-completion-length", "4", "--output-dir", str(tmp_path / "out"),
                 "--set", "trainer.optim=adamw_torch"])
    out = capsys.readouterr().out
    assert code == 0, out
    with read_scope(store) as session:
        ledger = session.exec(select(JudgeRun).order_by(JudgeRun.id.desc())).first()
        assert ledger.status == RunStatus.done
        # the probe, then 2 prompts x 1 pair x 2 orders
        assert ledger.n_requests == 1 + 4 == server.log.by_status[200]
        assert ledger.prompt_tokens == server.log.prompt_tokens and ledger.cost > 0
    assert "registered policy 'grpo-" in out


def test_a_judge_failing_mid_run_fails_the_run_and_registers_nothing(store, sharp_model_dir, server, tmp_path):
    from transformers import TrainerCallback

    from labeling.judge.online import JudgeReward
    from labeling.judge.openai_backend import OpenAIJudge, OpenAIJudgeConfig
    from labeling.judge.runner import JudgeRunConfig

    class StopServer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            server.stop()

    reward = JudgeReward(OpenAIJudge(OpenAIJudgeConfig(model="scripted-judge", base_url=server.url, timeout=2.0,
                                                       max_attempts=1)),
                         JudgeRunConfig(progress=False), engine=store)
    with use_judge(reward), pytest.raises(TrainingError, match="the judge .* failed"):
        train("grpo", store, sharp_model_dir, tmp_path, reward_judge=True, max_steps=3, callbacks=[StopServer()])
    reward.close("failed")
    with read_scope(store) as session:
        run = session.exec(select(TrainingRun)).one()
        assert run.status == RunStatus.failed and "judge" in run.error
        assert session.exec(select(JudgeRun)).one().status == RunStatus.failed
    assert not any(name.startswith("grpo") for name in policies(store))


# --------------------------------------------------------------------------- rollouts


def test_completions_are_cut_after_the_first_end_token():
    import torch

    from alignment.training.rollouts import completions

    tokens = torch.tensor([[5, 6, 2, 0, 0], [7, 8, 9, 10, 11], [2, 0, 0, 0, 0]])
    assert completions(tokens, {2}) == [[5, 6, 2], [7, 8, 9, 10, 11], [2]]


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_rollouts_go_through_the_decoding_loop_unless_switched_off(method, store, sharp_model_dir, tmp_path,
                                                                   monkeypatch):
    """TRL's generation is replaced by prefloop's decoding loop (on the LoRA policy's base, at TRL's
    temperature/top-k/top-p, cut after the first EOS as TRL cuts); PREFLOOP_DECODE=generate and a
    sampling option the loop does not have (repetition_penalty) send it back to TRL's `generate`."""
    from alignment import decoding
    from alignment.training.rollouts import FoldedLinear

    calls, lengths = [], []
    real = decoding.decode

    def recorded(model, *args, **kwargs):
        calls.append({**kwargs, "folded": sum(isinstance(m, FoldedLinear) for m in model.modules())})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(decoding, "decode", recorded)

    def counted(prompts, completions, completion_ids=None, **_):
        lengths.extend(len(ids) for ids in completion_ids)
        return [0.0] * len(completions)

    monkeypatch.setattr("tests.test_train_grpo_rloo.good_share", counted)
    reward = "tests.test_train_grpo_rloo:good_share"
    result = train(method, store, sharp_model_dir, tmp_path, reward_function=reward, temperature=0.9, top_p=0.95)
    assert result.run_id and calls, "TRL's generate was used"
    assert all(c["temperature"] == 0.9 and c["top_p"] == 0.95 and c["max_new_tokens"] == FAST["max_completion_length"]
               for c in calls)
    assert all(c["folded"] > 0 for c in calls), "the LoRA layers were not folded for the rollout"
    assert lengths and all(1 <= n <= FAST["max_completion_length"] for n in lengths)

    for switch_off in ({"env": "generate"}, {"repetition_penalty": 1.2}):
        calls.clear()
        with monkeypatch.context() as patch:
            if "env" in switch_off:
                patch.setenv(decoding.ENV, "generate")
                settings = {}
            else:
                settings = switch_off
            train(method, store, sharp_model_dir, tmp_path / str(len(settings)), reward_function=reward, **settings)
        assert not calls, switch_off


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_packed_group_scoring_gives_trls_log_probs_entropies_and_gradients(method, sharp_model_dir, tmp_path):
    """A group's completions share their prompt: scored as one packed row with the prompt once, the
    per-token log-probs (at TRL's temperature), entropies and gradients are TRL's own."""
    import torch
    from datasets import Dataset

    from alignment.models import ModelSpec, apply_adapter, load_model
    from alignment.models.adapters import AdapterConfig
    from alignment.training.grpo import GRPOConfig, GRPOTrainer
    from alignment.training.rloo import RLOOConfig, RLOOTrainer

    config_class, trainer_class = (GRPOConfig, GRPOTrainer) if method == "grpo" else (RLOOConfig, RLOOTrainer)
    prompt = [1, 5, 9, 12, 7]
    completions = [[20, 21, 22, 2], [30], [40, 41, 42, 43, 44, 45], [50, 51]]
    others = [3, 8]  # a fifth row with another, shorter prompt: the shared prefix is then one token
    rows = [(prompt, c) for c in completions] + [([1, *others], [60, 61, 62])]
    width, keep = max(len(p) for p, _ in rows), max(len(c) for _, c in rows)
    input_ids = torch.tensor([[0] * (width - len(p)) + p + c + [0] * (keep - len(c)) for p, c in rows])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * (len(p) + len(c)) + [0] * (keep - len(c))
                                   for p, c in rows])
    completion_mask = attention_mask[:, width:]
    results = {}
    for packed in (True, False):
        torch.manual_seed(0)
        model, tokenizer = load_model(ModelSpec(sharp_model_dir))
        model = apply_adapter(model, AdapterConfig(method="lora", r=4, alpha=8, dropout=0.0))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.05)
        config = config_class(output_dir=str(tmp_path / str(packed)), use_cpu=True, bf16=False, report_to="none",
                              per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
                              temperature=0.7, prefix_sharing=packed)
        trainer = trainer_class(model=model, args=config, reward_funcs=[lambda prompts, completions, **_: [0.0]],
                                train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}), processing_class=tokenizer)
        assert trainer._packed is packed
        trainer.model.train()
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, keep, compute_entropy=True)
        (logps * completion_mask * torch.linspace(0.5, 1.5, keep)).sum().backward()
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
        results[packed] = (logps.detach() * completion_mask, entropies * completion_mask, grads)
    (logps, entropies, grads), (trl_logps, trl_entropies, trl_grads) = results[True], results[False]
    assert torch.allclose(logps, trl_logps, atol=1e-5), (logps - trl_logps).abs().max()
    assert int((logps != 0).sum()) == int(completion_mask.sum())
    assert torch.allclose(entropies, trl_entropies, atol=1e-4)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(grad, trl_grads[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_folded_lora_gives_the_policys_logits_and_puts_its_layers_back(method, sharp_model_dir):
    """Rollouts fold each LoRA Linear into one weight for the call: the same logits as peft's layers,
    the base weights untouched, peft's modules back afterwards; DoRA layers are left to peft."""
    import torch

    from alignment.models import ModelSpec, apply_adapter, load_model
    from alignment.models.adapters import AdapterConfig
    from alignment.training.rollouts import FoldedLinear, folded_lora

    model, _ = load_model(ModelSpec(sharp_model_dir))
    model = apply_adapter(model, AdapterConfig(method=method, r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    base = model.get_base_model()
    base.eval()
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    modules = dict(base.named_modules())
    ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        with folded_lora(base) as folded:
            got = base(input_ids=ids).logits
            inside = sum(isinstance(m, FoldedLinear) for m in base.modules())
    adapted = sum(1 for name in modules if name.endswith("lora_A"))
    assert folded == inside == (adapted if method == "lora" else 0)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert dict(base.named_modules()).keys() == modules.keys()
    assert all(module is modules[name] for name, module in base.named_modules())
    assert all(torch.equal(p, before[name]) for name, p in base.named_parameters())
