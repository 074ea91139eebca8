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
