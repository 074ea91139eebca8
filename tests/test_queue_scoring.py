"""alignment.queue_scoring.PolicyLogProbs on a tiny random model with a LoRA adapter: the DPO
implicit reward margins of `prefloop queue prioritize --by uncertainty --policy NAME`."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from alignment.models import ModelSpec, load_model
from alignment.models.adapters import save_adapter
from alignment.queue_scoring import PolicyLogProbs, dpo_margins
from feedback_store.judge_runs import PairTexts
from tests.test_models_adapters import _train_lora
from tests.tiny_models import save_tiny_causal_lm


def test_policy_logprobs_sum_the_response_tokens_with_and_without_the_adapter(tmp_path):
    base_dir = save_tiny_causal_lm(tmp_path / "base")
    base, _ = load_model(ModelSpec(str(base_dir)))
    save_adapter(_train_lora(base).eval(), tmp_path / "adapter")
    scorer = PolicyLogProbs.load(str(base_dir), str(tmp_path / "adapter"), device="cpu")
    prompts = ["what is the capital of france", [{"role": "user", "content": "write a short poem"}]]
    responses = ["paris is the capital", "a good poem"]
    policy = scorer.logprobs(prompts, responses, adapter=True)
    reference = scorer.logprobs(prompts, responses, adapter=False)
    # By hand, one sequence at a time, on a fresh base model (no adapter at all).
    plain, _ = load_model(ModelSpec(str(base_dir)))
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        ids, start = scorer._ids(prompt, response)
        with torch.no_grad():
            logp = torch.log_softmax(plain(torch.tensor([ids])).logits[0].float(), dim=-1)
        expected = sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))
        assert reference[i] == pytest.approx(expected, abs=1e-3)
        assert policy[i] != pytest.approx(reference[i], abs=1e-3)  # the adapter changes them
    same_prompt = [prompts[0], prompts[0]]
    on, off = (scorer.logprobs(same_prompt, responses, adapter=flag) for flag in (True, False))
    margin = dpo_margins(scorer, [PairTexts(7, prompts[0], responses[0], responses[1])], beta=0.5)[7]
    assert margin == pytest.approx(0.5 * ((on[0] - off[0]) - (on[1] - off[1])), abs=1e-3)
