"""Each method trains a tiny random model on preferences recorded through the store, and the
run is in the store as it happened: config, snapshot, metrics over time, lineage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sqlmodel import select

from alignment.training.common import TrainingError
from alignment.training.job import TrainRequest, run_training
from alignment.training.runs import get_run, run_metrics
from feedback_store.db import read_scope, session_scope
from feedback_store.export import export, snapshot
from feedback_store.models import PolicyVersion, RunStatus, TrainingRun
from tests.train_helpers import preference_store, tiny_model

FAST = {"max_steps": 3, "save_steps": 2, "per_device_train_batch_size": 4}


@pytest.fixture
def store(sqlite_url):
    return preference_store(sqlite_url, n_prompts=12)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("models"))


def train(engine, method, model_path, tmp_path, *, trainer=None, **sections):
    overrides = {"trainer": {**FAST, **(trainer or {})}, "run": {"runs_dir": str(tmp_path / "runs")}}
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    return run_training(TrainRequest(method, model=model_path, overrides=[overrides]), engine=engine,
                        progress=False)


def adapter_tensors(path: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", ["sft", "reward", "dpo", "kto"])
def test_method_trains_and_records_the_run(method, store, model_dir, tmp_path):
    result = train(store, method, model_dir, tmp_path)
    assert result.status == "done"

    # Parameters changed: LoRA's B matrices start at zero.
    tensors = adapter_tensors(result.output_path)
    lora_b = [t for name, t in tensors.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)

    run = get_run(store, result.run_id)
    assert run.kind == method and run.status == RunStatus.done and run.finished_at is not None
    assert run.error is None and run.output_path == result.output_path
    assert run.seed == 42 and run.base_model == model_dir
    assert run.git_commit  # this checkout's commit
    # The snapshot is exactly what the store exports for this method now.
    with read_scope(store) as session:
        ids, digest = snapshot(export({"reward": "reward"}.get(method, method), session=session))
    assert run.snapshot_hash == digest and run.snapshot_ids == ids and ids["comparison_ids"]
    # The full config: the resolved settings and every TRL argument.
    assert run.config["settings"]["trainer"]["max_steps"] == 3
    assert run.config["trainer"]["max_steps"] == 3 and run.config["trainer"]["bf16"] is False
    assert run.metrics["global_step"] == 3

    # Metrics over time, one row per logged value.
    losses = [m for m in run_metrics(store, result.run_id) if m.name == "loss"]
    assert [m.step for m in losses] == [1, 2, 3]

    with session_scope(store) as session:
        policies = session.exec(select(PolicyVersion).where(PolicyVersion.training_run_id == run.id)).all()
        if method == "reward":
            # the score head is trained in full and saved with the adapter (modules_to_save)
            assert any(name.endswith("score.weight") for name in tensors)
            assert policies == []  # a reward model is not a policy: its path is the run's output
            assert 0.0 <= run.metrics["eval_accuracy"] <= 1.0 and run.metrics["eval_pairs"] >= 1
            assert (Path(result.output_path) / "prefloop_run.json").is_file()
        else:
            [policy] = policies
            assert policy.name == result.policy_name == f"{method}-{run.id}"
            assert policy.adapter_path == result.output_path and policy.base_model == model_dir
            assert session.get(PolicyVersion, policy.parent_id).name == model_dir


def test_registered_policy_generates_with_its_adapter(store, model_dir, tmp_path):
    from alignment.generation import SamplingConfig
    from alignment.models import ModelSpec, PolicyPool

    result = train(store, "dpo", model_dir, tmp_path, trainer={"learning_rate": 5e-2})
    with session_scope(store) as session:
        policy = session.exec(select(PolicyVersion).where(PolicyVersion.name == result.policy_name)).one()
    pool = PolicyPool.load(ModelSpec(policy.base_model))
    pool.add(policy.name, policy.adapter_path)
    chat = [[{"role": "user", "content": "what is the capital of france"}]]
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.0)
    base = pool.generate(None, chat, sampling)
    tuned = pool.generate(policy.name, chat, sampling)
    assert base and tuned  # both serve; the adapter is really applied:
    with pool.use(policy.name) as model:
        tuned_logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    with pool.use(None) as model:
        base_logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert not torch.allclose(tuned_logits, base_logits)


@pytest.mark.parametrize("adapter", ["dora", "full", "lm_head"])
def test_other_adapters_train(adapter, store, model_dir, tmp_path):
    result = train(store, "dpo", model_dir, tmp_path, trainer={"max_steps": 2}, adapter={"method": adapter})
    assert result.status == "done"
    out = Path(result.output_path)
    if adapter == "dora":
        assert any("lora_magnitude_vector" in name for name in adapter_tensors(out))
        return
    # No adapter to switch off: the reference log-probs come from one pass before training.
    assert any("reference log-probs precomputed" in note for note in result.notes)
    if adapter == "lm_head":
        assert (out / "lm_head.safetensors").is_file()
    else:  # a full fine-tune is a model of its own: the policy's base is the saved model
        assert (out / "config.json").is_file()
        with session_scope(store) as session:
            policy = session.exec(select(PolicyVersion).where(PolicyVersion.name == result.policy_name)).one()
            assert policy.base_model == str(out) and policy.adapter_path is None


def test_quantized_4bit_lora_trains_on_cpu(store, model_dir, tmp_path):
    """QLoRA as the seed does it (4-bit base, gradient checkpointing), on CPU."""
    result = train(store, "dpo", model_dir, tmp_path, model={"quantize": "4bit"},
                   trainer={"max_steps": 2, "gradient_checkpointing": True})
    lora_b = [t for name, t in adapter_tensors(result.output_path).items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)
    assert all(t.dtype == torch.float32 for t in lora_b)  # not left in TRL's bf16 cast
    assert get_run(store, result.run_id).config["settings"]["model"]["quantize"] == "4bit"


def test_nan_loss_aborts_and_registers_nothing(store, model_dir, tmp_path):
    with pytest.raises(TrainingError, match="aborted.*became nan"):
        train(store, "dpo", model_dir, tmp_path, trainer={"learning_rate": float("inf")})
    with session_scope(store) as session:
        [run] = session.exec(select(TrainingRun)).all()
        assert run.status == RunStatus.aborted and "nan" in run.error
        assert session.exec(select(PolicyVersion).where(PolicyVersion.training_run_id == run.id)).all() == []


def test_resume_continues_from_the_last_checkpoint(store, model_dir, tmp_path):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):  # the process dies after step 3; a checkpoint exists at step 2
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    request = TrainRequest("dpo", model=model_dir, overrides=[{
        "trainer": {**FAST, "max_steps": 4}, "run": {"runs_dir": str(tmp_path / "runs")}}])
    with pytest.raises(KeyboardInterrupt):
        run_training(request, engine=store, progress=False, callbacks=[Kill()])
    run = get_run(store, 1)
    assert run.status == RunStatus.aborted and "interrupted" in run.error
    assert (Path(run.config["settings"]["run"]["output_dir"]) / "checkpoint-2").is_dir()

    resumed = run_training(TrainRequest("dpo", model=model_dir, overrides=[{"run": {"resume": True}}]),
                           engine=store, progress=False)
    assert resumed.run_id == 1 and resumed.status == "done" and resumed.metrics["global_step"] == 4
    steps = [m.step for m in run_metrics(store, 1) if m.name == "loss"]
    assert steps == [1, 2, 3, 4]  # steps 1-2 before the kill, 3-4 from checkpoint-2: none twice
    assert get_run(store, 1).status == RunStatus.done


def test_resume_without_an_unfinished_run_is_an_error(store, model_dir):
    with pytest.raises(TrainingError, match="no unfinished kto run"):
        run_training(TrainRequest("kto", model=model_dir, overrides=[{"run": {"resume": True}}]), engine=store)


def test_empty_snapshot_fails_the_run_with_the_reason(sqlite_url, model_dir, tmp_path):
    engine = preference_store(sqlite_url, n_prompts=0)
    with pytest.raises(TrainingError, match="no dpo training data"):
        train(engine, "dpo", model_dir, tmp_path)
    run = get_run(engine, 1)
    assert run.status == RunStatus.failed and "no dpo training data" in run.error
    with session_scope(engine) as session:
        assert session.exec(select(PolicyVersion).where(PolicyVersion.training_run_id == 1)).all() == []


def test_too_small_snapshot_and_selection_flags(store, model_dir, tmp_path):
    with pytest.raises(TrainingError, match="fewer than the 100 needed"):
        train(store, "dpo", model_dir, tmp_path, run={"min_examples": 100})
    # Judge votes only: same comparisons (the judge voted on all of them) but a different snapshot.
    result = train(store, "dpo", model_dir, tmp_path, selection={"rater_kinds": "judge"}, trainer={"max_steps": 1})
    assert get_run(store, result.run_id).config["settings"]["selection"] == {"rater_kinds": "judge"}


def test_reward_model_that_does_not_fit_fails_clearly(store, tmp_path):
    from tests.tiny_models import build, tiny_tokenizer

    path = tmp_path / "short-bert"
    build("bert", max_position_embeddings=8).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    with pytest.raises(TrainingError, match="fits the reward model"):
        train(store, "reward", str(path), tmp_path)
    assert "fits the reward model" in get_run(store, 1).error


def test_encoder_reward_model_and_scoring(store, tmp_path):
    """A small BERT scorer: TRL's two-row batches, text without a chat template; then score()."""
    from alignment.reward_scoring import RewardScorer, score
    from tests.tiny_models import build, tiny_tokenizer

    path = tmp_path / "bert"
    build("bert").save_pretrained(path)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    result = train(store, "reward", str(path), tmp_path, trainer={"learning_rate": 1e-2})
    assert "eval_accuracy" in result.metrics
    scorer = RewardScorer.load(result.output_path)
    batch = scorer.score_batch(["what is the capital", "explain"], ["good yes", "bad no"])
    assert batch[0] == pytest.approx(scorer.score("what is the capital", "good yes"), abs=1e-5)
    assert score("explain", "bad no", model_path=result.output_path) == pytest.approx(batch[1], abs=1e-5)


