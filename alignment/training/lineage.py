"""Training from a stored policy (`--from-policy NAME|latest`): the run starts where that policy
is, its reference is that policy, and what it saves is one policy that loads on its own.

    start = resolve_start(engine, "latest", model="default", method="dpo", adapter_method="lora",
                          quantized=False)             # a TrainingError, before any row, if it cannot be
    model = start_model(base, start, quantized=False)  # the parent merged in; a fresh adapter goes on top
    combine_lora(start.adapter_path, "runs/dpo-9/adapter")  # parent + new LoRA as one adapter, in place
    runs.lineage(engine, "dpo-9")                      # the policies it grew from, root first

Design. prefloop's reference is "the trainable adapter switched off" everywhere (the packed DPO
path, TRL's KTO, PPO's KL): no second model, no LoRA matmuls in reference passes. A run from a
policy keeps that, by making "adapter off" *be* the parent:

- Unquantized base (CPU default, `--quantize none` on GPU): the parent's adapter is merged into
  the in-memory weights (peft's `merge_and_unload`; an lm_head adapter's weights are simply put
  in place), then the run's own fresh adapter goes on top. Adapter off = the parent, exactly;
  DPO/KTO/PPO are unchanged, as fast and as small as a run from the base.
- Quantized base (4-bit/8-bit): merging into quantized weights would requantize W + BA, and a
  LoRA update is mostly smaller than an nf4 step: the parent's change would largely round away
  and the reference would silently be (almost) the bare base. So the run instead continues the
  parent's LoRA adapter itself, and a frozen copy of it, the adapter "ref", is the reference:
  TRL's DPO/KTO make that copy of an adapter they are handed and use it for their reference
  passes (the packed DPO path reads it too), and PPO's reference pass uses it when present. Cost:
  one more adapter's matrices in memory and the LoRA matmuls in reference passes, only for runs
  from a policy on a quantized base; the run's r/alpha are the parent's (a note says so).

What is saved is always one artifact of a kind every loader already reads (`load_model`,
`PolicyPool`, `generate`, the app), so none of them knows about lineage:
- LoRA on a LoRA parent (unquantized): the two adapters concatenated along the rank,
  A = [A_parent; A_child], B = [s_p B_parent, s_c B_child], alpha = r: W + s_p B_p A_p + s_c B_c A_c
  is exactly the model trained (up to float rounding). The rank grows by the run's r per
  generation, which at LoRA sizes is cheap next to keeping a chain to replay at every load;
- quantized: the continued adapter (same rank as the parent);
- full fine-tuning: the whole model with the parent merged in;
- a parent that is a full fine-tune is itself the base the new adapter goes on.
Combinations that cannot be one adapter (a DoRA or lm_head parent under a new LoRA, a DoRA or
lm_head run on an adapter parent) are refused before anything is recorded; `--adapter full`
takes any parent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine

from alignment.training.common import TrainingError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
REFERENCE_ADAPTER = "ref"  # TRL's name for the frozen copy of a loaded adapter


@dataclass(frozen=True)
class StartPoint:
    """The policy a run starts from, and how to rebuild it in memory."""

    name: str
    policy_id: int
    root_model: str  # the base model it grew from: the run's --model must be this one
    model: str  # what to load: the root, or a full fine-tune's saved directory
    adapter_path: str | None  # the policy's adapter on `model` (None: `model` is the policy)
    adapter_kind: str | None  # "peft" or "lm_head"
    lora: bool  # the adapter is a plain LoRA (combinable with a new one)


def resolve_start(engine: Engine, name: str, *, model: str, method: str, adapter_method: str,
                  quantized: bool) -> StartPoint:
    """Check that a run of `method` on `model` can start from policy `name` (or "latest") and
    say how; a TrainingError naming what is wrong otherwise. Reads only: nothing is recorded."""
    from alignment.models.adapters import adapter_kind
    from alignment.models.errors import ModelError
    from alignment.models.loading import resolve_model_path
    from alignment.training import runs

    if method == "reward":
        raise TrainingError("--from-policy: a reward model starts from a base model, not from a policy")
    try:
        policy = runs.find_policy(engine, name)
    except LookupError as error:
        raise TrainingError(f"--from-policy {name}: {error}") from None
    run = runs.get_run(engine, policy.training_run_id) if policy.training_run_id else None
    root = run.base_model if run is not None and run.base_model else policy.base_model
    if not same_model(root, model):
        raise TrainingError(f"--from-policy {name}: policy {policy.name!r} was trained on base model {root!r}, "
                            f"this run is on {model!r} (pass --model {root}, or name a policy of {model!r})")
    try:
        resolve_model_path(policy.base_model)
        kind = adapter_kind(policy.adapter_path) if policy.adapter_path else None
    except ModelError as error:
        raise TrainingError(f"--from-policy {name}: policy {policy.name!r} cannot be loaded here: {error}") from None
    if kind == "model":  # registered as an adapter, saved as a whole model: load it as the base
        start = StartPoint(policy.name, policy.id, root, policy.adapter_path, None, None, False)
    else:
        lora = kind == "peft" and lora_problem(policy.adapter_path) is None
        start = StartPoint(policy.name, policy.id, root, policy.base_model, policy.adapter_path, kind, lora)
    _check_combination(start, adapter_method=adapter_method, quantized=quantized)
    return start


def _check_combination(start: StartPoint, *, adapter_method: str, quantized: bool) -> None:
    if start.adapter_path is None:
        return  # the parent is a base or a full model: any adapter goes on it
    what = f"--from-policy {start.name}: policy {start.name!r} is "
    if quantized:
        if not (start.adapter_kind == "peft" and adapter_method in ("lora", "dora")):
            raise TrainingError(what + f"a {start.adapter_kind} adapter and the base is quantized: a run from it "
                                "continues its LoRA/DoRA adapter (use --quantize none to train any other way)")
        return
    if adapter_method == "full":
        return  # the parent is merged into the weights the run trains and saves
    if adapter_method != "lora":
        raise TrainingError(what + f"an adapter: a {adapter_method} run on it could not be saved as one policy "
                            "(use --adapter lora or full)")
    if not start.lora:
        problem = lora_problem(start.adapter_path) if start.adapter_kind == "peft" else "an lm_head adapter"
        raise TrainingError(what + f"{problem}: a new LoRA on it could not be saved as one adapter "
                            "(use --adapter full)")


def same_model(a: str, b: str) -> bool:
    from alignment.models.spec import DEFAULT_MODEL_ALIASES

    if a in DEFAULT_MODEL_ALIASES or b in DEFAULT_MODEL_ALIASES:
        return a in DEFAULT_MODEL_ALIASES and b in DEFAULT_MODEL_ALIASES
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() or pb.exists():
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
    return a == b


# --------------------------------------------------------------------------- the model


def start_model(model, start: StartPoint, *, quantized: bool, gradient_checkpointing: bool = False):
    """`model` (loaded from start.model) turned into the parent policy: merged in when the
    weights are not quantized, else carrying the parent's adapter, trainable, to continue."""
    from alignment.models.adapters import load_adapter

    if start.adapter_path is None:
        return model
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        return load_adapter(model, start.adapter_path, trainable=True)
    model = load_adapter(model, start.adapter_path)  # an lm_head adapter is in place already
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.requires_grad_(False)
    model.prefloop_merged_parent = start.name  # not the base's weights any more (shared_reward.py reads it)
    return model


