"""Adapters: LoRA, DoRA, full fine-tuning and lm_head-only, with target modules found per architecture.

    targets = find_targets(model)          # Targets(modules=[...], parameters=[...], heads=[...])
    target_modules_for(model)              # just the Linear-layer name suffixes, e.g. q_proj ... down_proj
    model = apply_adapter(model, AdapterConfig(method="lora", r=64, alpha=16, dropout=0.1))
    save_adapter(model, "runs/7/adapter")  # peft dir, lm_head file, or a full model, by what was trained
    model = load_adapter(base, "runs/7/adapter")   # ModelError if it does not fit the base

Targets come from the model's own modules, never from its name:
- every Linear (or GPT-2 Conv1D) layer inside the backbone that a training forward calls as a
  module, by leaf name: q/k/v/o/gate/up/down on Llama/Mistral/Qwen, query/key/value/dense on
  BERT/DeBERTa/CamemBERT, q/k/v/o/wi/wo on T5. A four-token probe drops layers whose weight a
  block reads directly, where a LoRA would silently do nothing: transformers' Mamba mixer
  multiplies by dt_proj.weight itself (and, with the mamba-ssm CUDA kernels, hands x_proj and
  out_proj weights to the fused scan too), and peft refuses Mamba's out_proj, so Mamba gets
  in_proj + x_proj here; Jamba gets in/x/out_proj beside attention and its dense MLPs;
- Mixture-of-Experts blocks whose experts are fused 3-D parameters (Mixtral, Jamba, Qwen-MoE in
  transformers 5) and routers that are bare weight matrices: as peft `target_parameters`.
  peft's parameter wrapper supports neither dropout nor DoRA, so with dropout > 0 or DoRA the
  experts and router stay frozen (a warning says so) and only the Linear layers are adapted;
- task heads outside the backbone (a reward model's `score`/`classifier`, DeBERTa's pooler) are
  trained in full (`modules_to_save`); the LM output layer is never a LoRA target.

"lm_head only" trains the output layer alone. When it is tied to the input embeddings (SmolLM2),
it is untied first so that the embeddings stay frozen.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from alignment.models.errors import ModelError
from alignment.models.quantization import is_quantized, keep_4bit_trainable

log = logging.getLogger(__name__)

Method = Literal["lora", "dora", "full", "lm_head"]
METHODS = ("lora", "dora", "full", "lm_head")
LM_HEAD_FILE = "lm_head.safetensors"
LM_HEAD_MANIFEST = "prefloop_adapter.json"
PEFT_MANIFEST = "adapter_config.json"
# Attributes under which configs give the number of experts of a MoE layer.
_EXPERT_COUNT_ATTRS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass
class AdapterConfig:
    """How to make a model trainable. Defaults: the seed's QLoRA recipe (r=64, alpha=16, dropout 0.1)."""

    method: Method = field(default="lora", metadata={"help": "lora, dora, full or lm_head"})
    r: int = field(default=64, metadata={"help": "LoRA rank"})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r)"})
    dropout: float = field(default=0.1, metadata={"help": "LoRA dropout"})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Linear layer names to adapt (default: detected per architecture)"}
    )
    target_parameters: list[str] | None = field(
        default=None, metadata={"help": "fused parameters to adapt, e.g. experts.gate_up_proj (default: detected)"}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for activation memory"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ModelError(f"adapter method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.method in ("lora", "dora") and self.r <= 0:
            raise ModelError(f"LoRA rank r={self.r}: must be positive")
        if not 0 <= self.dropout < 1:
            raise ModelError(f"LoRA dropout {self.dropout}: must be in [0, 1)")


@dataclass(frozen=True)
class Targets:
    modules: list[str]  # leaf names of Linear layers in the backbone
    parameters: list[str]  # "<module leaf>.<param>" of fused expert weights and bare routers
    heads: list[str]  # top-level task heads trained in full (reward/classification heads)
    excluded: list[str]  # full names of Linear layers outside the backbone that share a target's leaf name


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)  # bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _backbone(model) -> nn.Module:
    backbone = getattr(model, "base_model", model)
    return backbone if isinstance(backbone, nn.Module) else model


def _expert_count(model) -> int | None:
    config = getattr(model, "config", None)
    for source in (config, getattr(config, "text_config", None)):
        for name in _EXPERT_COUNT_ATTRS:
            value = getattr(source, name, None)
            if isinstance(value, int) and value > 1:
                return value
    return None


