"""Agreement coefficients against independent implementations and textbook values."""

from __future__ import annotations

import krippendorff
import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import aggregate_raters
from statsmodels.stats.inter_rater import fleiss_kappa as statsmodels_fleiss

from feedback_store.agreement import (
    category_counts,
    cohen_kappa,
    cohen_kappa_from_confusion,
    confusion_matrix,
    fleiss_kappa,
    krippendorff_alpha,
    krippendorff_alpha_from_counts,
    percent_agreement_from_confusion,
)


def noisy_labels(rng, n_items: int, n_raters: int, n_categories: int, noise: float, missing: float = 0.0):
    """items x raters: each rater copies a hidden true label, or guesses with probability `noise`."""
    truth = rng.integers(0, n_categories, n_items)
    labels = np.where(rng.random((n_items, n_raters)) < noise,
                      rng.integers(0, n_categories, (n_items, n_raters)), truth[:, None]).astype(float)
    labels[rng.random(labels.shape) < missing] = np.nan
    return labels


@pytest.mark.parametrize("seed", range(6))
def test_cohen_kappa_matches_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    labels = noisy_labels(rng, 200, 2, n_categories=2 + seed % 3, noise=0.2 + 0.1 * seed, missing=0.1)
    both = ~np.isnan(labels).any(axis=1)
    expected = cohen_kappa_score(labels[both, 0].astype(int), labels[both, 1].astype(int))
    assert cohen_kappa(labels[:, 0], labels[:, 1]) == pytest.approx(expected, abs=1e-12)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_cohen_kappa_edge_cases():
    assert cohen_kappa([0, 1, 2, 1], [0, 1, 2, 1]) == 1.0
    # Systematic total disagreement on two balanced categories: kappa = -1.
    assert cohen_kappa([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    # Both raters used one category throughout: chance agreement is total, kappa undefined (as sklearn).
    assert np.isnan(cohen_kappa([2, 2, 2], [2, 2, 2]))
    assert np.isnan(cohen_kappa_score([2, 2, 2], [2, 2, 2], labels=[0, 1, 2]))
    # One rater constant, the other not: defined, and zero (no agreement beyond chance).
    assert cohen_kappa([0, 0, 0, 0], [0, 1, 0, 1]) == pytest.approx(0.0)
    # Nothing rated by both.
    assert np.isnan(cohen_kappa([0, np.nan], [np.nan, 1]))
    with pytest.raises(ValueError, match="integer category codes"):
        cohen_kappa([0.5, 1], [0, 1])
    with pytest.raises(ValueError, match="differ in length"):
        cohen_kappa([0, 1, 1], [0, 1])


def test_kappa_on_a_stack_of_confusion_matrices_equals_one_at_a_time():
    rng = np.random.default_rng(7)
    stack = rng.integers(0, 20, (9, 4, 4))
    stack[3] = 0  # an empty one
    stack[5] = 0
    stack[5, 1, 1] = 8  # a single category: undefined
    batched = cohen_kappa_from_confusion(stack)
    single = [cohen_kappa_from_confusion(m) for m in stack]
    np.testing.assert_allclose(batched, single)
    assert np.isnan(batched[3]) and np.isnan(batched[5])
    np.testing.assert_allclose(percent_agreement_from_confusion(stack)[[0, 1]],
                               [np.trace(stack[0]) / stack[0].sum(), np.trace(stack[1]) / stack[1].sum()])


def test_confusion_matrix_counts_only_items_both_rated():
    matrix = confusion_matrix([0, 1, 1, np.nan, 2], [0, 1, 0, 1, np.nan], n_categories=3)
    assert matrix.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]


FLEISS_WIKIPEDIA = np.array([  # 10 subjects, 14 raters, 5 categories: kappa = 0.210
    [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
])


def test_fleiss_kappa_textbook_example():
    assert fleiss_kappa(FLEISS_WIKIPEDIA) == pytest.approx(0.2099, abs=5e-4)
    assert fleiss_kappa(FLEISS_WIKIPEDIA) == pytest.approx(statsmodels_fleiss(FLEISS_WIKIPEDIA), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_fleiss_kappa_matches_statsmodels(seed):
    rng = np.random.default_rng(100 + seed)
    labels = noisy_labels(rng, 150, 3 + seed, n_categories=4, noise=0.15 * (seed + 1)).astype(int)
    table, _ = aggregate_raters(labels, n_cat=4)
    ours = fleiss_kappa(category_counts(labels, 4))
    assert ours == pytest.approx(statsmodels_fleiss(table), abs=1e-12)


def test_fleiss_kappa_edge_cases():
    assert fleiss_kappa(np.array([[3, 0], [0, 3], [3, 0]])) == pytest.approx(1.0)
    assert np.isnan(fleiss_kappa(np.array([[3, 0], [3, 0]])))  # one category throughout
    assert np.isnan(fleiss_kappa(np.zeros((0, 4))))
    with pytest.raises(ValueError, match="same number of ratings"):
        fleiss_kappa(np.array([[2, 0], [1, 2]]))
    with pytest.raises(ValueError, match="at least two"):
        fleiss_kappa(np.array([[1, 0], [0, 1]]))


# Krippendorff (2011), "Computing Krippendorff's alpha-reliability", nominal example: alpha = 0.743.
KRIPPENDORFF_EXAMPLE = np.array([  # observers x units, NaN = not coded
    [1, 2, 3, 3, 2, 1, 4, 1, 2, np.nan, np.nan, np.nan],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, np.nan, 3],
    [np.nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, np.nan],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, np.nan],
])


def test_krippendorff_alpha_textbook_example():
    items_by_raters = KRIPPENDORFF_EXAMPLE.T
    assert krippendorff_alpha(items_by_raters) == pytest.approx(0.743, abs=5e-4)
    expected = krippendorff.alpha(reliability_data=KRIPPENDORFF_EXAMPLE, level_of_measurement="nominal")
    assert krippendorff_alpha(items_by_raters) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_krippendorff_alpha_matches_the_krippendorff_package(seed):
    rng = np.random.default_rng(200 + seed)
    labels = noisy_labels(rng, 120, 2 + seed, n_categories=3 + seed % 2, noise=0.2 + 0.1 * seed, missing=0.3)
    expected = krippendorff.alpha(reliability_data=labels.T, level_of_measurement="nominal",
                                  value_domain=list(range(3 + seed % 2)))
    assert krippendorff_alpha(labels) == pytest.approx(expected, abs=1e-12)


def test_krippendorff_alpha_edge_cases():
    assert krippendorff_alpha(np.array([[0, 0, np.nan], [1, np.nan, 1], [2, 2, 2]])) == pytest.approx(1.0)
    assert np.isnan(krippendorff_alpha(np.array([[1, 1], [1, 1]])))  # one value throughout: undefined
    assert np.isnan(krippendorff_alpha(np.array([[0, np.nan], [np.nan, 1]])))  # nothing pairable
    assert np.isnan(krippendorff_alpha_from_counts(np.zeros((0, 3))))


def test_with_two_raters_and_no_missing_values_alpha_is_close_to_fleiss_and_cohen():
    # A sanity relation, not a definition: for two raters alpha = kappa-like up to a small-sample correction.
    rng = np.random.default_rng(3)
    labels = noisy_labels(rng, 2000, 2, n_categories=3, noise=0.4)
    alpha = krippendorff_alpha(labels)
    assert alpha == pytest.approx(fleiss_kappa(category_counts(labels)), abs=1e-3)
    assert alpha == pytest.approx(cohen_kappa(labels[:, 0], labels[:, 1]), abs=5e-3)
