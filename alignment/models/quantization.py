"""bitsandbytes quantization for a `ModelSpec`: none, 8-bit (LLM.int8) or 4-bit (nf4/fp4).

    config = quantization_config(spec)   # a BitsAndBytesConfig, or None for "none"
    is_quantized(model)                  # True for a model loaded in 8 or 4 bits

bitsandbytes 0.50 runs 4-bit on CPU as well as CUDA, so the same QLoRA code is tested here
on CPU and scales unchanged to a GPU.
"""

from __future__ import annotations

from transformers import BitsAndBytesConfig

from alignment.models.spec import ModelSpec, resolve_compute_dtype, resolve_quantize


def quantization_config(spec: ModelSpec) -> BitsAndBytesConfig | None:
    mode = resolve_quantize(spec)
    if mode == "none":
        return None
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quant_type,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=resolve_compute_dtype(spec),
    )


def is_quantized(model) -> bool:
    base = getattr(model, "get_base_model", lambda: model)()
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def keep_4bit_trainable(model) -> int:
    """Make 4-bit layers differentiable again on CPU, and keep them so; returns how many changed.

    bitsandbytes 0.50 repacks a 4-bit weight for a faster CPU kernel the first time the layer
    runs in eval mode without gradients (e.g. `generate`), and that kernel has no backward:
    gradients stop flowing through every such layer, silently. A model that will be trained
    (after generating, as PPO does) must unpack and opt out of the repacking."""
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # bitsandbytes without the CPU repacking: nothing to undo
        return 0
    changed = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state
            )
            changed += 1
    return changed
