"""The in-process judge on a tiny random model: batched through the runner; with its shared
prompt prefix cached, the same answers as a plain pass one prompt at a time; and a generating
judge's unreadable text never becomes a label."""

from __future__ import annotations

import json

import pytest

from alignment.generation import SamplingConfig, generate_local
from feedback_store.db import engine_for
from labeling.judge import JudgeRunConfig, run_judge
from labeling.judge.local_backend import LocalJudge, LocalJudgeConfig
from labeling.judge.templates import get_template
from tests.judge_helpers import add_pairs, calls, votes_by_comparison
from tests.tiny_judge_model import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_model()


@pytest.fixture
def sqlite_engine(sqlite_url):
    return engine_for(sqlite_url)


def _conversations(n, criteria=None):
    template = get_template("pairwise-verdict-v1")
    return [
        template.render(
            [{"role": "user", "content": f"question {i}" + " and more" * i}], f"answer {i}", "other " * (i + 1), criteria
        )
        for i in range(n)
    ]


def _verdicts(judge, batches):
    """(text, verdict logprob, prompt tokens) of every prompt, judged in the given batches."""
    return [(r.text, r.logprobs[1].logprob, r.prompt_tokens) for batch in batches for r in judge.run_batch(batch)]


def _assert_same_verdicts(got, expected):
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert [g[2] for g in got] == [e[2] for e in expected]
    assert [g[1] for g in got] == pytest.approx([e[1] for e in expected], abs=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # rotary and absolute positions
def test_cached_prefix_and_batching_give_the_verdicts_of_a_plain_pass_one_at_a_time(kind):
    model, tokenizer = tiny_model(kind=kind)
    # Different lengths (the batch is padded) and two criteria texts (two shared prefixes).
    conversations = _conversations(6) + _conversations(3, criteria="Prefer the shorter answer.")
    plain = LocalJudge(model, tokenizer, LocalJudgeConfig(batch_size=1, prefix_cache=False))
    expected = _verdicts(plain, [[c] for c in conversations])
    assert plain.cached_prompt_tokens == 0
    for batch_size in (16, 1):
        cached = LocalJudge(model, tokenizer, LocalJudgeConfig(batch_size=batch_size))
        batches = [conversations[i : i + batch_size] for i in range(0, len(conversations), batch_size)]
        _assert_same_verdicts(_verdicts(cached, batches), expected)
        # The shared system prompt came from the cache for every prompt.
        assert cached.cached_prompt_tokens > 0.5 * sum(e[2] for e in expected)
        # A second pass on the same cache: it was copied into the batches, not changed by them.
        _assert_same_verdicts(_verdicts(cached, batches), expected)
    uncached_batch = LocalJudge(model, tokenizer, LocalJudgeConfig(batch_size=16, prefix_cache=False))
    _assert_same_verdicts(_verdicts(uncached_batch, [conversations]), expected)


def test_a_prefix_whose_last_token_merges_with_the_prompt_is_not_cached():
    model, _ = tiny_model()
    tokenizer = tiny_tokenizer()
    # "[" ends the prefix and the judge prompt begins with "[The Start": tokenized whole, the
    # two make one "[[" token, so the prefix's tokens are not the start of the prompt's.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}[{{ m['content'] }}]\n{% endfor %}"
        "{% if add_generation_prompt %}assistant[{% endif %}"
    )
    conversations = _conversations(3)
    plain = LocalJudge(model, tokenizer, LocalJudgeConfig(prefix_cache=False))
    judge = LocalJudge(model, tokenizer, LocalJudgeConfig())
    _assert_same_verdicts(_verdicts(judge, [conversations]), _verdicts(plain, [conversations]))
    assert judge.cached_prompt_tokens == 0


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_mode_on_a_cached_prefix_matches_plain_generation(kind):
    model, tokenizer = tiny_model(kind=kind)
    conversations = _conversations(5)
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.0, batch_size=1)
    expected = [c for [c] in generate_local(model, tokenizer, conversations, sampling)]
    for batch_size in (8, 1):
        config = LocalJudgeConfig(mode="generate", batch_size=batch_size, max_new_tokens=10)
        judge = LocalJudge(model, tokenizer, config)
        replies = [r for i in range(0, 5, batch_size) for r in judge.run_batch(conversations[i : i + batch_size])]
        assert judge.cached_prompt_tokens > 0
        assert [r.text for r in replies] == [c.text for c in expected]
        assert any(r.text for r in replies)  # some text to compare (the tiny GPT-2 mostly emits special tokens)
        assert [r.completion_tokens for r in replies] == [c.completion_tokens for c in expected]
        assert [r.prompt_tokens for r in replies] == [c.prompt_tokens for c in expected]
        assert all(r.truncated == (r.completion_tokens >= 10) for r in replies)


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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_local_judge_from_the_command_line_in_either_dtype(sqlite_url, tmp_path, capsys, model_and_tokenizer, dtype):
    from labeling.cli import main

    model, tokenizer = model_and_tokenizer
    model.save_pretrained(tmp_path / "judge-model")
    tokenizer.save_pretrained(tmp_path / "judge-model")
    engine = engine_for(sqlite_url)
    ids = add_pairs(engine, [(f"answer {i}", f"other answer {i}") for i in range(3)])
    argv = ["judge", "--db", sqlite_url, "--backend", "local", "--model", str(tmp_path / "judge-model"),
            "--dtype", dtype, "--batch-size", "4", "--no-progress", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["requests"] == 6 and summary["decided"] + summary["failed"] == 3
    votes = votes_by_comparison(engine)
    assert set(votes) <= set(ids) and len(votes) == summary["decided"] and len(calls(engine)) == 6
    judge = LocalJudge.load(LocalJudgeConfig(model=str(tmp_path / "judge-model"), dtype=dtype))
    assert str(judge.model.dtype) == f"torch.{dtype}"


def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it_natively():
    from alignment.models.spec import ModelSpec, cpu_has_native_bf16, inference_dtype

    assert inference_dtype(ModelSpec(device="cpu")) == ("bfloat16" if cpu_has_native_bf16() else "float32")
    assert inference_dtype(ModelSpec(device="cpu", dtype="float32")) == "float32"
    assert inference_dtype(ModelSpec(device="cpu", dtype="float16")) == "float16"
