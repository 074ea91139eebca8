"""What ORPO and SimPO share: TRL's experimental pairwise trainers (`trl.experimental.orpo`,
`trl.experimental.cpo`), which need no reference model, on the same preference pairs as DPO.

- TRL warns on every first import of `trl.experimental`; prefloop chose these trainers on purpose,
  so that one warning is silenced here (and only that one).
- Their tokenized rows hold `chosen_input_ids` / `rejected_input_ids`, not the `input_ids` that
  length-grouped sampling measures: a `length` column (prompt + both completions, the compute of
  a pair) is added after TRL's tokenization, so `train_sampling_strategy: group_by_length` (the
  seed-qlora preset) works as it does for DPO.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

# the export both read: the store's decided pairs (the same rows as DPO)
EXPORT = "dpo"
REQUIRED_COLUMNS = (("prompt", "chosen", "rejected"), ("chosen", "rejected"))


def experimental(name: str) -> ModuleType:
    """`trl.experimental.NAME`, without TRL's notice that experimental APIs may change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
        return importlib.import_module(f"trl.experimental.{name}")


def pair_length(example: dict) -> dict:
    return {"length": sum(len(example.get(key) or ()) for key in
                          ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"))}


class MeasuredPairs:
    """Trainer mixin: a `length` column on the tokenized pairs when batches are grouped by length."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        dataset = self.train_dataset
        grouped = getattr(self.args, "train_sampling_strategy", None) == "group_by_length"
        if grouped and dataset is not None and "length" not in dataset.column_names:
            self.train_dataset = dataset.map(pair_length, desc="Measuring pairs")
