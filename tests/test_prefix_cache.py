"""alignment.prefix_cache on tiny random models: a batch run on a cached prefix gives the
logits and the greedy tokens of plain, uncached runs of the whole prompts."""

from __future__ import annotations

import pytest
import torch

from alignment.prefix_cache import EMPTY_PREFIX, PrefixKV, _length_groups, greedy, last_logits
from tests.tiny_judge_model import tiny_model

PREFIX = [5, 17, 42, 8, 99, 23, 61]
SUFFIXES = [[7, 3, 11], [12], [30, 31, 32, 33, 34, 35], [40, 41]]  # different lengths: padding


@pytest.fixture(params=["llama", "gpt2"])  # rotary and absolute positions
def model(request):
    model = tiny_model(kind=request.param)[0]
    # Sharper attention than a fresh init's: otherwise a wrong position hardly moves a token.
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "c_attn.weight")):
                weight.mul_(10)
    return model


def test_last_logits_on_a_cached_prefix_are_those_of_the_whole_prompts(model):
    with torch.inference_mode():
        expected = torch.stack([model(torch.tensor([PREFIX + s])).logits[0, -1] for s in SUFFIXES])
    prefix = PrefixKV.compute(model, PREFIX)
    kept = [k.clone() for k, _ in prefix.layers]
    torch.testing.assert_close(last_logits(model, prefix, SUFFIXES), expected, atol=1e-4, rtol=1e-4)
    uncached = last_logits(model, EMPTY_PREFIX, [PREFIX + s for s in SUFFIXES])
    torch.testing.assert_close(uncached, expected, atol=1e-4, rtol=1e-4)
    for suffix, row in zip(SUFFIXES, expected):  # alone as in the batch
        torch.testing.assert_close(last_logits(model, prefix, [suffix])[0], row, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(k, before) for (k, _), before in zip(prefix.layers, kept))  # copied, not changed


def test_greedy_on_a_cached_prefix_continues_like_generate(model):
    stop = {int(model.config.eos_token_id)}
    expected = []
    with torch.inference_mode():
        for suffix in SUFFIXES:
            ids = torch.tensor([PREFIX + suffix])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 pad_token_id=model.config.pad_token_id)
            tokens = out[0, ids.shape[1] :].tolist()
            end = next((k + 1 for k, t in enumerate(tokens) if t in stop), len(tokens))
            expected.append(tokens[:end])
    prefix = PrefixKV.compute(model, PREFIX)
    assert greedy(model, prefix, SUFFIXES, 8, stop) == expected
    assert greedy(model, EMPTY_PREFIX, [PREFIX + s for s in SUFFIXES], 8, stop) == expected
    assert [greedy(model, prefix, [s], 8, stop)[0] for s in SUFFIXES] == expected


def test_an_empty_suffix_is_refused(model):
    with pytest.raises(ValueError, match="at least one token"):
        last_logits(model, PrefixKV.compute(model, PREFIX), [[1, 2], []])
    with pytest.raises(ValueError, match="no prompts"):
        last_logits(model, PrefixKV.compute(model, PREFIX), [])


def test_prompts_of_very_different_lengths_run_in_separate_sub_batches():
    # Sorted by length; 90 and 100 together (10% padding), not with 3 and 4.
    assert _length_groups([3, 100, 4, 90], max_padding=0.25) == [[0, 2], [3, 1]]
    assert _length_groups([3, 100, 4, 90], max_padding=1.0) == [[0, 2, 3, 1]]
