"""bench/active.py keeps working: both criteria run end to end on tiny sizes (real strategies,
real queue, simulated raters voting through the store) and print a well-formed RESULT line.
No label count is asserted beyond being positive: the figures are the bench's job."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "active.py"
RESULT = re.compile(
    r"^RESULT active ratio=(?P<ratio>\d+\.\d\d) criterion=(?P<criterion>reward|intervals) "
    r"strategy=(?P<strategy>uncertainty|arena) seeds=2 goal<=0\.70 met=(yes|no) active_median=\d+ "
    r"fewest_votes_median=\d+ ratios=\d+\.\d\d,\d+\.\d\d "
    r"(accuracy=[\d.]+ annotator=(flip|bradley-terry)|width=[\d.]+) censored=\d+ load=\d+\.\d$")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_active", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize(("criterion", "strategy", "sizes"), [
    ("reward", "uncertainty", ["--prompts", "25", "--features", "4", "--accuracy", "0.85", "--batch", "10",
                               "--warm", "10", "--heldout", "300"]),
    ("intervals", "arena", ["--prompts", "6", "--policies", "4", "--width", "400", "--batch", "10",
                            "--bootstrap", "20"]),
])
def test_bench_active_runs_both_orders(bench, capsys, criterion, strategy, sizes):
    args = bench.parser().parse_args(["--criterion", criterion, "--seeds", "2", *sizes])
    rows = bench.measure(args)
    assert [seed for seed, _, _ in rows] == [0, 1]
    for _, mine, base in rows:
        assert mine.labels > 0 and base.labels > 0
    line = bench.main(["--criterion", criterion, "--seeds", "2", *sizes])
    match = RESULT.match(line)
    assert match, line
    assert match["criterion"] == criterion and match["strategy"] == strategy
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == line  # the last line printed


def test_the_refit_reward_model_recovers_the_true_direction(bench):
    import numpy as np

    rng = np.random.default_rng(0)
    w_true = np.array([1.0, -2.0, 0.5])
    z = rng.standard_normal((2000, 3))
    y = (z @ w_true > 0).astype(float)
    y = np.where(rng.random(2000) < 0.2, 1 - y, y)  # 20 % flips, as the simulated annotator
    w = bench.fit_logistic(z, y)
    assert np.dot(w, w_true) / np.linalg.norm(w) / np.linalg.norm(w_true) > 0.98


def test_the_bradley_terry_annotator_follows_the_margin(bench):
    """Near-ties are coin flips, clear pairs are (almost) always decided for the better answer."""
    import numpy as np

    features = {"good": np.array([3.0]), "bad": np.array([-3.0]), "x": np.array([0.01]), "y": np.array([0.0])}
    rule = bench.bradley_terry_rule(features, np.array([1.0]), seed=0)
    clear = [rule([], "good", "bad") for _ in range(400)]
    close = [rule([], "x", "y") for _ in range(400)]
    assert clear.count("A") > 390
    assert 150 < close.count("A") < 250
