"""`prefloop export model NAME --out DIR [--merge]`: a stored policy as a peft adapter naming its base,
or merged into one standalone model; either loads with plain transformers/peft and gives the
logits prefloop itself gives for the policy; the model card lists the lineage from the store;
bad input is one line and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignment.model_export import export_policy
from alignment.models import ModelError, ModelSpec, PolicyPool
from alignment.training import runs
from feedback_store.db import engine_for, upgrade
from tests.train_helpers import tiny_model

PROBE = torch.tensor([[4, 20, 30, 40, 5, 50, 60]])
SNAPSHOT = "ab" * 32
TOL = {"atol": 1e-5, "rtol": 1e-5}  # float32 throughout: adapter vs pool is the same computation
MERGED_TOL = {"atol": 1e-4, "rtol": 1e-4}  # merged weights: W + BA summed once, in another order


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("models"))


def _lora_adapter(model_dir: str, path: Path, seed: int) -> str:
    """A LoRA adapter with random (non-zero) B, saved the way training saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignment.models import save_adapter

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    save_adapter(model, path)
    return str(path)


def _lm_head_adapter(model_dir: str, path: Path) -> str:
    from transformers import AutoModelForCausalLM

    from alignment.models import AdapterConfig, apply_adapter, save_adapter

    torch.manual_seed(3)
    model = apply_adapter(AutoModelForCausalLM.from_pretrained(model_dir), AdapterConfig(method="lm_head"))
    with torch.no_grad():
        model.get_output_embeddings().weight.add_(torch.randn_like(model.get_output_embeddings().weight))
    save_adapter(model, path)
    return str(path)


def _register(engine, name, model_dir, adapter_path, parent, method="dpo"):
    run_id = runs.start_run(engine, kind=method, config={"data": "store"}, seed=7, base_model=model_dir,
                            snapshot_ids={"comparison_ids": [1, 2, 3]}, snapshot_hash=SNAPSHOT)
    runs.finish_run(engine, run_id, metrics={"final_loss": 0.5}, output_path=adapter_path)
    runs.register_policy(engine, run_id, name=name, base_model=model_dir, adapter_path=adapter_path,
                         parent_name=parent)
    return run_id


@pytest.fixture
def store(sqlite_url, model_dir, tmp_path):
    """A chain base -> sft-1 -> dpo-2 (LoRA adapters on the tiny base) and an lm_head policy."""
    engine = engine_for(sqlite_url)
    _register(engine, "sft-1", model_dir, _lora_adapter(model_dir, tmp_path / "a1", 1), model_dir, "sft")
    _register(engine, "dpo-2", model_dir, _lora_adapter(model_dir, tmp_path / "a2", 2), "sft-1")
    _register(engine, "head-3", model_dir, _lm_head_adapter(model_dir, tmp_path / "a3"), model_dir, "kto")
    return engine


def prefloop_logits(engine, name):
    """The policy as `prefloop generate` loads it: a PolicyPool on its base, the adapter by name."""
    policy = runs.find_policy(engine, name)
    pool = PolicyPool.load(ModelSpec(policy.base_model, quantize="none"))
    pool.add(policy.name, policy.adapter_path)
    with pool.use(policy.name) as model, torch.no_grad():
        return model(input_ids=PROBE).logits.float()


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=PROBE).logits.float()


def _card_names_lineage(out: Path, model_dir: str):
    card = (out / "README.md").read_text()
    for name in (model_dir, "sft-1", "dpo-2"):
        assert f"| {name} |" in card
    assert card.index("| sft-1 |") < card.index("| dpo-2 |")  # root first
    assert SNAPSHOT in card and "| dpo |" in card and "| sft |" in card
    commit = runs.git_commit()
    if commit:
        assert commit in card
    return card


def test_adapter_export_loads_with_peft_and_gives_the_policy(store, model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "exports" / "dpo-2"  # its parent folder does not exist yet
    result = export_policy(store, "dpo-2", out)
    assert result.kind == "adapter" and {"adapter_config.json", "adapter_model.safetensors", "README.md",
                                         "tokenizer_config.json"} <= set(result.files)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(model_dir))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), out)
    torch.testing.assert_close(_logits(model), prefloop_logits(store, "dpo-2"), **TOL)
    assert AutoTokenizer.from_pretrained(out).chat_template
    card = _card_names_lineage(out, model_dir)
    assert "library_name: peft" in card and "--max-lora-rank 8 --lora-modules dpo-2=DIR" in card
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_merged_export_is_a_plain_model_giving_the_policy(store, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    result = export_policy(store, "dpo-2", out, merge=True)
    assert result.kind == "merged" and "adapter_config.json" not in result.files
    assert "model.safetensors" in result.files and "tokenizer_config.json" in result.files
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(model, "peft_config") and model.dtype == torch.float32
    expected = prefloop_logits(store, "dpo-2")
    torch.testing.assert_close(_logits(model), expected, **MERGED_TOL)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.allclose(_logits(base), expected, atol=1e-3)  # the adapter did change something
    assert "library_name: transformers" in _card_names_lineage(out, model_dir)

    # An lm_head-only adapter has no peft format: merged only.
    head = export_policy(store, "head-3", tmp_path / "head", merge=True)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(head.out)),
                               prefloop_logits(store, "head-3"), **MERGED_TOL)
    # --dtype bfloat16 halves the weights.
    half = export_policy(store, "dpo-2", tmp_path / "half", merge=True, dtype="bfloat16")
    assert AutoModelForCausalLM.from_pretrained(half.out).dtype == torch.bfloat16


