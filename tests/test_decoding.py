"""alignment/decoding.py: the static-cache loop gives transformers' `generate` tokens (greedy),
samples reproducibly under a seed within the same rules, and is used only where it is exact."""

from __future__ import annotations

import pytest
import torch

from alignment import decoding
from alignment.generation import SamplingConfig, generate_local
from alignment.models import ModelSpec, load_model
from tests.tiny_models import save_tiny_causal_lm

PROMPTS = [
    "what is the capital of france",
    "yes",
    "write a short poem about the model and the question and the answer of the good and the bad",
    "explain three",
]


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    path = save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / request.param, name=request.param, seed=1)
    return load_model(ModelSpec(str(path)))


def _encoded(tokenizer, texts):
    return tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)


def test_the_tiny_models_take_the_fast_path(tiny):
    model, _ = tiny
    assert decoding.supports(model)


@pytest.mark.parametrize("texts", [PROMPTS, [PROMPTS[0]] * 3, [PROMPTS[2], PROMPTS[1], PROMPTS[2], PROMPTS[3], PROMPTS[1]]],
                         ids=["padded", "one-prompt", "repeated-and-padded"])
def test_greedy_tokens_equal_generate(tiny, texts):
    model, tokenizer = tiny
    encoded = _encoded(tokenizer, texts)
    with torch.inference_mode():
        expected = model.generate(**encoded, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = expected[:, encoded["input_ids"].shape[1]:]
    got = decoding.decode(model, encoded["input_ids"], encoded["attention_mask"], max_new_tokens=12,
                          stop_ids={tokenizer.eos_token_id}, pad_id=tokenizer.pad_token_id)
    assert got.tolist() == expected.tolist()


def test_a_repeated_prompt_is_encoded_once(tiny):
    model, tokenizer = tiny
    encoded = _encoded(tokenizer, [PROMPTS[2], PROMPTS[1], PROMPTS[2], PROMPTS[2], PROMPTS[1]])
    prompt_rows = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: prompt_rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        tokens = decoding.decode(model, encoded["input_ids"], encoded["attention_mask"], max_new_tokens=6,
                                 min_new_tokens=6)
    finally:
        hook.remove()
    assert prompt_rows == [2]  # one prompt pass, two distinct prompts
    assert tokens.shape == (5, 6)
    assert tokens[0].tolist() == tokens[2].tolist() == tokens[3].tolist()  # greedy: same prompt, same tokens


def test_generate_local_greedy_is_the_same_on_both_paths(tiny, monkeypatch):
    model, tokenizer = tiny
    greedy = SamplingConfig(max_new_tokens=10, temperature=0.0, batch_size=3)
    fast = generate_local(model, tokenizer, [chat(p) for p in PROMPTS], greedy)
    monkeypatch.setenv(decoding.ENV, "generate")
    assert not decoding.supports(model)
    slow = generate_local(model, tokenizer, [chat(p) for p in PROMPTS], greedy)
    assert fast == slow


def test_sampling_is_seeded_and_keeps_the_budget(tiny):
    model, tokenizer = tiny
    config = SamplingConfig(max_new_tokens=9, min_new_tokens=9, temperature=1.0, top_p=0.9, seed=5, batch_size=4)
    first = generate_local(model, tokenizer, [chat(p) for p in PROMPTS], config)
    assert generate_local(model, tokenizer, [chat(p) for p in PROMPTS], config) == first
    assert all(c.completion_tokens == 9 for per_prompt in first for c in per_prompt)


def test_stop_tokens_end_a_row_and_pad_the_rest(tiny):
    model, tokenizer = tiny
    encoded = _encoded(tokenizer, PROMPTS)
    with torch.inference_mode():
        first = decoding.decode(model, encoded["input_ids"], encoded["attention_mask"], max_new_tokens=1).tolist()
    stop = {first[0][0]}  # row 0 stops at once
    got = decoding.decode(model, encoded["input_ids"], encoded["attention_mask"], max_new_tokens=6, stop_ids=stop,
                          pad_id=tokenizer.pad_token_id).tolist()
    assert got[0][0] == first[0][0] and all(t == tokenizer.pad_token_id for t in got[0][1:])


def test_sample_next_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    drawn = {int(decoding.sample_next(logits, temperature=1.0, top_k=0, top_p=0.8)) for _ in range(200)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.8: the tail is never drawn
    drawn = {int(decoding.sample_next(logits, temperature=1.0, top_k=1, top_p=1.0)) for _ in range(50)}
    assert drawn == {0}


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.9)],
                         ids=["full-softmax", "top-k", "top-p"])
