"""Load a tokenizer and a model (optionally quantized, optionally with an adapter) from a `ModelSpec`.

    tokenizer = load_tokenizer(spec)
    model, tokenizer = load_model(spec)                      # causal LM, eval mode
    model, tokenizer = load_model(spec, head="reward")       # sequence classifier, 1 label
    model, tokenizer = load_model(spec, adapter_trainable=True)  # keep training spec.adapter_path
    path = resolve_model_path(spec.model)                    # "default" -> cached safetensors dir

Every failure a user can cause (unknown id, missing package, an adapter that does not fit)
is a `ModelError` with one line saying what to do. Hub ids are checked before transformers
tries them: offline, transformers retries for most of a minute before giving up.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from alignment.models.errors import ModelError
from alignment.models.spec import ModelSpec, resolve_device, resolve_dtype, resolve_quantize

log = logging.getLogger(__name__)

Head = Literal["causal_lm", "reward"]


def resolve_model_path(model: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, local_files_only) for "default", a directory or a Hub id."""
    from alignment.models.default_model import default_model_dir
    from alignment.models.spec import DEFAULT_MODEL_ALIASES

    if model in DEFAULT_MODEL_ALIASES:
        return str(default_model_dir()), True
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{model}: directory has no config.json (not a saved transformers model)")
        return str(path), True
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep in model.replace("/", "", 1):
        raise ModelError(f"model {model!r}: no such directory")
    return model, _hub_check(model)


def _hub_check(repo_id: str) -> bool:
    """True if the Hub id is usable from the local cache alone; raises if it is not usable at all."""
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except HFValidationError:
        raise ModelError(f"model {repo_id!r}: not a directory and not a valid Hugging Face id") from None
    if isinstance(cached, str):
        return True
    if constants.HF_HUB_OFFLINE:
        raise ModelError(f"model {repo_id!r}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    try:
        model_info(repo_id, timeout=10)
    except RepositoryNotFoundError:
        raise ModelError(f"unknown model id {repo_id!r}: check the spelling, or pass a local directory") from None
    except Exception as error:  # connection errors come from several HTTP libraries
        raise ModelError(
            f"model {repo_id!r} is not in the local cache and the Hugging Face Hub is unreachable "
            f"({type(error).__name__}): download it where there is a network, or pass a local directory"
        ) from None
    return False


def load_tokenizer(spec: ModelSpec):
    """The model's tokenizer with a pad token (the EOS when the model defines none)."""
    from transformers import AutoTokenizer

    path, local_only = resolve_model_path(spec.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, local_files_only=local_only, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load the tokenizer of {spec.model!r}: {_first_line(error)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelSpec, *, head: Head = "causal_lm", adapter_trainable: bool = False):
    """(model, tokenizer) for `spec`: quantized as asked, adapter attached, in eval mode
    unless `adapter_trainable` (then the adapter's parameters require grad)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from alignment.models.quantization import quantization_config

    tokenizer = load_tokenizer(spec)
    path, local_only = resolve_model_path(spec.model)
    device = resolve_device(spec)
    quant = quantization_config(spec)
    kwargs: dict = {"local_files_only": local_only, "trust_remote_code": spec.trust_remote_code}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    else:
        kwargs["dtype"] = resolve_dtype(spec)
    auto_class = AutoModelForCausalLM
    if head == "reward":
        auto_class = AutoModelForSequenceClassification
        kwargs.update(num_labels=1, pad_token_id=tokenizer.pad_token_id)
    try:
        model = auto_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError, RuntimeError) as error:
        mode = resolve_quantize(spec)
        raise ModelError(f"cannot load {spec.model!r} (quantize={mode}): {_first_line(error)}") from None
    if quant is None:
        model.to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if spec.adapter_path:
        from alignment.models.adapters import load_adapter

        model = load_adapter(model, spec.adapter_path, trainable=adapter_trainable)
    if not adapter_trainable:
        model.eval()
    return model, tokenizer


def context_length(model, tokenizer=None) -> int | None:
    """How many tokens (prompt + completion) the model can attend to, when it says so."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
