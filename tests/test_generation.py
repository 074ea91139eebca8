"""Batched generation and `prefloop generate` with a tiny random local model, on a real store."""

from __future__ import annotations

import pytest
import torch
from sqlmodel import select

from alignment.generation import (
    GenerationJob,
    SamplingConfig,
    comparison_pairs,
    generate_local,
    run_generation,
)
from alignment.models import AdapterConfig, ModelError, ModelSpec, apply_adapter, load_model, save_adapter
from feedback_store.catalog import add_prompt, get_or_create_policy
from feedback_store.db import session_scope
from feedback_store.models import Comparison, PolicyVersion, Response
from labeling.cli import main
from tests.tiny_models import WORDS, save_tiny_causal_lm

PROMPTS = [
    "what is the capital of france",
    "yes",
    "write a short poem about the model and the question and the answer of the good and the bad",
    "explain three",
    "bonjour merci le la les de est une un et qui que",
]


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return load_model(ModelSpec(tiny_path))


def test_batched_left_padded_greedy_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    conversations = [chat(p) for p in PROMPTS]
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0, batch_size=8)
    batched = generate_local(model, tokenizer, conversations, greedy)
    single = [generate_local(model, tokenizer, [c], greedy)[0] for c in conversations]
    assert [b[0].text for b in batched] == [s[0].text for s in single]
    assert all(b[0].text for b in batched)
    lengths = {b[0].prompt_tokens for b in batched}
    assert len(lengths) == len(PROMPTS)  # really different lengths, so padding was exercised


def test_sampling_is_reproducible_under_a_seed(tiny):
    model, tokenizer = tiny
    conversations = [chat(p) for p in PROMPTS]

    def texts(seed):
        out = generate_local(model, tokenizer, conversations, SamplingConfig(max_new_tokens=8, samples=2, seed=seed,
                                                                             batch_size=4, temperature=1.0))
        return [[c.text for c in per_prompt] for per_prompt in out]

    first = texts(3)
    assert texts(3) == first
    assert texts(4) != first
    assert all(len(per_prompt) == 2 for per_prompt in first)


def test_min_new_tokens_fixes_the_token_budget(tiny):
    model, tokenizer = tiny
    out = generate_local(model, tokenizer, [chat(p) for p in PROMPTS],
                         SamplingConfig(max_new_tokens=7, min_new_tokens=7, samples=1, temperature=1.0))
    assert all(c.completion_tokens == 7 for per_prompt in out for c in per_prompt)


def test_comparison_pairs():
    assert comparison_pairs([[1, 2, 3]]) == [(1, 2), (1, 3), (2, 3)]
    assert comparison_pairs([[1, 2], [3, 4], [5]]) == [(1, 3), (2, 4), (1, 5), (2, 5), (3, 5), (4, 5)]
    assert comparison_pairs([[1], []]) == []


def _add_prompts(engine, texts):
    with session_scope(engine) as session:
        return [add_prompt(chat(t), session=session, split="train")[0].id for t in texts]  # what generate reads


def _rows(engine, model):
    with session_scope(engine) as session:
        return list(session.exec(select(model).order_by(model.id)))


def test_generate_stores_pairs_and_resumes(engine, tiny_path):
    _add_prompts(engine, PROMPTS[:3])
    job = GenerationJob(policies=(tiny_path,), prompts=2, sampling=SamplingConfig(max_new_tokens=5, samples=3))
    report = run_generation(engine, job, show_progress=False)
    assert (report.prompts_done, report.responses, report.comparisons) == (2, 6, 6)
    responses = _rows(engine, Response)
    assert {r.prompt_id for r in responses} == {1, 2}
    assert all(r.generation_params["max_new_tokens"] == 5 and r.generation_params["model"] == tiny_path
               for r in responses)
    assert all(r.prompt_tokens and 1 <= r.completion_tokens <= 5 for r in responses)
    comparisons = _rows(engine, Comparison)
    assert all(c.source == "generate" and c.response_a_id < c.response_b_id for c in comparisons)
    # the same command again: nothing to do
    again = run_generation(engine, job, show_progress=False)
    assert (again.prompts_done, again.prompts_already_done, again.responses) == (0, 2, 0)
    # all prompts: only the third is new
    more = run_generation(engine, GenerationJob(policies=(tiny_path,), sampling=job.sampling), show_progress=False)
    assert more.prompts_done == 1 and more.prompts_already_done == 2
    assert len(_rows(engine, Response)) == 9


def test_two_policies_are_paired_and_adapter_switches(engine, tiny_path, tmp_path):
    base, _ = load_model(ModelSpec(tiny_path))
    trained = apply_adapter(base, AdapterConfig(r=4, alpha=64))
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1.0)
    save_adapter(trained, tmp_path / "adapter")
    with session_scope(engine) as session:
        get_or_create_policy("tuned", session=session, base_model=tiny_path, adapter_path=str(tmp_path / "adapter"))
    _add_prompts(engine, PROMPTS)
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0, samples=1)
    report = run_generation(engine, GenerationJob(policies=(tiny_path, "tuned"), sampling=greedy),
                            show_progress=False)
    assert (report.prompts_done, report.responses, report.comparisons) == (5, 10, 5)
    policies = {p.id: p.name for p in _rows(engine, PolicyVersion)}
    by_prompt: dict[int, dict[str, str]] = {}
    for response in _rows(engine, Response):
        by_prompt.setdefault(response.prompt_id, {})[policies[response.policy_id]] = response.text
    assert sum(texts[tiny_path] != texts["tuned"] for texts in by_prompt.values()) >= 4
    # the base policy's texts are what the plain model produces greedily
    model, tokenizer = load_model(ModelSpec(tiny_path))
    plain = generate_local(model, tokenizer, [chat(p) for p in PROMPTS], greedy)
    assert [by_prompt[i + 1][tiny_path] for i in range(5)] == [c[0].text for c in plain]
    for comparison in _rows(engine, Comparison):
        assert comparison.response_a_id != comparison.response_b_id


