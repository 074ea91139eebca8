"""Opt-in int8 weights for CPU decoding of Llama-family models (fbgemm dynamic quantization).

    quantize_int8(model, tokenizer, calibration_texts)            # in place; returns the model
    quantize_int8(model, tokenizer, texts, keep_float=())         # every Linear int8 (fastest, lossiest)

Why: on a CPU without AVX-512/AMX, batched decoding of the embedded default is bound by memory
bandwidth: each step reads every fp32 weight (540 MB for SmolLM2-135M; the lm_head alone is a
third of the step). int8 weights read a quarter of that. torch's weight-only int8/int4 kernels
and bf16 matmuls are 5-40x slower than fp32 on AVX2, so the kernel here is fbgemm's dynamic
quantization (`torch.ao.quantization.quantize_dynamic`, per-output-channel weights), which also
quantizes each Linear's *input* per tensor at every call.

That activation quantization is what costs accuracy: a few input channels carry outliers
(worst in down_proj, whose input is silu(gate) * up). Before quantizing, the outliers are
moved into the weights (SmoothQuant): input channel j is divided by s_j = max|x_j|^alpha /
max|w_j|^(1 - alpha) and the weight column multiplied by it, the division folded into the
RMSNorm weight before q/k/v and gate/up, and into up_proj's rows before down_proj. In float
this is the same function (tests/test_decoding.py checks it); max|x_j| comes from decoding
`calibration_texts` once.

Not exact: greedy tokens differ from the float model's. Measured on the embedded default
(teacher-forced over 16 bundled prompts and 48 greedy tokens, calibrated on 32 other prompts):
down_proj kept float (the default): top-1 agreement 87%, KL 0.07 nat/token, 1.55x float's
tokens/s; every Linear int8: 69-72%, KL 0.4, 2.4x. For comparison, llama.cpp's own Q4_1 path
quantizes activations to 8 bits in blocks of 32. The model must take `alignment.decoding`'s
path (the layer layout is the one that feature is tested with): otherwise a ModelError.
torch 2.13 marks its eager quantized modules deprecated (the torchao successor has no
AVX2-fast int8 x int8 CPU kernel yet): this option goes when they do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alignment.models.errors import ModelError

DEFAULT_KEEP_FLOAT = ("down_proj",)
ALPHA = 0.7  # migration strength; 0.5-0.85 measured, 0.7 best on the embedded default
CALIBRATION_TOKENS = 32


def input_absmax(model, tokenizer, texts: Sequence[str], *, new_tokens: int = CALIBRATION_TOKENS) -> dict[str, torch.Tensor]:
    """Per input channel, the largest |x| entering each q_proj, gate_proj and down_proj while
    decoding `texts` (prompt and `new_tokens` greedy tokens)."""
    from alignment import decoding

    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs):
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0).float()
            seen[name] = torch.maximum(seen[name], x) if name in seen else x
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in model.named_modules()
               if name.endswith(("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"))]
    try:
        encoded = tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="left",
                            add_special_tokens=False)
        decoding.decode(model, encoded["input_ids"], encoded["attention_mask"], max_new_tokens=new_tokens)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@torch.no_grad()
def smooth(model, absmax: dict[str, torch.Tensor], *, alpha: float = ALPHA) -> None:
    """Move activation outliers into the weights; the float function is unchanged."""
    for index, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        prefix = f"model.layers.{index}"
        groups = (
            (f"{prefix}.self_attn.q_proj", [attn.q_proj, attn.k_proj, attn.v_proj], layer.input_layernorm.weight, 0),
            (f"{prefix}.mlp.gate_proj", [mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm.weight, 0),
            (f"{prefix}.mlp.down_proj", [mlp.down_proj], mlp.up_proj.weight, 1),
        )
        for key, linears, before, axis in groups:
            weight_max = torch.stack([linear.weight.abs().amax(0) for linear in linears]).amax(0).float()
            scale = absmax[key].clamp(min=1e-5) ** alpha / weight_max.clamp(min=1e-5) ** (1 - alpha)
            scale = scale.clamp(min=1e-5).to(before.dtype)
            for linear in linears:
                linear.weight.mul_(scale)
            if axis == 0:
                before.div_(scale)
            else:  # up_proj's output channel j is down_proj's input channel j
                before.div_(scale[:, None])
                if mlp.up_proj.bias is not None:
                    mlp.up_proj.bias.div_(scale)


def quantize_int8(model, tokenizer, calibration_texts: Sequence[str], *,
                  keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT, alpha: float = ALPHA):
    """Smooth, then give every Linear int8 weights except those whose name ends with one of
    `keep_float` ("down_proj", "lm_head", ...). In place; returns the model."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from alignment import decoding

    if not decoding.supports(model):
        raise ModelError(f"int8 quantization: {type(model).__name__} does not take the static-cache decoding path "
                         "(a Llama-family model on a tested transformers, PREFLOOP_DECODE unset)")
    if next(model.parameters()).device.type != "cpu":
        raise ModelError("int8 quantization is for CPU models (fbgemm kernels)")
    if not calibration_texts:
        raise ModelError("int8 quantization needs calibration texts (a few prompts)")
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head" not in keep_float:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # the embedding stays float
    smooth(model, input_absmax(model, tokenizer, calibration_texts), alpha=alpha)
    spec = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith(tuple(keep_float))}
    quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    return model