def continues_parent(start: StartPoint | None, quantized: bool) -> bool:
    """True when the trainable adapter is the parent's own (quantized base): its frozen copy is the reference."""
    return start is not None and start.adapter_path is not None and quantized


def add_reference_copy(model) -> None:
    """A frozen copy of the active adapter under REFERENCE_ADAPTER, as TRL's DPO/KTO make one
    (for trainers that do not: PPO)."""
    if REFERENCE_ADAPTER in model.peft_config:
        return
    active = model.active_adapter
    model.add_adapter(REFERENCE_ADAPTER, model.peft_config[active])
    params = dict(model.named_parameters())
    for name, param in params.items():
        if f".{active}." in name:
            copy = params[name.replace(f".{active}.", f".{REFERENCE_ADAPTER}.")]
            copy.data.copy_(param.data)
            copy.requires_grad_(False)
    model.set_adapter(active)


def match_reference_dtype(model) -> None:
    """Give the frozen copy the dtype of the adapter it copies (trainers cast only the trainable one)."""
    params = dict(model.named_parameters())
    for name, param in params.items():
        if f".{REFERENCE_ADAPTER}." in name:
            own = params.get(name.replace(f".{REFERENCE_ADAPTER}.", f".{model.active_adapter}."))
            if own is not None and own.dtype != param.dtype:
                param.data = param.data.to(own.dtype)


