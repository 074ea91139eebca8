"""What to load: `ModelSpec`, and how its "auto" values resolve on this machine.

    spec = ModelSpec()                                   # the embedded default, none on CPU / 4-bit on CUDA
    spec = ModelSpec("Qwen/Qwen2.5-0.5B-Instruct", quantize="4bit", compute_dtype="bfloat16")
    spec = ModelSpec(adapter_path="runs/dpo-3/adapter")  # default base + a trained adapter

`resolve_device`, `resolve_quantize`, `resolve_dtype` and `resolve_compute_dtype` turn the
"auto" values into concrete ones; every loader goes through them so that the CLI, the app and
the trainers agree on what "auto" means.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from alignment.models.errors import ModelError

DEFAULT_MODEL = "default"
# Names under which the CLI and the store refer to the embedded default model.
DEFAULT_MODEL_ALIASES = frozenset({"default", "base"})

QuantizeMode = Literal["auto", "none", "8bit", "4bit"]
QUANTIZE_MODES = ("auto", "none", "8bit", "4bit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """A base model, how to quantize it, and an optional adapter on top."""

    model: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "'default' (the embedded SmolLM2-135M-Instruct), a Hugging Face id or a local path"},
    )
    quantize: QuantizeMode = field(
        default="auto",
        metadata={"help": "none, 8bit or 4bit (bitsandbytes); auto = 4bit on CUDA, none on CPU"},
    )
    compute_dtype: str = field(
        default="auto",
        metadata={"help": "dtype of 4-bit matmuls: float32, bfloat16, float16; auto = bfloat16 on CUDA, float32 on CPU"},
    )
    double_quant: bool = field(default=True, metadata={"help": "quantize the 4-bit scales too (QLoRA)"})
    quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type"})
    dtype: str = field(
        default="auto",
        metadata={"help": "weights dtype when not quantized; auto = bfloat16 on CUDA, float32 on CPU"},
    )
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N; auto = cuda when available"})
    adapter_path: str | None = field(
        default=None, metadata={"help": "a LoRA/DoRA (peft) or lm_head adapter directory to put on the base"}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the Hub"})

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_MODES:
            raise ModelError(f"quantize={self.quantize!r}: expected one of {', '.join(QUANTIZE_MODES)}")
        for name in ("compute_dtype", "dtype"):
            value = getattr(self, name)
            if value != "auto" and value not in DTYPES:
                raise ModelError(f"{name}={value!r}: expected auto or one of {', '.join(DTYPES)}")
        if self.quant_type not in ("nf4", "fp4"):
            raise ModelError(f"quant_type={self.quant_type!r}: expected nf4 or fp4")

    @property
    def is_default(self) -> bool:
        return self.model in DEFAULT_MODEL_ALIASES

    def with_adapter(self, adapter_path: str | None) -> "ModelSpec":
        return replace(self, adapter_path=adapter_path)


def resolve_device(spec: ModelSpec) -> torch.device:
    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device={spec.device!r} but CUDA is not available here: use --device cpu")
    return device


def resolve_quantize(spec: ModelSpec) -> str:
    """4-bit on CUDA; on CPU a 135M model loses too much at 4 bits to be worth it by default."""
    if spec.quantize != "auto":
        return spec.quantize
    return "4bit" if resolve_device(spec).type == "cuda" else "none"


def _cuda_half(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_dtype(spec: ModelSpec) -> torch.dtype:
    if spec.dtype != "auto":
        return DTYPES[spec.dtype]
    device = resolve_device(spec)
    return _cuda_half(device) if device.type == "cuda" else torch.float32


BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 matmuls natively (AMX or AVX512-BF16, which oneDNN
    uses), read from the CPU's own flags rather than torch's private oneDNN probe."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False  # not Linux: keep float32, always correct
    for line in text.splitlines():
        if line.startswith("flags"):
            return not BF16_CPU_FLAGS.isdisjoint(line.split(":", 1)[-1].split())
    return False


def inference_dtype(spec: ModelSpec) -> str:
    """The weights dtype for a model that only runs inference (a local judge): the spec's own,
    else bfloat16 wherever the hardware computes it natively, where it is about twice as fast
    as float32 (training keeps float32 on CPU: its optimizer wants the precision)."""
    if spec.dtype != "auto":
        return spec.dtype
    device = resolve_device(spec)
    if device.type == "cuda":
        return "auto"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def resolve_compute_dtype(spec: ModelSpec) -> torch.dtype:
    if spec.compute_dtype != "auto":
        return DTYPES[spec.compute_dtype]
    device = resolve_device(spec)
    return _cuda_half(device) if device.type == "cuda" else torch.float32