def find_targets(model) -> Targets:
    """What an adapter should train in this model, read off its modules and config."""
    model = _unwrap(model)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = _backbone(model)
    inside = {id(m) for m in backbone.modules()} if backbone is not model else None
    linear = _linear_types()

    modules: set[str] = set()
    outside_linear: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, linear) or module is output:
            continue
        if inside is None or id(module) in inside:
            modules.add(name.rsplit(".", 1)[-1])
        else:
            outside_linear.append(name)

    heads = []
    if inside is not None:
        for name, child in model.named_children():
            if child is backbone or child is output or not any(True for _ in child.parameters()):
                continue
            heads.append(name)

    parameters: set[str] = set()
    n_experts = _expert_count(model)
    if n_experts:
        hidden = getattr(model.config, "hidden_size", None)
        for name, module in backbone.named_modules():
            if isinstance(module, (linear, nn.Embedding)) or not name:
                continue
            leaf = name.rsplit(".", 1)[-1]
            own = dict(module.named_parameters(recurse=False))
            for param_name, param in own.items():
                if param.ndim == 3 and param.shape[0] == n_experts:  # fused experts
                    parameters.add(f"{leaf}.{param_name}")
            weight = own.get("weight")
            has_children = any(True for _ in module.children())
            if (  # a router: a bare (n_experts, hidden) matrix applied with F.linear
                len(own) == 1 and weight is not None and weight.ndim == 2 and not has_children
                and weight.shape[0] == n_experts and (hidden is None or weight.shape[1] == hidden)
            ):
                parameters.add(f"{leaf}.weight")

    called = _linear_leaves_called(model, backbone, linear)
    modules = {name for name in modules if _peft_accepts(model, name) and (called is None or name in called)}
    if not modules and not parameters:
        raise ModelError(f"{type(model).__name__}: found no Linear layers to adapt; pass target_modules explicitly")
    # peft matches target names by suffix: keep LoRA out of heads (trained in full) and other
    # layers outside the backbone that happen to share a leaf name (DeBERTa's pooler.dense).
    excluded = sorted(n for n in outside_linear if n.rsplit(".", 1)[-1] in modules)
    return Targets(sorted(modules), sorted(parameters), heads, excluded)


def _linear_leaves_called(model, backbone: nn.Module, linear: tuple[type, ...]) -> set[str] | None:
    """Leaf names of the Linear layers a training-mode forward actually calls as modules.

    Some blocks read a layer's weight directly instead of calling it (transformers' Mamba mixer
    passes x_proj/dt_proj/out_proj weights to its fused selective-scan function), so a LoRA
    wrapped around such a layer would never act. A four-token probe finds them, whatever the
    architecture. None if the probe cannot run (a model that needs other inputs): no filtering."""
    seen: set[str] = set()
    hooks = [
        module.register_forward_hook(lambda m, i, o, leaf=name.rsplit(".", 1)[-1]: seen.add(leaf))
        for name, module in backbone.named_modules()
        if isinstance(module, linear)
    ]
    vocab = getattr(model.config, "vocab_size", None) or 8
    device = next(model.parameters()).device
    ids = (torch.arange(1, 5, device=device) % vocab).unsqueeze(0)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    was_training = model.training
    # fork_rng: the probe's dropout must not shift the random stream a seeded run relies on
    try:
        model.train()
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model(**inputs)
    except Exception:  # the probe is an optimisation of the target list, never a failure
        return None
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return seen


def _peft_accepts(model, leaf: str) -> bool:
    """peft refuses some layers per architecture: Mamba's out_proj, whose weight the fused
    selective-scan kernel reads directly (a LoRA on it would be silently bypassed)."""
    try:
        from peft import LoraConfig
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba
    except ImportError:  # a peft without the check accepts everything
        return True
    try:
        _check_lora_target_modules_mamba(LoraConfig(), model, leaf)
    except ValueError:
        return False
    return True


def target_modules_for(model) -> list[str]:
    """The Linear-layer leaf names that LoRA targets in this model (e.g. q_proj, ..., down_proj)."""
    return find_targets(model).modules