@pytest.mark.parametrize("loss_type", ["hinge", "robust"])
def test_dpo_loss_types(loss_type, store, model_dir, tmp_path):
    result = train(store, "dpo", model_dir, tmp_path, trainer={"max_steps": 1},
                   dpo={"loss_type": [loss_type], "beta": 0.5, "label_smoothing": 0.1})
    config = get_run(store, result.run_id).config["trainer"]
    assert config["loss_type"] == [loss_type] and config["beta"] == 0.5


def test_out_of_memory_fails_the_run_with_advice(store, model_dir, tmp_path):
    from transformers import TrainerCallback

    class Exhaust(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    request = TrainRequest("reward", model=model_dir, overrides=[{"trainer": FAST, "run": {"runs_dir": str(tmp_path)}}])
    with pytest.raises(TrainingError, match="out of memory: lower trainer.per_device_train_batch_size"):
        run_training(request, engine=store, progress=False, callbacks=[Exhaust()])
    run = get_run(store, 1)
    assert run.status == RunStatus.failed and run.error.startswith("out of memory")


def test_tensorboard_reporting(store, model_dir, tmp_path):
    result = train(store, "sft", model_dir, tmp_path, trainer={"max_steps": 1, "report_to": "tensorboard"})
    output_dir = Path(result.output_path).parent
    assert list(output_dir.rglob("events.out.tfevents.*"))


def test_sft_from_a_parquet_file_like_the_seed(store, model_dir, tmp_path):
    """The seed's example: instruction tuning on a parquet file with a `text` column."""
    from datasets import Dataset

    path = tmp_path / "train.parquet"
    Dataset.from_dict({"text": [f"<|user|> explain the {w} </s> <|assistant|> the answer is {w} </s>"
                                for w in ("capital", "model", "question", "answer", "poem", "list")]}).to_parquet(path)
    result = train(store, "sft", model_dir, tmp_path, trainer={"max_steps": 2}, run={"data": str(path)})
    run = get_run(store, result.run_id)
    assert run.status == RunStatus.done and run.config["data"] == f"file:{path}"
    assert run.snapshot_ids == {"comparison_ids": [], "response_ids": []} and len(run.snapshot_hash) == 64
    with pytest.raises(TrainingError, match="dpo needs columns prompt/chosen/rejected or chosen/rejected"):
        train(store, "dpo", model_dir, tmp_path, run={"data": str(path)})


@pytest.mark.parametrize("method", ["dpo", "reward"])
def test_group_by_length_as_in_the_seed(method, store, model_dir, tmp_path):
    """transformers' length-grouped sampler needs lengths TRL's pairwise rows do not carry."""
    result = train(store, method, model_dir, tmp_path, trainer={"max_steps": 2,
                                                                "train_sampling_strategy": "group_by_length"})
    assert result.status == "done"


@pytest.mark.postgres
def test_run_lifecycle_on_postgresql(postgres_url, model_dir, tmp_path):
    """The run row, metric curves and lineage go through the store's plain functions: PostgreSQL too."""
    engine = preference_store(postgres_url, n_prompts=8)
    result = train(engine, "dpo", model_dir, tmp_path, trainer={"max_steps": 2})
    run = get_run(engine, result.run_id)
    assert run.status == RunStatus.done and [m.step for m in run_metrics(engine, run.id) if m.name == "loss"] == [1, 2]
    with session_scope(engine) as session:
        policy = session.exec(select(PolicyVersion).where(PolicyVersion.training_run_id == run.id)).one()
        assert policy.adapter_path == result.output_path
