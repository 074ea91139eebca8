"""A wheel built from this repository works on its own: presets, migrations and prompts inside.

The wheel is built from a copy of the packaging inputs (so setuptools' build/ folder in the
checkout, which keeps files deleted since, cannot leak into it), installed with
`pip install --no-deps --target` (the dependencies are this environment's), and run from an
empty folder with only the install on PYTHONPATH. The checkout's editable install stays on
sys.path behind it, so each run also checks that prefloop was imported from the install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("feedback_store", "labeling", "alignment")
# Besides the Python files, what the installed code reads at run time.
DATA_FILES = (
    "feedback_store/migrations/env.py",
    "feedback_store/migrations/script.py.mako",
    "feedback_store/migrations/versions/0001_initial_schema.py",
    "labeling/data/prompts.jsonl",
    "labeling/data/loop_prompts.jsonl",
    "alignment/training/presets/seed-qlora.yaml",
    "alignment/training/presets/cpu-lora.yaml",
)
# Imports prefloop's packages and fails unless every one of their modules came from the install.
CHECK = """
import sys
from pathlib import Path
site = Path(sys.argv[1]).resolve()
import labeling.cli, labeling.data, feedback_store.db
from alignment.training.presets import list_presets, load_preset
preset = load_preset("seed-qlora")
assert preset["adapter"]["r"] == 64, preset
assert list_presets() == ["cpu-lora", "seed-qlora"], list_presets()
assert Path(preset["_source"]).resolve().is_relative_to(site), preset["_source"]
assert labeling.data.DEFAULT_PROMPTS.is_file() and labeling.data.LOOP_PROMPTS.is_file()
outside = [m.__file__ for name, m in list(sys.modules.items())
           if name.split(".")[0] in ("labeling", "alignment", "feedback_store")
           and getattr(m, "__file__", None) and not Path(m.__file__).resolve().is_relative_to(site)]
assert not outside, outside
print("ok")
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel, built and installed into a folder of its own: that folder."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    dist = root / "dist"
    # No build isolation: it would fetch setuptools from an index; this environment has it.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "--wheel-dir", str(dist)],
        check=True, cwd=root, timeout=180,
    )
    (wheel,) = dist.glob("prefloop-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in DATA_FILES if name not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert all(name.split("/")[0] in (*PACKAGES, f"{wheel.name.split('-py')[0]}.dist-info")
               for name in names), sorted(names)
    site = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
         "--target", str(site), str(wheel)],
        check=True, cwd=root, timeout=120,
    )
    return site


def _run(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "PREFLOOP_"))}  # no checkout path, no presets override
    env["PYTHONPATH"] = str(site)
    # -P: neither the working folder nor the script's folder goes on sys.path.
    return subprocess.run([sys.executable, "-P", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_installed_wheel_runs_from_anywhere(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    check = _run(installed, "-c", CHECK, str(installed), cwd=elsewhere)
    assert check.returncode == 0 and check.stdout.strip() == "ok", check.stderr

    db = tmp_path / "x.db"
    upgrade = _run(installed, "-m", "labeling.cli", "db", "upgrade", "--db", f"sqlite:///{db}",
                   cwd=elsewhere)
    assert upgrade.returncode == 0, upgrade.stderr
    import sqlite3

    with sqlite3.connect(db) as connection:
        tables = {row[0] for row in connection.execute("select name from sqlite_master")}
    assert {"alembic_version", "vote", "prompt"} <= tables, tables

    help_ = _run(installed, "-m", "labeling.cli", "train", "dpo", "--help", cwd=elsewhere)
    assert help_.returncode == 0 and "--preset" in help_.stdout, help_.stderr