def _task_type(model) -> str | None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if getattr(model.config, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    if type(model).__name__ in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values():
        return "SEQ_CLS"
    if hasattr(model, "can_generate") and model.can_generate():
        return "CAUSAL_LM"
    return None


def _enable_checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.24+; the old name warns, goes in v6
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def apply_adapter(model, cfg: AdapterConfig):
    """Make `model` trainable as `cfg` says; returns the model to train (a PeftModel for LoRA/DoRA)."""
    keep_4bit_trainable(model)
    if cfg.method == "full":
        if is_quantized(model):
            raise ModelError("full fine-tuning needs an unquantized model: load it with quantize=none")
        model.requires_grad_(True)
        if cfg.gradient_checkpointing:
            _enable_checkpointing(model)
        return model
    if cfg.method == "lm_head":
        head = untie_output_embeddings(model)
        model.requires_grad_(False)
        head.requires_grad_(True)
        return model
    return _apply_lora(model, cfg)


def _apply_lora(model, cfg: AdapterConfig):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = find_targets(model)
    modules = cfg.target_modules if cfg.target_modules is not None else targets.modules
    parameters = cfg.target_parameters if cfg.target_parameters is not None else targets.parameters
    if parameters and (cfg.dropout > 0 or cfg.method == "dora"):
        if cfg.target_parameters:
            raise ModelError("target_parameters (fused MoE experts) need method=lora and dropout=0 (a peft limit)")
        log.warning(
            "MoE experts/router (%s) stay frozen: peft adapts fused expert weights only with "
            "method=lora and dropout=0", ", ".join(parameters)
        )
        parameters = []
    if is_quantized(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(modules),
        target_parameters=list(parameters) or None,
        exclude_modules=targets.excluded or None,
        modules_to_save=targets.heads or None,
        use_dora=cfg.method == "dora",
        task_type=_task_type(_unwrap(model)),
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as error:
        raise ModelError(f"cannot attach {cfg.method} to {type(model).__name__}: {str(error).splitlines()[0]}") from None


def untie_output_embeddings(model) -> nn.Module:
    """The output layer, given its own weight if it shared the input embeddings' (so training
    it leaves the embeddings alone)."""
    base = _unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        raise ModelError(f"{type(base).__name__} has no output layer: lm_head-only needs a language model")
    embeddings = base.get_input_embeddings()
    if embeddings is not None and head.weight is embeddings.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        base.config.tie_word_embeddings = False
        text_config = getattr(base.config, "text_config", None)
        if text_config is not None and hasattr(text_config, "tie_word_embeddings"):
            text_config.tie_word_embeddings = False
    return head


def _output_module_name(model) -> str:
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


def adapter_kind(path: str | Path) -> str:
    """'peft' (LoRA/DoRA), 'lm_head', or 'model' (a full fine-tune saved as a model)."""
    path = Path(path)
    if (path / PEFT_MANIFEST).is_file():
        return "peft"
    if (path / LM_HEAD_MANIFEST).is_file():
        return "lm_head"
    if (path / "config.json").is_file():
        return "model"
    if not path.exists():
        raise ModelError(f"adapter {path}: no such directory")
    raise ModelError(f"adapter {path}: no {PEFT_MANIFEST} or {LM_HEAD_MANIFEST} in it (not a saved adapter)")


def save_adapter(model, path: str | Path) -> str:
    """Save what was trained: a peft adapter, the lm_head alone, or (full fine-tuning) the whole
    model. Returns the kind written (see `adapter_kind`)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        model.save_pretrained(path)
        return "peft"
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    head_name = _output_module_name(model) if model.get_output_embeddings() is not None else None
    head_params = {f"{head_name}.{n}" for n, _ in model.get_output_embeddings().named_parameters()} if head_name else set()
    if trainable and trainable <= head_params:
        head = model.get_output_embeddings()
        tensors = {n: p.detach().contiguous().cpu() for n, p in head.named_parameters()}
        save_file(tensors, str(path / LM_HEAD_FILE))
        manifest = {"method": "lm_head", "module": head_name, "base_model": model.config.name_or_path}
        (path / LM_HEAD_MANIFEST).write_text(json.dumps(manifest, indent=2))
        return "lm_head"
    model.save_pretrained(path)
    return "model"


def read_lm_head_adapter(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / LM_HEAD_FILE))


def set_output_weights(model, tensors: dict[str, torch.Tensor], *, source: str = "adapter") -> None:
    """Copy lm_head tensors into the (untied) output layer, checking that they fit."""
    head = untie_output_embeddings(model)
    own = dict(head.named_parameters())
    for name, tensor in tensors.items():
        if name not in own or own[name].shape != tensor.shape:
            expected = tuple(own[name].shape) if name in own else "no such parameter"
            raise ModelError(
                f"lm_head adapter {source} does not fit this base model: {name} has shape "
                f"{tuple(tensor.shape)}, the base expects {expected}"
            )
        with torch.no_grad():
            own[name].copy_(tensor.to(own[name].dtype))


def load_adapter(model, path: str | Path, *, trainable: bool = False, adapter_name: str = "default"):
    """Put the adapter saved at `path` on `model`; a ModelError if it does not fit."""
    kind = adapter_kind(path)
    if trainable:
        keep_4bit_trainable(model)
    if kind == "model":
        raise ModelError(f"{path} holds a full model, not an adapter: use it as the model instead")
    if kind == "lm_head":
        set_output_weights(model, read_lm_head_adapter(path), source=str(path))
        model.requires_grad_(False)
        model.get_output_embeddings().requires_grad_(trainable)
        return model
    from peft import PeftModel

    try:
        if hasattr(model, "peft_config"):
            model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=trainable)
            return model
        return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as error:
        raise ModelError(f"adapter {path} does not fit this base model: {_short(error)}") from None


def _short(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # torch's size-mismatch report starts with a generic line; the useful one follows it.
    detail = next((line for line in lines if "size mismatch" in line), lines[0] if lines else type(error).__name__)
    return detail[:300]