def test_cli(store, sqlite_url, tmp_path, capsys):
    from labeling.cli import main

    assert main(["export", "model", "latest", "--out", str(tmp_path / "l"), "--db", sqlite_url, "--merge"]) == 0
    assert "wrote policy head-3 as a merged model" in capsys.readouterr().out
    assert main(["export", "model", "sft-1", "--out", str(tmp_path / "s"), "--db", sqlite_url]) == 0
    assert "wrote policy sft-1 as an adapter" in capsys.readouterr().out
    assert (tmp_path / "s" / "adapter_config.json").is_file()
    # dataset exports are as before, and refuse the model-only arguments
    assert main(["export", "dpo", "sft-1", "--out", str(tmp_path / "d.jsonl"), "--db", sqlite_url]) == 2
    assert "only `export model NAME` takes a name" in capsys.readouterr().err
    assert main(["export", "dpo", "--merge", "--out", str(tmp_path / "d.jsonl"), "--db", sqlite_url]) == 2
    assert main(["export", "model", "--out", str(tmp_path / "m"), "--db", sqlite_url]) == 2
    assert "name the policy to export" in capsys.readouterr().err
    assert not (tmp_path / "d.jsonl").exists() and not (tmp_path / "m").exists()


def _quantized_only_base(tmp_path: Path, model_dir: str) -> str:
    """A base directory whose config says its weights are stored 4-bit (a *-bnb-4bit checkpoint)."""
    import shutil

    path = tmp_path / "base-bnb-4bit"
    shutil.copytree(model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4"}
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_bad_input_is_one_line_and_writes_nothing(store, model_dir, sqlite_url, tmp_path, capsys):
    from labeling.cli import main

    quantized = _quantized_only_base(tmp_path, model_dir)
    _register(store, "q-4", quantized, _lora_adapter(model_dir, tmp_path / "a4", 4), quantized)
    _register(store, "gone-5", model_dir, str(tmp_path / "deleted-adapter"), "sft-1")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")

    exports = tmp_path / "exports"
    capsys.readouterr()  # the set-up's loading bars
    cases = [
        (["dpo2"], "no policy named 'dpo2' (closest: dpo-2"),
        (["q-4", "--merge"], "is stored bitsandbytes 4-bit only; --merge needs its full-precision weights"),
        (["gone-5"], f"its adapter directory {tmp_path / 'deleted-adapter'} is missing on disk"),
        (["head-3"], "is an lm_head-only adapter (no peft format): export it with --merge"),
        ([model_dir], "not an adapter: export it with --merge"),
    ]
    for argv, message in cases:
        assert main(["export", "model", *argv, "--out", str(exports / "x"), "--db", sqlite_url]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
        assert not exports.exists(), argv
    assert main(["export", "model", "dpo-2", "--out", str(busy), "--db", sqlite_url]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    upgrade(empty)
    with pytest.raises(ModelError, match="no trained policy yet"):
        export_policy(engine_for(empty), "latest", tmp_path / "e")
    assert not (tmp_path / "e").exists()

    # The adapter of the quantized-only base still exports without --merge; an empty DIR is fine.
    (tmp_path / "empty").mkdir()
    assert main(["export", "model", "q-4", "--out", str(tmp_path / "empty"), "--db", sqlite_url]) == 0
    assert json.loads((tmp_path / "empty" / "adapter_config.json").read_text())["base_model_name_or_path"] == quantized


def test_a_failure_while_writing_leaves_nothing(store, tmp_path, monkeypatch):
    from alignment import model_export

    def broken(plan, tmp, dtype):
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(model_export, "_write_merged", broken)
    out = tmp_path / "new" / "deeper" / "m"
    with pytest.raises(RuntimeError, match="disk full"):
        export_policy(store, "dpo-2", out, merge=True)
    assert not (tmp_path / "new").exists()


def test_a_trained_chain_exports_as_it_generates(sqlite_url, model_dir, tmp_path):
    """sft -> dpo --from-policy, trained for real: the dpo policy's adapter is the parent's and its own
    joined along the rank; exported both ways it is the model prefloop samples from."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from alignment.training.job import TrainRequest, run_training
    from tests.train_helpers import preference_store

    engine = preference_store(sqlite_url, n_prompts=6, ratings=False)
    fast = {"max_steps": 2, "save_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 5e-2}
    results = []
    for method, parent in (("sft", None), ("dpo", "latest")):
        run = {"runs_dir": str(tmp_path / "runs"), **({"from_policy": parent} if parent else {})}
        results.append(run_training(TrainRequest(method, model=model_dir,
                                                 overrides=[{"trainer": fast, "run": run}]),
                                    engine=engine, progress=False))
    name = results[-1].policy_name
    adapter = export_policy(engine, name, tmp_path / "adapter")
    merged = export_policy(engine, name, tmp_path / "merged", merge=True)
    expected = prefloop_logits(engine, name)
    assert not torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(model_dir)), expected, atol=1e-4)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter.out)
    torch.testing.assert_close(_logits(peft), expected, **TOL)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(merged.out)), expected, **MERGED_TOL)
    card = (merged.out / "README.md").read_text()
    assert f"| {results[0].policy_name} | sft | {results[0].run_id} | done |" in card
    assert f"| {name} | dpo | {results[1].run_id} | done |" in card
    assert card.index(f"| {results[0].policy_name} |") < card.index(f"| {name} |")
