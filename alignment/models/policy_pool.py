"""Several policy versions on one base model, switched per request (LoRA-Land style).

    pool = PolicyPool.load(ModelSpec("default"))
    pool.add("dpo-3", "runs/3/adapter")          # peft LoRA/DoRA or an lm_head adapter
    pool.add("kto-4", "runs/4/adapter")
    with pool.use("dpo-3") as model: ...          # that adapter active; pool.use(None) = the base
    pool.generate("kto-4", conversations, SamplingConfig(max_new_tokens=64))

The base weights are held once; each LoRA adapter costs only its own small matrices and an
lm_head adapter one output matrix. Switching happens under a lock, so a threaded app can
serve requests for different policies from one pool; requests are served one at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from alignment.models.adapters import (
    adapter_kind,
    load_adapter,
    read_lm_head_adapter,
    set_output_weights,
    untie_output_embeddings,
)
from alignment.models.errors import ModelError
from alignment.models.loading import load_model
from alignment.models.spec import ModelSpec


class PolicyPool:
    """A base model plus named adapters; `use(name)` activates one of them (None = the base)."""

    def __init__(self, model, tokenizer, *, base_name: str = "base") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.base_name = base_name
        self._lock = threading.RLock()
        self._paths: dict[str, str] = {}  # every loaded adapter name -> its directory
        self._peft: set[str] = set()
        self._lm_heads: dict[str, dict[str, torch.Tensor]] = {}
        self._base_head: dict[str, torch.Tensor] | None = None

    @classmethod
    def load(cls, spec: ModelSpec, adapters: Mapping[str, str] | None = None) -> "PolicyPool":
        if spec.adapter_path:
            raise ModelError("PolicyPool.load takes the base model; pass adapters by name instead of adapter_path")
        model, tokenizer = load_model(spec)
        pool = cls(model, tokenizer, base_name=spec.model)
        for name, path in (adapters or {}).items():
            pool.add(name, path)
        return pool

    @property
    def names(self) -> list[str]:
        return list(self._paths)

    def __contains__(self, name: str) -> bool:
        return name in self._paths

    def add(self, name: str, adapter_path: str | Path) -> None:
        """Load an adapter under `name` (a no-op if that name is already loaded from the same path)."""
        if not name or name == self.base_name:
            raise ModelError(f"adapter name {name!r} is reserved for the base model")
        with self._lock:
            if name in self:
                if self._paths[name] == str(adapter_path):
                    return
                raise ModelError(f"adapter name {name!r} is already loaded from {self._paths[name]}")
            kind = adapter_kind(adapter_path)
            if kind == "lm_head":
                tensors = read_lm_head_adapter(adapter_path)
                if self._base_head is None:
                    head = untie_output_embeddings(self.model)
                    self._base_head = {n: p.detach().clone() for n, p in head.named_parameters()}
                # Check the fit now rather than on the first request.
                set_output_weights(self.model, tensors, source=str(adapter_path))
                set_output_weights(self.model, self._base_head)
                self._lm_heads[name] = tensors
            else:
                self.model = load_adapter(self.model, adapter_path, adapter_name=name)
                self.model.eval()
                self._peft.add(name)
            self._paths[name] = str(adapter_path)

    @contextmanager
    def use(self, name: str | None) -> Iterator[object]:
        """The model with `name`'s adapter active (None or the base name: no adapter)."""
        if name is not None and name != self.base_name and name not in self:
            raise ModelError(f"no adapter named {name!r} in this pool (loaded: {', '.join(self.names) or 'none'})")
        with self._lock:
            if name in self._peft:
                self.model.set_adapter(name)
                yield self.model
                return
            peft_off = self.model.disable_adapter() if self._peft else nullcontext()
            with peft_off:
                if name in self._lm_heads:
                    set_output_weights(self.model, self._lm_heads[name])
                    try:
                        yield self.model
                    finally:
                        set_output_weights(self.model, self._base_head)
                else:
                    yield self.model

    def generate(self, name: str | None, conversations, sampling, *, progress=None):
        """Completions from policy `name` for each conversation (see alignment.sampling)."""
        # Imported here: alignment.sampling imports alignment.models (for ModelError), so a
        # module-level import would find this package half-initialised.
        from alignment.sampling import generate_local

        with self.use(name) as model:
            return generate_local(model, self.tokenizer, conversations, sampling, progress=progress)