def test_sample_next_draws_from_the_warped_softmax(temperature, top_k, top_p):
    """Frequencies over many draws match the distribution generate's warpers define (chi-square),
    zero-probability tokens are never drawn, and a seeded generator repeats its draws."""
    from scipy.stats import chisquare

    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04, 0.0], dtype=torch.float64)
    expected = torch.softmax(torch.log(probs) / temperature, 0)
    if top_k:
        expected[top_k:] = 0
    if top_p < 1.0:
        expected[(torch.cumsum(expected, 0) - expected) >= top_p] = 0
    expected = expected / expected.sum()
    logits = torch.log(probs).float().expand(4000, -1).contiguous()  # one draw per row

    def draw():
        return decoding.sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                    generator=torch.Generator().manual_seed(3))

    drawn = draw()
    counts = torch.bincount(drawn, minlength=len(probs)).double()
    keep = expected > 0
    assert counts[~keep].sum() == 0
    observed, wanted = counts[keep].numpy(), (expected[keep] * len(drawn)).numpy()
    assert chisquare(observed, wanted * observed.sum() / wanted.sum()).pvalue > 1e-3
    assert torch.equal(draw(), drawn)


def test_other_models_keep_generate(tmp_path):
    model, _ = load_model(ModelSpec(str(save_tiny_causal_lm(tmp_path / "m", name="mixtral"))))
    assert not decoding.supports(model)
    model.generation_config.repetition_penalty = 1.3
    assert not decoding.supports(model)


def test_an_untested_transformers_decodes_with_generate(tiny, monkeypatch):
    """The loop runs transformers' own layer modules step by step: on a transformers version it
    was not tested with, `alignment._compat` sends sampling back to `generate`."""
    from packaging.version import Version

    from alignment import _compat

    model, _ = tiny
    real = _compat.installed_version
    assert decoding.supports(model)
    monkeypatch.setattr(_compat, "installed_version",
                        lambda library: Version("6.0") if library == "transformers" else real(library))
    assert not decoding.supports(model)
    monkeypatch.setenv("PREFLOOP_COMPAT", "public")
    monkeypatch.setattr(_compat, "installed_version", real)
    assert not decoding.supports(model)


# -- opt-in int8 weights (alignment/cpu_int8.py) ------------------------------------------------
def _fresh(name: str, tmp_path):
    return load_model(ModelSpec(str(save_tiny_causal_lm(tmp_path / name, name=name, seed=1))))


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_smoothing_keeps_the_float_function(name, tmp_path):
    """The SmoothQuant rescaling moves outliers from inputs to weights without changing logits."""
    from alignment import cpu_int8

    model, tokenizer = _fresh(name, tmp_path)
    encoded = _encoded(tokenizer, PROMPTS)
    with torch.inference_mode():
        before = model(**encoded).logits
    absmax = cpu_int8.input_absmax(model, tokenizer, PROMPTS[:2], new_tokens=3)
    assert len(absmax) == 3 * model.config.num_hidden_layers
    down = model.model.layers[0].mlp.down_proj.weight.clone()
    cpu_int8.smooth(model, absmax)
    assert not torch.equal(down, model.model.layers[0].mlp.down_proj.weight)  # something was rescaled
    with torch.inference_mode():
        after = model(**encoded).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_int8_keeps_the_decoding_path_and_the_named_float_layers(tmp_path):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from alignment import cpu_int8

    model, tokenizer = _fresh("llama", tmp_path)
    encoded = _encoded(tokenizer, PROMPTS)
    reference = decoding.decode(model, encoded["input_ids"], encoded["attention_mask"], max_new_tokens=1)
    embedding = model.model.embed_tokens.weight.clone()
    cpu_int8.quantize_int8(model, tokenizer, PROMPTS[2:])
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, DynamicLinear) and isinstance(model.lm_head, DynamicLinear)
    assert type(layer.mlp.down_proj) is torch.nn.Linear  # kept float by default
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the tied embedding stays float
    assert decoding.supports(model)
    got = decoding.decode(model, encoded["input_ids"], encoded["attention_mask"], max_new_tokens=4,
                          stop_ids={tokenizer.eos_token_id}, pad_id=tokenizer.pad_token_id)
    assert got.shape == (len(PROMPTS), 4) and got.dtype == torch.long
    # lossy, but close on a tiny random model: most first tokens agree with float
    assert (got[:, 0] == reference[:, 0]).float().mean() >= 0.5


def test_int8_refuses_models_off_the_decoding_path(tmp_path, monkeypatch):
    from alignment import cpu_int8
    from alignment.models.errors import ModelError

    model, tokenizer = _fresh("llama", tmp_path)
    monkeypatch.setenv(decoding.ENV, "generate")
    with pytest.raises(ModelError, match="static-cache decoding path"):
        cpu_int8.quantize_int8(model, tokenizer, PROMPTS)
    monkeypatch.delenv(decoding.ENV)
    with pytest.raises(ModelError, match="calibration"):
        cpu_int8.quantize_int8(model, tokenizer, [])
