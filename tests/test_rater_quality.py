"""Annotator quality (feedback_store.rater_quality): a known bad rater is found, by gold
accuracy, agreement with the others and Dawid-Skene; weights follow; the CLI shows it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from statsmodels.stats.proportion import proportion_confint

from feedback_store.db import engine_for, session_scope
from feedback_store.gold import make_gold_pairs
from feedback_store.models import Rater
from feedback_store.rater_quality import auto_weights, suggested_weight, wilson_interval
from feedback_store.stats import StatsConfig, compute_stats
from labeling.cli import main as prefloop
from labeling.simulate import SimulatedRater, simulate
from tests.test_simulate import make_pairs


@pytest.mark.parametrize("k, n", [(0, 10), (7, 10), (10, 10), (33, 50)])
def test_wilson_interval_matches_statsmodels(k, n):
    assert wilson_interval(k, n) == pytest.approx(proportion_confint(k, n, method="wilson"))


def test_suggested_weight():
    assert [suggested_weight(s) for s in (0.4, 0.5, 0.75, 1.0, None)] == [0.0, 0.0, 0.5, 1.0, None]


@pytest.fixture(scope="module")
def crowd(tmp_path_factory):
    """3 good simulated raters (noise 0.05), 2 bad ones (noise 0.45), on 40 pairs and 10 gold pairs."""
    from feedback_store.db import upgrade

    url = f"sqlite:///{tmp_path_factory.mktemp('crowd') / 'p.db'}"
    upgrade(url)
    engine = engine_for(url)
    with session_scope(engine) as s:
        make_pairs(s, 40, seed=11)
        assert len(make_gold_pairs(session=s, count=10, seed=0, kinds=["truncated", "refusal"]).made) == 10
    rule = "no-refusal,longer"  # right on both kinds of gold pair
    raters = [SimulatedRater(f"good{i}", rule=rule, noise=0.05) for i in range(3)]
    raters += [SimulatedRater(f"bad{i}", rule=rule, noise=0.45) for i in range(2)]
    simulate(engine, raters, votes_per_rater=50, seed=3)
    return url


def test_quality_finds_the_bad_raters(crowd):
    with session_scope(engine_for(crowd)) as s:
        rows = {r.rater: r for r in compute_stats(session=s, config=StatsConfig(
            rater_kinds=("simulated",), min_gold=5, quality_threshold=0.85)).raters}
    good = [rows[f"good{i}"] for i in range(3)]
    bad = [rows[f"bad{i}"] for i in range(2)]
    assert all(r.votes == 50 and r.gold_n == 10 for r in good + bad)
    for metric in ("gold_accuracy", "majority_agreement", "ds_accuracy", "score"):
        assert max(getattr(r, metric) for r in bad) < min(getattr(r, metric) for r in good), metric
    # Ten gold pairs put a 0.55 rater's accuracy anywhere in 0.2-0.9: the threshold sits high here.
    assert [r.below_threshold for r in good + bad] == [False, False, False, True, True]
    for r in good:  # Dawid-Skene's confusion is close to the truth: 95 % right on a and b
        assert r.ds_confusion["a"]["a"] == pytest.approx(0.95, abs=0.1)
        assert r.ds_confusion["b"]["b"] == pytest.approx(0.95, abs=0.1)
        assert r.gold_ci_low < r.gold_accuracy <= r.gold_ci_high
    for r in bad:
        assert r.ds_confusion["a"]["a"] == pytest.approx(0.55, abs=0.2)
        assert r.ds_accuracy == pytest.approx(0.55, abs=0.2)
    assert all(0.3 < r.left_pick_rate < 0.7 and r.median_time_ms > 0 for r in good + bad)


def test_weights_by_hand_and_from_quality_and_the_cli(crowd, capsys):
    assert prefloop(["raters", "weight", "good0", "0.25", "--db", crowd]) == 0
    with session_scope(engine_for(crowd)) as s:
        assert s.exec(__import__("sqlmodel").select(Rater.weight).where(Rater.name == "good0")).one() == 0.25
        weights = auto_weights(session=s, min_gold=5)
    assert min(weights[f"good{i}"] for i in range(3)) > max(weights[f"bad{i}"] for i in range(2))
    assert prefloop(["raters", "weight", "--auto", "--db", crowd]) == 0
    assert prefloop(["raters", "weight", "nobody", "1", "--db", crowd]) == 2
    assert prefloop(["raters", "threshold", "0.85", "--db", crowd]) == 0
    capsys.readouterr()
    assert prefloop(["stats", "--json", "--bootstrap", "0", "--db", crowd]) == 0
    assert json.loads(capsys.readouterr().out)["raters"] == []  # simulated: only when asked
    assert prefloop(["stats", "--json", "--bootstrap", "0", "--include-simulated", "--db", crowd]) == 0
    listed = {r["rater"]: r for r in json.loads(capsys.readouterr().out)["raters"]}
    assert set(listed) == {"good0", "good1", "good2", "bad0", "bad1"}
    assert listed["bad0"]["below_threshold"] and "ds_confusion" in listed["good1"]
    assert prefloop(["stats", "--bootstrap", "0", "--include-simulated", "--db", crowd]) == 0
    assert "Rater quality" in capsys.readouterr().out


@pytest.mark.parametrize("n_items, n_raters, seed", [(40, 5, 0), (600, 8, 1)])
def test_numpy_dawid_skene_is_crowd_kits(n_items, n_raters, seed):
    """feedback_store.dawid_skene is crowd-kit's DawidSkene on arrays: same priors, same
    confusion matrices, same number of EM steps, gold labels clamped the same way."""
    pd = pytest.importorskip("pandas")
    crowdkit = pytest.importorskip("crowdkit.aggregation")
    from feedback_store.dawid_skene import fit_dawid_skene

    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, n_items)
    item = np.repeat(np.arange(n_items), 3)
    rater = rng.integers(0, n_raters, len(item))
    right = rng.random(len(item)) < np.where(rater < n_raters // 2, 0.9, 0.5)
    label = np.where(right, truth[item], rng.integers(0, 4, len(item)))
    gold = {int(i): int(truth[i]) for i in range(0, n_items, 10)}
    names = np.array(["a", "b", "tie", "both_bad"], dtype=object)

    reference = crowdkit.DawidSkene(n_iter=100).fit(
        pd.DataFrame({"task": item, "worker": rater.astype(str), "label": names[label]}),
        true_labels=pd.Series({i: names[g] for i, g in gold.items()}, dtype=object),
    )
    fit = fit_dawid_skene(item, rater, label, n_raters=n_raters, gold=gold)

    assert fit.iterations == len(reference.loss_history_)
    for i, code in enumerate(fit.labels):
        assert fit.priors[i] == pytest.approx(reference.priors_[names[code]], abs=1e-9)
    for r in range(n_raters):
        table = reference.errors_.loc[str(r)]
        for s, said in enumerate(fit.labels):
            for t, true in enumerate(fit.labels):
                expected = table.loc[names[said], names[true]] if names[said] in table.index else 0.0
                assert fit.errors[r, s, t] == pytest.approx(expected, abs=1e-9)
