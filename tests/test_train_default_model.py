"""DPO on the embedded default model (SmolLM2-135M-Instruct), two steps through `prefloop train`."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from alignment.models.default_model import is_converted
from alignment.training.runs import get_run
from feedback_store.models import RunStatus
from labeling.cli import main
from tests.train_helpers import preference_store


@pytest.fixture(scope="module")
def default_model_cache(tmp_path_factory):
    """The user's converted cache when there is one; otherwise one conversion into a temporary cache."""
    with pytest.MonkeyPatch.context() as patch:
        if not is_converted():
            patch.setenv("PREFLOOP_CACHE_DIR", str(tmp_path_factory.mktemp("prefloop-cache")))
        yield


@pytest.mark.slow
def test_dpo_on_the_default_model(default_model_cache, sqlite_url, tmp_path, capsys):
    engine = preference_store(sqlite_url, n_prompts=8)
    code = main(["train", "dpo", "--db", sqlite_url, "--max-steps", "2", "--batch-size", "2", "--max-length", "96",
                 "--output-dir", str(tmp_path / "run"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    run = get_run(engine, 1)
    assert run.status == RunStatus.done and run.base_model == "default" and run.metrics["global_step"] == 2
    tensors = load_file(str(Path(run.output_path) / "adapter_model.safetensors"))
    assert any("q_proj.lora_B" in name and t.abs().sum() > 0 for name, t in tensors.items())
    assert "registered policy 'dpo-1'" in out
