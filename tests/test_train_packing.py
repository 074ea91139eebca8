"""The prefix-shared packed rows compute exactly what TRL's two-row padded batches compute:
the same per-token log-probs (and gradients) for DPO, the same scores for a reward model."""

from __future__ import annotations

import pytest
import torch

from alignment.training import packing
from tests.tiny_models import build

PAIRS = [  # (prompt, chosen, rejected) token ids of uneven lengths, one prompt of a single token
    ([5, 9, 12, 7], [20, 21, 22], [30, 31, 32, 33, 34, 35]),
    ([6], [40, 41, 42, 43, 44, 45, 46, 47], [50]),
    ([8, 9, 10, 11, 12, 13, 14], [60, 61], [62, 63, 64]),
]


def trl_log_probs(model, pairs):
    """Per-token log-probs the way TRL's DPOTrainer gets them: two padded rows per pair."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model)
    batch = DataCollatorForPreference(pad_token_id=0)(
        [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs]
    )
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                fused_lm_head=True, use_cache=False)
    return out.log_probs * batch["completion_mask"][:, 1:], batch["completion_mask"][:, 1:]


def packed_log_probs(model, pairs, shape):
    packed, layout = packing.pack_pairs(*zip(*pairs))
    src, tgt, seq, pos = packing.completion_token_index(layout, packed["input_ids"])
    assert packing.use_packed_attention(model)
    packing.add_packed_heads(model)
    out = model(**packing.packed_model_kwargs(packed, "cpu"), prefloop_head="logprobs", prefloop_index=src,
                prefloop_targets=tgt)
    return packing.scatter_to_rows(out["log_probs"], seq, pos, shape)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_dpo_log_probs_and_gradients_match_trl(checkpointing):
    reference = build("llama", seed=1)
    packed_model = build("llama", seed=1)
    for model in (reference, packed_model):
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    expected, mask = trl_log_probs(reference, PAIRS)
    got = packed_log_probs(packed_model, PAIRS, tuple(expected.shape))
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert int((got != 0).sum()) == int(mask.sum())  # every completion token, nothing else

    weights = torch.linspace(0.5, 1.5, expected.numel()).view_as(expected)  # an arbitrary per-token loss
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    for (name, a), b in zip(reference.named_parameters(), packed_model.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_packed_reward_scores_match_the_sequence_classifier():
    from trl.trainer.reward_trainer import DataCollatorForPreference

    model = build("llama-reward", seed=2).eval()
    examples = [{"chosen_ids": p + c, "rejected_ids": p + r} for p, c, r in PAIRS]
    batch = DataCollatorForPreference(pad_token_id=0)(examples)
    with torch.no_grad():
        expected = model(**batch).logits.squeeze(-1)
        pieces = [packing.split_shared_prompt(e["chosen_ids"], e["rejected_ids"]) for e in examples]
        assert [len(p) for p, _, _ in pieces] == [len(p) for p, _, _ in PAIRS]
        packed, layout = packing.pack_pairs(*zip(*pieces))
        ends = packing.sequence_end_index(layout, packed["input_ids"], pad_token_id=0)
        assert packing.use_packed_attention(model)
        packing.add_packed_heads(model)
        got = model(**packing.packed_model_kwargs(packed, "cpu"), prefloop_head="score", prefloop_index=ends)
    assert torch.allclose(got, expected, atol=1e-5)


def test_ordinary_calls_are_unchanged_after_switching_attention():
    """Generation, padded batches: the registered attention is plain SDPA without segments."""
    model = build("llama", seed=3).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        assert packing.use_packed_attention(model)
        packing.add_packed_heads(model)
        after = model(input_ids=ids, attention_mask=mask).logits
        generated = model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    assert torch.allclose(before, after, atol=1e-6)
    assert generated.shape == (1, 8)


def test_split_shared_prompt_keeps_a_token_per_completion():
    assert packing.split_shared_prompt([1, 2, 3, 4], [1, 2, 5]) == ([1, 2], [3, 4], [5])
    assert packing.split_shared_prompt([1, 2, 3], [1, 2, 3]) == ([1, 2], [3], [3])
    assert packing.split_shared_prompt([7], [8, 9]) == ([], [7], [8, 9])
