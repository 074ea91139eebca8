"""The in-process judge on a tiny random model: batched through the runner, same answers as
one at a time, and a generating judge's unreadable text never becomes a label."""

from __future__ import annotations

import pytest

from feedback_store.db import engine_for
from labeling.judge import JudgeRunConfig, run_judge
from labeling.judge.local_backend import LocalJudge, LocalJudgeConfig
from labeling.judge.templates import get_template
from tests.judge_helpers import add_pairs, calls, votes_by_comparison
from tests.tiny_judge_model import tiny_model


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_model()


@pytest.fixture
def sqlite_engine(sqlite_url):
    return engine_for(sqlite_url)


def _conversations(n):
    template = get_template("pairwise-verdict-v1")
    return [
        template.render([{"role": "user", "content": f"question {i}" + " and more" * i}], f"answer {i}", "other " * (i + 1))
        for i in range(n)
    ]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # rotary and absolute positions
def test_a_batch_gives_the_same_verdicts_as_one_at_a_time(kind):
    model, tokenizer = tiny_model(kind=kind)
    judge = LocalJudge(model, tokenizer, LocalJudgeConfig(batch_size=8))
    conversations = _conversations(6)  # different lengths: the batch is left-padded
    batched = judge.run_batch(conversations)
    alone = [judge.run_batch([c])[0] for c in conversations]
    assert [r.text for r in batched] == [r.text for r in alone]
    for x, y in zip(batched, alone):
        assert x.logprobs[1].logprob == pytest.approx(y.logprobs[1].logprob, abs=1e-4)
        assert x.prompt_tokens == y.prompt_tokens


def test_choice_mode_through_the_runner_batches_and_records_confidence(sqlite_engine, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = add_pairs(sqlite_engine, [(f"answer {i}", f"other answer {i}") for i in range(10)])
    judge = LocalJudge(model, tokenizer, LocalJudgeConfig(batch_size=4), model_id="local:tiny")
    summary = run_judge(sqlite_engine, judge, JudgeRunConfig(template="pairwise-verdict-v1", progress=False))
    assert summary.requests == 20 and summary.decided == 10 and summary.failed == 0
    assert max(judge.batches) > 1 and sum(judge.batches) == 20  # requests were grouped
    votes = votes_by_comparison(sqlite_engine)
    assert set(votes) == set(ids)
    consistent = [v for v in votes.values() if not (v.rationale or "").startswith("inconsistent")]
    assert all(0 < v.confidence <= 1 for v in consistent)
    assert summary.rater == "judge:local:tiny@pairwise-verdict-v1"
    # Resumable like any judge: nothing left to do.
    again = run_judge(sqlite_engine, judge, JudgeRunConfig(template="pairwise-verdict-v1", progress=False))
    assert again.requests == 0


def test_generated_gibberish_is_recorded_as_parse_failures(sqlite_engine, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    add_pairs(sqlite_engine, [("one", "two"), ("three", "four")])
    judge = LocalJudge(model, tokenizer, LocalJudgeConfig(mode="generate", batch_size=4, max_new_tokens=6))
    summary = run_judge(sqlite_engine, judge, JudgeRunConfig(progress=False))
    assert summary.decided == 0 and votes_by_comparison(sqlite_engine) == {}
    stored = calls(sqlite_engine, summary.run_id)
    assert len(stored) == 4 and all(c.status == "parse_error" and c.error for c in stored)
    assert all(c.completion_tokens > 0 for c in stored)


def test_bad_local_configs_are_refused():
    with pytest.raises(ValueError, match="mode must be"):
        LocalJudgeConfig(mode="sample")
    with pytest.raises(ValueError, match="batch_size"):
        LocalJudgeConfig(batch_size=0)