def reference_adapter(model) -> str | None:
    """The adapter a reference pass uses: the frozen parent copy if any, else none (adapters off)."""
    return REFERENCE_ADAPTER if REFERENCE_ADAPTER in getattr(model, "peft_config", {}) else None


# --------------------------------------------------------------------------- saving


def lora_problem(path: str | Path) -> str | None:
    """Why the peft adapter at `path` is not a plain LoRA that rank concatenation can combine (None if it is)."""
    config = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    checks = (
        (config.get("peft_type") != "LORA", f"a {config.get('peft_type')} adapter"),
        (bool(config.get("use_dora")), "a DoRA adapter"),
        (config.get("bias", "none") != "none" or bool(config.get("lora_bias")), "a LoRA with biases"),
        (bool(config.get("modules_to_save")), "a LoRA with fully trained modules"),
        (bool(config.get("target_parameters")), "a LoRA on fused expert weights"),
        (bool(config.get("rank_pattern")) or bool(config.get("alpha_pattern")), "a LoRA with per-layer ranks"),
        (bool(config.get("trainable_token_indices")) or bool(config.get("layer_replication")),
         "a LoRA with extra trained parts"),
    )
    return next((why for bad, why in checks if bad), None)


def _scaling(config: dict) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / r ** 0.5 if config.get("use_rslora") else alpha / r


def combine_lora(parent: str | Path, child: str | Path) -> None:
    """Rewrite the LoRA adapter at `child` (trained on top of `parent` merged into the weights)
    as one adapter on the bare weights: W + s_p B_p A_p + s_c B_c A_c, rank r_p + r_c."""
    import torch
    from safetensors.torch import load_file, save_file

    parent, child = Path(parent), Path(child)
    for path in (parent, child):
        problem = lora_problem(path)
        if problem:
            raise TrainingError(f"{path}: {problem} cannot be combined into one LoRA")
    configs = [json.loads((p / ADAPTER_CONFIG).read_text()) for p in (parent, child)]
    if configs[0].get("fan_in_fan_out") != configs[1].get("fan_in_fan_out"):
        raise TrainingError(f"{parent} and {child}: LoRA layouts differ (fan_in_fan_out)")
    tensors = [load_file(str(p / ADAPTER_WEIGHTS)) for p in (parent, child)]
    ranks = [c["r"] for c in configs]
    scales = [_scaling(c) for c in configs]
    rank = sum(ranks)

    modules = sorted({k.rsplit(".lora_", 1)[0] for t in tensors for k in t if ".lora_A." in k})
    combined = {}
    for module in modules:
        a_parts, b_parts = [], []
        for part, r, s in zip(tensors, ranks, scales):
            a, b = part.get(f"{module}.lora_A.weight"), part.get(f"{module}.lora_B.weight")
            if a is None:  # a layer only the other adapter adapts: a zero block of its rank
                other = next(t for t in tensors if f"{module}.lora_A.weight" in t)
                a = other[f"{module}.lora_A.weight"].new_zeros((r, other[f"{module}.lora_A.weight"].shape[1]))
                b = other[f"{module}.lora_B.weight"].new_zeros((other[f"{module}.lora_B.weight"].shape[0], r))
            a_parts.append(a.float())
            b_parts.append(b.float() * s)  # the scaling moves into B, so the combined alpha = r
        dtype = tensors[1].get(f"{module}.lora_A.weight", a_parts[0]).dtype
        combined[f"{module}.lora_A.weight"] = torch.cat(a_parts, 0).to(dtype).contiguous()
        combined[f"{module}.lora_B.weight"] = torch.cat(b_parts, 1).to(dtype).contiguous()
    config = dict(configs[1])
    targets = set(configs[0].get("target_modules") or []) | set(configs[1].get("target_modules") or [])
    config.update(r=rank, lora_alpha=rank, use_rslora=False, target_modules=sorted(targets),
                  exclude_modules=_union(configs, "exclude_modules"))
    save_file(combined, str(child / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (child / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))


def _union(configs: list[dict], key: str):
    values = [c.get(key) for c in configs]
    if all(v is None for v in values):
        return None
    items = set()
    for value in values:
        items |= {value} if isinstance(value, str) else set(value or [])
    return sorted(items)
