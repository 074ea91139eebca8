"""Training presets and config files: YAML layers merged as preset < config file < CLI flags.

A preset (NAME.yaml in this package, read through importlib.resources so an installed wheel
has them too) and a `--config` file have the same shape:

    model:     ModelSpec fields (quantize, compute_dtype, double_quant, ...)
    adapter:   AdapterConfig fields (method, r, alpha, dropout, target_modules)
    selection: feedback_store.export.Selection fields (rater_kinds, min_agreement, tie_policy, ...)
    run:       RunOptions fields (output_dir, data, min_examples, eval_fraction, ...)
    trainer:   fields of the method's TRL config (learning_rate, per_device_train_batch_size, ...)
    sft: / reward: / dpo: / kto:   the same, for one method only (over `trainer`)

Every key is checked against the dataclass it configures, so a typo is an error that names
the file and the key, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from alignment.training.methods import METHOD_NAMES as METHOD_SECTIONS
SECTIONS = ("description", "model", "adapter", "selection", "run", "trainer", *METHOD_SECTIONS)
AUTO_PRESET = "auto"


class PresetError(ValueError):
    """An unknown preset, an unreadable file or a setting that does not exist (one line)."""


def presets_dir() -> Traversable:
    """$PREFLOOP_PRESETS_DIR, else the YAML files shipped in this package (a checkout or a wheel)."""
    env = os.environ.get("PREFLOOP_PRESETS_DIR")
    return Path(env) if env else resources.files(__name__)


def list_presets() -> list[str]:
    directory = presets_dir()
    if not directory.is_dir():
        return []
    return sorted(p.name.removesuffix(".yaml") for p in directory.iterdir() if p.name.endswith(".yaml"))


def default_preset() -> str:
    """The seed's QLoRA on CUDA; LoRA on the full-precision model on CPU."""
    import torch

    return "seed-qlora" if torch.cuda.is_available() else "cpu-lora"


def load_preset(name: str) -> dict:
    """A preset by name (or a path to a YAML file)."""
    if name == AUTO_PRESET:
        name = default_preset()
    path = Path(name)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        path = presets_dir() / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(list_presets()) or f"none in {presets_dir()}"
        raise PresetError(f"unknown preset {name!r} (known presets: {known})")
    return load_yaml(path)


def load_yaml(path: str | Path | Traversable) -> dict:
    path = Path(path) if isinstance(path, str) else path
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise PresetError(f"{path}: no such file") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise PresetError(f"{path}{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise PresetError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
    for section, values in data.items():
        if section not in SECTIONS:
            raise PresetError(f"{path}: unknown section {section!r}{_suggest(section, SECTIONS)}")
        if section != "description" and values is not None and not isinstance(values, dict):
            raise PresetError(f"{path}: section {section!r} must be a mapping of settings")
    data["_source"] = str(path)
    return data


def merge(*layers: dict) -> dict:
    """Later layers win, key by key within each section; None values in a layer are kept
    (`target_modules: null` means "detect"). A later layer's `trainer.KEY` also beats an earlier
    layer's `METHOD.KEY` (a --learning-rate flag over a preset's `reward: learning_rate`)."""
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for layer in layers:
        source = layer.get("_source", "command line")
        for section, values in layer.items():
            if section in ("_source", "description"):
                continue
            target = merged.setdefault(section, {})
            for key, value in (values or {}).items():
                if section == "trainer":
                    for method in METHOD_SECTIONS:
                        if key in merged.get(method, {}) and key not in (layer.get(method) or {}):
                            del merged[method][key]
                            sources.pop(f"{method}.{key}", None)
                target[key] = value
                sources[f"{section}.{key}"] = source
    merged["_sources"] = sources
    return merged


def parse_assignment(text: str) -> dict:
    """`section.key=value` (value read as YAML) into a one-setting layer."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise PresetError(f"--set {text!r}: expected section.key=value, e.g. trainer.learning_rate=1e-4")
    path, raw = text.split("=", 1)
    section, key = path.split(".", 1)
    if section not in SECTIONS or section == "description":
        raise PresetError(f"--set {text!r}: unknown section {section!r}{_suggest(section, SECTIONS)}")
    return {section: {key: yaml.safe_load(raw)}}


def settings_for(merged: dict, method: str) -> dict:
    """The sections one method uses, with its own section over `trainer`."""
    trainer = dict(merged.get("trainer", {}))
    trainer.update(merged.get(method, {}))
    return {
        "model": dict(merged.get("model", {})),
        "adapter": dict(merged.get("adapter", {})),
        "selection": dict(merged.get("selection", {})),
        "run": dict(merged.get("run", {})),
        "trainer": trainer,
        "_sources": merged.get("_sources", {}),
    }


def build(cls, values: dict, section: str, sources: dict | None = None, *, method: str | None = None):
    """`cls(**values)` after checking every key is a field of `cls` and coercing YAML scalars."""
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        where = (sources or {}).get(f"{section}.{key}") or (sources or {}).get(f"{method}.{key}") or "settings"
        if key not in known:
            raise PresetError(f"{where}: {section}.{key}: not a setting of {cls.__name__}{_suggest(key, known)}")
        kwargs[key] = coerce(known[key], value, f"{where}: {section}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise PresetError(f"{section}: {str(error).splitlines()[0]}") from None


def coerce(field: dataclasses.Field, value: Any, where: str) -> Any:
    """YAML reads `2e-4` as a string and CLI values arrive as strings: convert by the field's default."""
    default = field.default if field.default is not dataclasses.MISSING else None
    if value is None or default is None or isinstance(value, type(default)):
        return value
    try:
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError(value)
        if isinstance(default, float) and isinstance(value, (int, str)):
            return float(value)
        if isinstance(default, int) and isinstance(value, str):
            return int(value)
    except ValueError:
        raise PresetError(f"{where}: expected a {type(default).__name__}, got {value!r}") from None
    return value


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
