"""Best-of-n sampling (`prefloop generate --best-of N`): N samples per prompt in one batched pass,
the best under a reward kept as an SFT example with its score, and `prefloop train sft` on them
(rejection-sampling fine-tuning)."""

from __future__ import annotations

import json

import pytest
from sqlmodel import select

import alignment.sampling
from alignment.generation import BestOfN, GenerationJob, SamplingConfig, run_generation
from alignment.models import ModelError
from alignment.training.online_rewards import RewardSource, rubric_reward
from feedback_store.catalog import add_prompt
from feedback_store.db import engine_for, session_scope
from feedback_store.export import Selection, export_sft
from feedback_store.models import BEST_OF_N, Comparison, Response, RunStatus, TrainingRun
from labeling.cli import main
from tests.test_generation import PROMPTS, chat
from tests.tiny_models import save_tiny_causal_lm


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model"))


def _add_prompts(engine, texts) -> list[int]:
    with session_scope(engine) as session:
        return [add_prompt(chat(text), session=session, split="train")[0].id for text in texts]


def _rows(engine, model):
    with session_scope(engine) as session:
        return list(session.exec(select(model).order_by(model.id)))


def _best_of(n: int = 4, rubric: str = "shorter") -> BestOfN:
    return BestOfN(n=n, reward=RewardSource(reward_rubric=rubric))


@pytest.fixture
def batches(monkeypatch):
    """The rows of every batch that local sampling decodes (whichever decoding loop runs it:
    generate_local reports each batch's sequences through its progress callback)."""
    widths: list[int] = []
    original = alignment.sampling.generate_local

    def spy(model, tokenizer, conversations, sampling, *, progress=None, **kwargs):
        def counting(n: int) -> None:
            widths.append(n)
            if progress is not None:
                progress(n)

        return original(model, tokenizer, conversations, sampling, progress=counting, **kwargs)

    monkeypatch.setattr(alignment.sampling, "generate_local", spy)
    return widths


def test_the_kept_answer_is_the_best_of_n_under_the_rubric(engine, tiny_path, batches):
    prompt_ids = _add_prompts(engine, PROMPTS[:3])
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, batch_size=16, seed=2)
    job = GenerationJob(policies=(tiny_path,), sampling=sampling, best_of=_best_of(4))
    report = run_generation(engine, job, show_progress=False)

    assert batches == [12]  # 3 prompts x 4 samples: one batched pass
    assert (report.prompts_done, report.kept, report.comparisons) == (3, 3, 0)
    assert "best of 4 under rubric:shorter" in report.summary()
    assert _rows(engine, Comparison) == []
    kept = _rows(engine, Response)
    assert sorted(r.prompt_id for r in kept) == prompt_ids
    rule_scores = rubric_reward("shorter")
    distinct = 0
    for response in kept:
        record = response.generation_params["best_of_n"]
        candidates, scores = record["candidates"], record["scores"]
        assert record["n"] == 4 and record["reward"] == "rubric:shorter" and len(candidates) == 4
        assert response.sft_source == BEST_OF_N
        # the stored scores are the rubric's, recomputed here over all N samples
        prompt = next(p for p in PROMPTS[:3] if p == response_prompt(engine, response))
        assert rule_scores([chat(prompt)] * 4, candidates) == pytest.approx(scores)
        assert response.reward_score == max(scores)
        assert response.text == candidates[record["kept"]] == candidates[scores.index(max(scores))]
        assert len(response.text) == min(len(c) for c in candidates)  # shorter: the shortest wins
        distinct += len(set(scores)) > 1
    assert distinct >= 1  # the samples really differed, so the choice meant something

    # a rerun resumes: every prompt has its best-of-n answer
    again = run_generation(engine, job, show_progress=False)
    assert (again.prompts_done, again.prompts_already_done, again.kept) == (0, 3, 0)
    # a plain run does not count best-of-n answers as answers: it samples pairs as ever
    plain = run_generation(engine, GenerationJob(policies=(tiny_path,), sampling=SamplingConfig(
        max_new_tokens=4, samples=2, temperature=1.0)), show_progress=False)
    assert plain.prompts_done == 3 and plain.comparisons >= 1


def response_prompt(engine, response) -> str:
    from feedback_store.models import Prompt

    with session_scope(engine) as session:
        return session.get(Prompt, response.prompt_id).messages[0]["content"]


