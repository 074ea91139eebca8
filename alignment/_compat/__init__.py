"""The seam between prefloop and the private insides of the libraries it trains with.

Every use of a private member of TRL, transformers or PEFT (a `_method`, an `_attribute`, a
hook overridden by subclassing, a method replaced on an instance) lives in this package and
nowhere else: `trl.py` for TRL's trainers, `transformers.py` for transformers' models and
Trainer. Each module names the versions it was written and tested for (`TESTED`, as version
specifiers) and each such use is a *fast path* behind `fast_path_enabled(feature)`; the caller
keeps a public-API fallback that is slower, never wrong.

`fast_path_enabled` is False when

- an installed library is outside the tested range (one warning per process and library,
  naming the installed version and the range), or
- the environment variable `PREFLOOP_COMPAT=public` asks for the public paths (tests compare
  the two; a user on a new TRL can take the safe path before prefloop is updated).

The Gradio counterpart is `labeling/app/_compat_gradio.py`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

log = logging.getLogger("prefloop.compat")

ENV = "PREFLOOP_COMPAT"  # "public": every fast path off
_warned: set[tuple[str, str]] = set()
_versions: dict[str, Version] = {}


def installed_version(library: str) -> Version:
    """The installed version of `library` (read once; tests replace this function)."""
    if library not in _versions:
        _versions[library] = Version(metadata.version(library))
    return _versions[library]


def forced_public() -> bool:
    return os.environ.get(ENV, "").strip().lower() == "public"


def untested(tested: Mapping[str, SpecifierSet]) -> list[tuple[str, Version, SpecifierSet]]:
    """The libraries of `tested` whose installed version is outside their tested range."""
    out = []
    for library, spec in tested.items():
        version = installed_version(library)
        if not spec.contains(version, prereleases=True):
            out.append((library, version, spec))
    return out


def check(feature: str, tested: Mapping[str, SpecifierSet]) -> bool:
    """Whether the fast path `feature`, written against `tested`, may run here."""
    if forced_public():
        key = ("env", ENV)
        if key not in _warned:
            _warned.add(key)
            log.info("%s=public: prefloop uses the public-API paths of TRL/transformers (slower)", ENV)
        return False
    off = untested(tested)
    for library, version, spec in off:
        key = (library, str(version))
        if key not in _warned:
            _warned.add(key)
            log.warning(
                "%s %s is not a version prefloop was tested with (%s %s): its fast paths that rely on %s "
                "internals are off (%s and others); training takes the public-API path (slower, same results)",
                library, version, library, spec, library, feature,
            )
    return not off


def reset_warnings() -> None:
    """Forget which warnings were given (tests)."""
    _warned.clear()
