"""ORPO and SimPO on prefix-shared packed pairs (alignment/training/reference_free.py) compute what
TRL's own two-row padded `concatenated_forward` computes: the same loss, the same metrics (but
the `logits/*` means, which TRL takes over its padded grid) and the same gradients."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from tests.train_helpers import tiny_model

PAIRS = [  # prompts of uneven lengths; answers that share their first words, or not
    ("What is the capital of France?", "Paris is the capital.", "Paris, I think, but maybe Lyon or Marseille."),
    ("Name a colour.", "Blue.", "A colour is a property of light that we perceive as hue and saturation."),
    ("Say hello politely to a new colleague on their first day at work.", "Hello, welcome aboard!", "Hi."),
]


def trainer_for(method: str, model_dir: str, out, prefix_sharing: bool, settings: dict):
    from alignment.models import ModelSpec, apply_adapter, load_model
    from alignment.models.adapters import AdapterConfig
    from alignment.training.orpo import ORPOConfig, ORPOTrainer
    from alignment.training.simpo import SimPOConfig, SimPOTrainer

    config_class, trainer_class = {"orpo": (ORPOConfig, ORPOTrainer), "simpo": (SimPOConfig, SimPOTrainer)}[method]
    torch.manual_seed(0)
    model, tokenizer = load_model(ModelSpec(model_dir))
    model = apply_adapter(model, AdapterConfig(method="lora", r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # a trained-looking adapter, so that its gradients are all non-zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    dataset = Dataset.from_dict({key: [pair[i] for pair in PAIRS] for i, key in enumerate(("prompt", "chosen",
                                                                                             "rejected"))})
    config = config_class(output_dir=str(out), use_cpu=True, bf16=False, report_to="none", max_length=64,
                          per_device_train_batch_size=len(PAIRS), prefix_sharing=prefix_sharing, **settings)
    return trainer_class(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.parametrize(("method", "settings"), [
    ("orpo", {}),
    ("simpo", {}),
    ("simpo", {"cpo_alpha": 0.5}),  # CPO-SimPO: an NLL term on the chosen
    ("simpo", {"loss_type": "alphapo", "alpha": 0.3}),
])
def test_packed_pairs_give_trls_loss_metrics_and_gradients(method, settings, tmp_path):
    model_dir = tiny_model(tmp_path)
    results = {}
    for packed in (True, False):
        trainer = trainer_for(method, model_dir, tmp_path / str(packed), packed, settings)
        assert trainer._packed is packed
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
        assert ("prefloop_packed" in batch) is packed
        trainer.model.train()
        loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch, train_eval="train")
        loss.backward()
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
        results[packed] = (loss.detach(), metrics, grads)
    (loss, metrics, grads), (trl_loss, trl_metrics, trl_grads) = results[True], results[False]
    assert torch.allclose(loss, trl_loss, atol=1e-5), (loss, trl_loss)
    compared = [key for key in trl_metrics if not key.startswith("logits/")]
    assert {"rewards/margins", "nll_loss"} <= set(compared) and set(metrics) == set(trl_metrics)
    for key in compared:
        assert metrics[key] == pytest.approx(trl_metrics[key], rel=1e-4, abs=1e-5), key
    assert grads.keys() == trl_grads.keys() and grads
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(grad, trl_grads[name], atol=1e-5, rtol=1e-4), name


def test_a_batch_whose_prompts_differ_between_rows_goes_through_trl(tmp_path):
    from alignment.training.reference_free import split_at_labels

    row = {"chosen_input_ids": [1, 2, 3, 4], "chosen_labels": [-100, -100, 3, 4],
           "rejected_input_ids": [1, 2, 5], "rejected_labels": [-100, -100, 5]}
    assert split_at_labels(row) == ([1, 2], [3, 4], [5])
    assert split_at_labels({**row, "rejected_input_ids": [1, 9, 5]}) is None  # the prompt tokenized otherwise
    assert split_at_labels({**row, "rejected_labels": [-100, -100, -100]}) is None  # nothing to score
    trainer = trainer_for("simpo", tiny_model(tmp_path), tmp_path / "out", True, {})
    examples = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    examples[1] = {**examples[1], "rejected_labels": [-100] * len(examples[1]["rejected_labels"])}
    assert "prefloop_packed" not in trainer.data_collator(examples)