def test_the_sft_export_takes_them_with_their_scores(engine, tiny_path):
    _add_prompts(engine, PROMPTS[:2])
    job = GenerationJob(policies=(tiny_path,), sampling=SamplingConfig(max_new_tokens=6, temperature=1.0),
                        best_of=_best_of(3, "longer"))
    run_generation(engine, job, show_progress=False)
    with session_scope(engine) as session:
        everything = export_sft(session=session)
        only = export_sft(session=session, selection=Selection(sft_source="best-of-n"))
        labels = export_sft(session=session, selection=Selection(sft_source="labels"))
    kept = {r.id: r for r in _rows(engine, Response)}
    assert len(everything) == len(only) == 2 and len(labels) == 0
    for row in everything.to_list():
        response = kept[row["response_id"]]
        assert row["source"] == "best-of-n" and row["comparison_id"] is None
        assert row["score"] == response.reward_score and row["completion"][0]["content"] == response.text
    with pytest.raises(ValueError, match="sft_source"):
        Selection(sft_source="edits")


def test_cli_best_of_then_train_sft_on_the_kept_answers(sqlite_url, tiny_path, tmp_path, capsys):
    store = engine_for(sqlite_url)
    _add_prompts(store, PROMPTS)
    assert main(["generate", "--db", sqlite_url, "--policy", tiny_path, "--prompts", "all", "--best-of", "3",
                 "--reward-rubric", "shorter", "--max-new-tokens", "6", "--temperature", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "best of 3 under rubric:shorter for 5 prompts" in out and "5 answers kept as SFT examples" in out
    kept = {r.id for r in _rows(store, Response) if r.sft_source == BEST_OF_N}
    assert len(kept) == 5

    exported = tmp_path / "sft.jsonl"
    assert main(["export", "sft", "--db", sqlite_url, "--sft-source", "best-of-n", "--out", str(exported)]) == 0
    rows = [json.loads(line) for line in exported.read_text().splitlines()]
    assert {row["response_id"] for row in rows} == kept and all(row["score"] is not None for row in rows)

    assert main(["train", "sft", "--db", sqlite_url, "--model", tiny_path, "--no-progress", "--max-steps", "2",
                 "--sft-source", "best-of-n", "--output-dir", str(tmp_path / "out")]) == 0
    run = _rows(store, TrainingRun)[-1]
    assert run.status == RunStatus.done and run.kind == "sft"
    assert set(run.snapshot_ids["response_ids"]) == kept  # it trained on exactly the kept answers
    assert run.config["settings"]["selection"]["sft_source"] == "best-of-n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--best-of", "3"], "--best-of needs a reward: --reward-run RUN_ID"),
        (["--best-of", "1", "--reward-rubric", "shorter"], "--best-of 1: must be at least 2"),
        (["--best-of", "3", "--reward-rubric", "politest"], "--reward-rubric politest: unknown rubric rule 'politest'"),
        (["--reward-rubric", "shorter"], "--reward-rubric is the reward of --best-of N: give --best-of too"),
        (["--best-of", "3", "--reward-rubric", "shorter", "--samples", "2"], "drop --samples"),
        (["--best-of", "3", "--reward-rubric", "shorter", "--reward-run", "7"],
         "give one reward, not --reward-run and --reward-rubric"),
        (["--best-of", "3", "--reward-run", "7"], "--reward-run 7: no training run with that id"),
        (["--best-of", "3", "--reward-model", "/nowhere"], "--reward-model /nowhere: not a prefloop reward model"),
        (["--best-of", "3", "--reward-function", "nowhere_module:f"], "--reward-function nowhere_module:f: cannot import"),
        (["--best-of", "3", "--reward-rubric", "shorter", "--temperature", "0"], "--best-of needs sampling"),
    ],
)
def test_bad_input_is_one_line_before_sampling(sqlite_url, tiny_path, capsys, monkeypatch, argv, message):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled")

    monkeypatch.setattr(alignment.sampling, "generate_local", no_sampling)
    code = main(["generate", "--db", sqlite_url, "--policy", tiny_path, *argv])
    out, err = capsys.readouterr()
    err = err.strip()
    assert code == 2 and "imported" not in out  # nothing written first (not even the default prompts)
    assert err.startswith("prefloop generate: error:") and message in err and "\n" not in err, err
    assert _rows(engine_for(sqlite_url), Response) == []


def test_best_of_n_config_checks():
    with pytest.raises(ModelError, match="at least 2"):
        _best_of(0)
    with pytest.raises(ModelError, match="needs a reward"):
        BestOfN(n=3)
    with pytest.raises(ModelError, match="judge reward is not offered"):
        BestOfN(n=3, reward=RewardSource(reward_judge=True))
