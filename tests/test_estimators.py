"""Tests for surrogate.estimators (TreeSurrogate, LinearSurrogate) and surrogate.treeview (TreeArrays).

Contract tests run over every entry of ``SURROGATES``; property tests use hypothesis; the scikit-learn
estimator checks run on both estimators with hard labels.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from surrogate.estimators import SURROGATES, LinearSurrogate, TreeSurrogate
from surrogate.metrics import fidelity, softmax

CONCEPTS = ["fur", "whiskers", "stripes", "horns"]
CLASSES = ["cat", "tiger", "cow", "dog"]

# Every kind in SURROGATES needs a (fast) configuration here; test_configs_cover_every_surrogate fails
# when a new kind is added to SURROGATES without one, so no kind escapes the contract suite.
CONFIGS = {
    "tree": {"max_depth": 4},
    "linear": {"C": 1.0, "max_iter": 1000},
}

PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _concept_data(n=300, seed=0):
    """Concept scores in [0, 1] and teacher logits that are a function of the concepts."""
    rng = np.random.default_rng(seed)
    present = rng.random((n, 4)) < 0.5
    scores = np.clip(np.where(present, 0.8, 0.2) + rng.normal(0, 0.12, (n, 4)), 0, 1)
    X = pd.DataFrame(scores, columns=CONCEPTS)
    fur, whiskers, stripes, horns = present.T.astype(float)
    logits = np.stack([
        4 * fur * whiskers,           # cat (first priority)
        3 * stripes,                  # tiger
        2 * horns,                    # cow
        1.0 + 0 * fur,                # dog: the default
    ], 1) + rng.normal(0, 0.3, (n, 4))
    return X, logits


@pytest.fixture(scope="module")
def data():
    X, logits = _concept_data()
    P = pd.DataFrame(softmax(logits, 2.0), columns=CLASSES)
    return X, P


@pytest.fixture(scope="module", params=sorted(SURROGATES))
def fitted(request, data):
    X, P = data
    kind = request.param
    est = SURROGATES[kind](**CONFIGS.get(kind, {})).fit(X, P)
    return kind, est


def _soft(logits):
    P = np.exp(logits - logits.max(1, keepdims=True))
    return P / P.sum(1, keepdims=True)


# ----------------------------------------------------------------------------------- contract suite
def test_configs_cover_every_surrogate():
    assert set(CONFIGS) == set(SURROGATES)
    assert SURROGATES["tree"] is TreeSurrogate and SURROGATES["linear"] is LinearSurrogate


def test_predict_proba_is_a_distribution(fitted, data):
    _, est = fitted
    X, _ = data
    q = est.predict_proba(X)
    assert q.shape == (len(X), len(CLASSES))
    assert (q >= 0).all()
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-9)


def test_predict_is_argmax_of_proba(fitted, data):
    _, est = fitted
    X, _ = data
    np.testing.assert_array_equal(est.predict(X), est.classes_[est.predict_proba(X).argmax(1)])


def test_clone_and_refit_is_deterministic(fitted, data):
    _, est = fitted
    X, P = data
    again = clone(est).fit(X, P)
    np.testing.assert_array_equal(again.predict_proba(X), est.predict_proba(X))
    np.testing.assert_array_equal(again.predict(X), est.predict(X))


def test_dataframe_names(fitted):
    _, est = fitted
    assert list(est.feature_names_in_) == CONCEPTS
    assert list(est.classes_) == CLASSES
    assert est.n_features_in_ == len(CONCEPTS)


def test_soft_targets_as_ndarray_give_integer_classes(fitted, data):
    kind, est = fitted
    X, P = data
    plain = SURROGATES[kind](**CONFIGS[kind]).fit(X.to_numpy(), P.to_numpy())
    assert list(plain.classes_) == list(range(len(CLASSES)))
    assert not hasattr(plain, "feature_names_in_")
    np.testing.assert_allclose(plain.predict_proba(X.to_numpy()), est.predict_proba(X), atol=1e-12)


def test_hard_string_labels(fitted, data):
    kind, _ = fitted
    X, P = data
    y = np.asarray(CLASSES, dtype=object)[P.to_numpy().argmax(1)]
    est = SURROGATES[kind](**CONFIGS[kind]).fit(X, y)
    assert list(est.classes_) == sorted(CLASSES)
    pred = est.predict(X)
    assert set(pred) <= set(CLASSES)
    assert est.score(X, y) == pytest.approx(np.mean(pred == y))
    assert est.score(X, y) > 0.7  # cat = fur AND whiskers is not linear
    q = est.predict_proba(X)
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-9)


def test_score_with_soft_targets_is_fidelity(fitted, data):
    _, est = fitted
    X, P = data
    expected = fidelity(P.to_numpy(), est.predict_proba(X))
    assert est.score(X, P) == pytest.approx(expected)
    assert est.score(X, P.to_numpy()) == pytest.approx(expected)
    assert expected > 0.7  # easy for the tree (~0.98); cat = fur AND whiskers is harder for linear (~0.77)


def test_invalid_soft_targets_raise(fitted, data):
    kind, _ = fitted
    X, P = data
    bad = P.to_numpy() * 2
    with pytest.raises(ValueError, match="sum to 1"):
        SURROGATES[kind](**CONFIGS[kind]).fit(X, bad)
    with pytest.raises(ValueError, match="rows"):
        SURROGATES[kind](**CONFIGS[kind]).fit(X.iloc[:10], P)


# --------------------------------------------------------------------------------- property tests
def _random_problem(draw, max_n=60):
    n = draw(st.integers(8, max_n))
    k = draw(st.integers(1, 4))
    K = draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    X = rng.random((n, k))
    logits = rng.normal(0, 3, (n, K))
    return X, _soft(logits)


problems = st.composite(_random_problem)()


@PROPS
@given(problem=problems, depth=st.integers(1, 4))
def test_tree_refit_on_own_outputs_is_faithful(problem, depth):
    # Exact self-fidelity needs a tree deep enough to reproduce the first tree's partition: refitting
    # with the SAME max_depth is not exact, because greedy Gini splitting on the smoothed targets can pick
    # another root split (seen: random 2-4 class problems with depth 2 refits at fidelity 0.64-0.77, with
    # a higher total soft-Gini impurity than the first tree's partition), which is a property of greedy
    # CART, not a bug. An unlimited-depth refit can always separate the first tree's leaves (their soft
    # targets differ), so it must agree everywhere.
    X, P = problem
    first = TreeSurrogate(max_depth=depth).fit(X, P)
    Q = first.predict_proba(X)
    again = TreeSurrogate(max_depth=None).fit(X, Q)
    assert again.score(X, Q) == 1.0
    np.testing.assert_array_equal(again.predict(X), first.predict(X))


@PROPS
@given(problem=problems)
def test_linear_refit_on_own_outputs_is_faithful(problem):
    # The soft cross-entropy is minimised by the first model's own (coef, intercept) (same inputs, so the
    # same transform, mean and scale), so a weakly regularised refit (C=1e3) should recover its decisions.
    # It is not exactly 1.0: rows on the boundary flip, and LinearSurrogate runs saga with a fixed
    # tol=1e-4, which can stop after a few epochs on small, flat problems (seen: n=49, one concept, two
    # classes: the refit intercept was -0.648 instead of -0.561 after 4 epochs; tol=1e-8 or lbfgs recover
    # -0.561), flipping rows whose top-two probabilities are up to ~0.05 apart. So: every disagreement must
    # be close to the boundary (top-two gap < 0.15), and overall fidelity must stay high.
    X, P = problem
    first = LinearSurrogate(C=10.0).fit(X, P)
    Q = first.predict_proba(X)
    again = LinearSurrogate(C=1e3).fit(X, Q)
    top2 = np.sort(Q, 1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    differ = again.predict(X) != first.predict(X)
    assert (gap[differ] < 0.15).all(), gap[differ]
    assert again.score(X, Q) >= 0.85
    # with the solver run to convergence (tol is a parameter), the refit agrees everywhere but on near-ties
    exact = LinearSurrogate(C=1e4, tol=1e-8, max_iter=20000).fit(X, Q)
    differ = exact.predict(X) != first.predict(X)
    assert (gap[differ] < 1e-2).all(), gap[differ]


def test_linear_refit_on_own_outputs_fixed_data(data):
    X, P = data
    first = LinearSurrogate(C=10.0).fit(X, P)
    Q = first.predict_proba(X)
    assert LinearSurrogate(C=1e3).fit(X, Q).score(X, Q) >= 0.98


@PROPS
@given(problem=problems, kind=st.sampled_from(sorted(SURROGATES)),
       rows=arrays(np.float64, (5, 4), elements=st.floats(-3, 3, allow_nan=False)))
def test_probabilities_sum_to_one_for_random_inputs(problem, kind, rows):
    X, P = problem
    est = SURROGATES[kind](**CONFIGS[kind]).fit(X, P)
    Z = rows[:, : X.shape[1]]
    q = est.predict_proba(Z)
    assert np.isfinite(q).all() and (q >= 0).all()
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-9)


@PROPS
@given(problem=problems, depth=st.sampled_from([1, 2, 3, None]),
       rows=arrays(np.float64, (20, 4), elements=st.floats(0, 1, allow_nan=False)))
def test_treearrays_apply_matches_decision_path(problem, depth, rows):
    X, P = problem
    est = TreeSurrogate(max_depth=depth).fit(X, P)
    Z = np.vstack([X, rows[:, : X.shape[1]]])
    leaves = est.tree_.apply(Z)
    np.testing.assert_array_equal(leaves, est.apply(Z))
    for x, leaf in zip(Z, leaves):
        path = est.tree_.decision_path(x)
        assert path[-1] == leaf
        assert est.tree_.is_leaf(leaf)
        assert path[0] == 0
        for node, nxt in zip(path[:-1], path[1:]):
            f, t = est.tree_.feature[node], est.tree_.threshold[node]
            assert nxt == (est.tree_.children_left[node] if x[f] <= t else est.tree_.children_right[node])
    paths = est.tree_.leaf_paths()
    assert set(paths) == set(np.nonzero(est.tree_.children_left == -1)[0])
    assert len(paths) == est.n_leaves_


# ------------------------------------------------------------------------------------------- linear
@PROPS
@given(problem=problems, transform=st.sampled_from(["logit", "none", "auto"]),
       rows=arrays(np.float64, (6, 4), elements=st.floats(0, 1, allow_nan=False)))
def test_linear_contributions_sum_to_decision_function(problem, transform, rows):
    X, P = problem
    est = LinearSurrogate(C=1.0, input_transform=transform).fit(X, P)
    Z = rows[:, : X.shape[1]]
    c = est.contributions(Z)
    assert c.shape == (len(Z), P.shape[1], X.shape[1])
    np.testing.assert_allclose(c.sum(-1) + est.intercept_, est.decision_function(Z), rtol=1e-9, atol=1e-9)


def test_linear_sparsity_grows_as_C_decreases():
    rng = np.random.default_rng(0)
    n = 300
    X = rng.random((n, 8))  # only concepts 0-3 matter
    logits = np.stack([4 * X[:, 0], 4 * X[:, 1] + 2 * X[:, 2], 3 * X[:, 3]], 1) + rng.normal(0, 0.3, (n, 3))
    P = _soft(logits)
    counts = [LinearSurrogate(C=C).fit(X, P).n_nonzero_ for C in (100.0, 1.0, 0.1, 0.03, 0.001)]
    assert counts == sorted(counts, reverse=True), counts
    assert counts[0] == 8 and counts[-1] == 0
    assert LinearSurrogate(C=0.001).fit(X, P).feature_importances().sum() == 0


def test_linear_input_transforms(data):
    X, P = data
    logit = LinearSurrogate(input_transform="logit").fit(X, P)
    none = LinearSurrogate(input_transform="none").fit(X, P)
    auto = LinearSurrogate().fit(X, P)
    assert (logit.transform_, none.transform_, auto.transform_) == ("logit", "none", "logit")
    for est in (logit, none):
        assert est.score(X, P) > 0.7
        np.testing.assert_allclose(est.predict_proba(X).sum(1), 1.0)
    # standardise() applies the transform then the training mean/scale
    x = X.to_numpy()
    clipped = np.clip(x, logit.eps, 1 - logit.eps)
    np.testing.assert_allclose(logit.standardise(X), (np.log(clipped / (1 - clipped)) - logit.mean_) / logit.scale_)
    np.testing.assert_allclose(none.standardise(X), (x - none.mean_) / none.scale_)
    # "auto" keeps raw values for scores outside [0, 1]
    assert LinearSurrogate().fit(X * 4 - 2, P).transform_ == "none"


def test_linear_invalid_transform_raises(data):
    X, P = data
    with pytest.raises(ValueError, match="input_transform"):
        LinearSurrogate(input_transform="sqrt").fit(X, P)


def test_linear_binary_and_single_class_targets():
    rng = np.random.default_rng(1)
    X = rng.random((80, 3))
    y = np.where(X[:, 0] > 0.5, "b", "a")
    est = LinearSurrogate(C=100).fit(X, y)
    assert est.coef_.shape == (2, 3) and est.score(X, y) > 0.9
    one = LinearSurrogate().fit(X, np.full(80, "a"))
    assert (one.predict(X) == "a").all()
    # soft targets in which one of three classes never appears: it gets (almost) no probability
    P = np.zeros((80, 3))
    P[:, 0] = X[:, 0]
    P[:, 2] = 1 - X[:, 0]
    est3 = LinearSurrogate(C=100).fit(X, P)
    assert est3.predict_proba(X)[:, 1].max() < 1e-9


# --------------------------------------------------------------------------------------------- tree
def test_tree_leaf_values_are_mean_soft_targets(data):
    X, P = data
    est = TreeSurrogate(max_depth=6).fit(X, P)
    leaves = est.apply(X)
    Pn = P.to_numpy()
    for leaf in np.unique(leaves):
        rows = leaves == leaf
        np.testing.assert_allclose(est.tree_.value[leaf], Pn[rows].mean(0), atol=1e-5)
        assert est.tree_.weight[leaf] == pytest.approx(rows.mean(), abs=1e-5)
    # internal nodes too: the root holds the overall mean and all the weight
    np.testing.assert_allclose(est.tree_.value[0], Pn.mean(0), atol=1e-5)
    assert est.tree_.weight[0] == 1.0
    np.testing.assert_allclose(est.tree_.impurity, 1 - (est.tree_.value ** 2).sum(1))


@PROPS
@given(problem=problems)
def test_tree_leaf_values_are_mean_soft_targets_property(problem):
    X, P = problem
    est = TreeSurrogate(max_depth=None).fit(X, P)
    leaves = est.apply(X)
    for leaf in np.unique(leaves):
        np.testing.assert_allclose(est.tree_.value[leaf], P[leaves == leaf].mean(0), atol=1e-5)


def test_tree_sample_weight_weights_the_leaf_means():
    X = np.array([[0.1], [0.2], [0.8], [0.9]])
    P = np.array([[0.9, 0.1], [0.5, 0.5], [0.3, 0.7], [0.1, 0.9]])
    w = np.array([1.0, 3.0, 1.0, 1.0])
    est = TreeSurrogate(max_depth=1).fit(X, P, sample_weight=w)
    leaves = est.apply(X)
    assert est.n_leaves_ == 2
    for leaf in np.unique(leaves):
        m = leaves == leaf
        np.testing.assert_allclose(est.tree_.value[leaf], (P[m] * w[m, None]).sum(0) / w[m].sum())
        assert est.tree_.weight[leaf] == pytest.approx(w[m].sum() / w.sum())


@pytest.mark.parametrize("max_leaves", [2, 3, 5, 8])
def test_tree_max_leaves(data, max_leaves):
    X, P = data
    est = TreeSurrogate(max_depth=None, max_leaves=max_leaves).fit(X, P)
    assert est.n_leaves_ == max_leaves  # plenty of data: the limit is reached
    assert est.depth_ <= max_leaves - 1


def test_tree_feature_importances(data):
    X, P = data
    est = TreeSurrogate(max_depth=4).fit(X, P)
    imp = est.feature_importances()
    assert imp.shape == (len(CONCEPTS),)
    assert (imp >= 0).all() and imp.sum() == pytest.approx(1.0)
    assert imp[CONCEPTS.index("horns")] > 0 and imp[CONCEPTS.index("stripes")] > 0
    stump = TreeSurrogate().fit(X, np.full(len(X), "cat"))
    assert stump.n_leaves_ == 1 and stump.depth_ == 0
    assert stump.feature_importances().sum() == 0.0
    assert (stump.predict(X) == "cat").all()


def test_tree_depth_and_ccp(data):
    X, P = data
    deep = TreeSurrogate(max_depth=8).fit(X, P)
    pruned = TreeSurrogate(max_depth=8, ccp_alpha=0.01).fit(X, P)
    assert deep.depth_ <= 8
    assert pruned.n_leaves_ <= deep.n_leaves_


# ----------------------------------------------------------------------------- scikit-learn checks
_LINEAR_XFAIL = {
    "check_classifiers_train":
        "decision_function returns (n, K) per-class logits even for two classes (contributions and explain "
        "rely on that shape); sklearn expects (n,) for binary problems",
    "check_classifiers_classes":
        "decision_function returns (n, K) per-class logits even for two classes; sklearn expects (n,)",
    "check_sample_weight_equivalence_on_dense_data":
        "sample weights are rescaled to sum to n_samples before LogisticRegression (so C means the same "
        "for soft-target replication and any weight scale); integer weights are therefore not equivalent "
        "to repeating rows",
}
_COMMON_XFAIL: dict[str, str] = {}


def _expected_failed(estimator):
    out = dict(_COMMON_XFAIL)
    if isinstance(estimator, LinearSurrogate):
        out.update(_LINEAR_XFAIL)
    return out


@parametrize_with_checks([TreeSurrogate(), LinearSurrogate()], expected_failed_checks=_expected_failed)
def test_sklearn_compatible(estimator, check):
    check(estimator)