def test_a_prompt_too_long_for_the_context_stops_everything_first(engine, tiny_path):
    # the tiny model attends to 128 positions
    ok = _add_prompts(engine, PROMPTS[:2])
    long_id = _add_prompts(engine, [" ".join(WORDS * 3)])[0]
    job = GenerationJob(policies=(tiny_path,), sampling=SamplingConfig(max_new_tokens=8, samples=2))
    with pytest.raises(ModelError, match=rf"prompt {long_id} is \d+ tokens: with max_new_tokens=8 it exceeds the 128-token context") as info:
        run_generation(engine, job, show_progress=False)
    assert "\n" not in str(info.value)
    assert _rows(engine, Response) == []
    assert ok  # the short prompts were not generated either: the check runs before any generation


def test_unknown_policy_is_a_clear_error(engine):
    _add_prompts(engine, PROMPTS[:1])
    with pytest.raises(ModelError, match=r"unknown policy '\./no-such-policy'.*no such directory"):
        run_generation(engine, GenerationJob(policies=("./no-such-policy",)), show_progress=False)
    with pytest.raises(ModelError, match="unknown policy"):
        run_generation(engine, GenerationJob(policies=("no-such-policy",)), show_progress=False)


def test_adapter_that_does_not_fit_stores_nothing(engine, tiny_path, tmp_path):
    wide = save_tiny_causal_lm(tmp_path / "wide", hidden_size=64)
    save_adapter(apply_adapter(load_model(ModelSpec(str(wide)))[0], AdapterConfig(r=2)), tmp_path / "wide-adapter")
    with session_scope(engine) as session:
        get_or_create_policy("misfit", session=session, base_model=tiny_path, adapter_path=str(tmp_path / "wide-adapter"))
    _add_prompts(engine, PROMPTS[:2])
    with pytest.raises(ModelError, match="does not fit this base model"):
        run_generation(engine, GenerationJob(policies=(tiny_path, "misfit")), show_progress=False)
    assert _rows(engine, Response) == []


@pytest.mark.parametrize("native_bf16", [True, False])
def test_local_generation_runs_in_the_native_dtype_and_records_it(engine, tiny_path, monkeypatch, native_bf16):
    """dtype auto: bfloat16 where the CPU computes it natively (AMX / AVX512-BF16), else float32;
    an explicit dtype wins. Each response records the dtype it was sampled in."""
    from alignment.models import spec

    monkeypatch.setattr(spec, "cpu_has_native_bf16", lambda: native_bf16)
    _add_prompts(engine, PROMPTS[:2])
    sampling = SamplingConfig(max_new_tokens=3, samples=2)
    run_generation(engine, GenerationJob(policies=(tiny_path,), prompts=1, sampling=sampling), show_progress=False)
    run_generation(engine, GenerationJob(policies=(tiny_path,), prompts=2, sampling=sampling, dtype="float32"),
                   show_progress=False)
    dtypes = [(r.prompt_id, r.generation_params["dtype"]) for r in _rows(engine, Response)]
    auto = "bfloat16" if native_bf16 else "float32"
    assert dtypes == [(1, auto), (1, auto), (2, "float32"), (2, "float32")]


def test_cli_generate(sqlite_url, tiny_path, capsys):
    from feedback_store.db import engine_for

    _add_prompts(engine_for(sqlite_url), PROMPTS[:2])
    code = main(["generate", "--db", sqlite_url, "--policy", tiny_path, "--prompts", "all",
                 "--samples", "2", "--max-new-tokens", "4", "--temperature", "0.9", "--seed", "5"])
    out = capsys.readouterr().out
    assert code == 0
    assert "2 prompts answered" in out and "4 new responses, 2 new comparisons" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--policy", "./nowhere"], "unknown policy './nowhere'"),
        (["--backend", "openai", "--model", "m"], "--backend openai needs --base-url"),
        (["--base-url", "http://127.0.0.1:9/v1"], "--base-url only applies to --backend openai"),
        (["--prompts", "0"], None),
        (["--temperature", "-1"], "temperature=-1.0: must be >= 0"),
    ],
)
def test_cli_generate_errors_are_one_line(sqlite_url, capsys, argv, message):
    if message is None:
        with pytest.raises(SystemExit) as info:
            main(["generate", "--db", sqlite_url, *argv])
        assert info.value.code == 2
        return
    code = main(["generate", "--db", sqlite_url, *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("prefloop generate: error:") and message in err and "\n" not in err


def test_cli_generate_refuses_an_unmigrated_database(empty_sqlite_url, capsys):
    assert main(["generate", "--db", empty_sqlite_url]) == 2
    assert "prefloop db upgrade" in capsys.readouterr().err
