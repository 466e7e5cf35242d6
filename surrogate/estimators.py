"""Surrogate models over concept scores, as scikit-learn estimators.

Both surrogates accept hard labels (``y`` of shape (n,)) or soft targets (``y`` of shape (n, K): rows
are the teacher's temperature-softened probabilities). Soft targets are fitted exactly by weighted
replication: each image becomes K rows, one per class, weighted by the class probability. For the tree
this makes every impurity the soft-target impurity; for the logistic model it makes the loss the soft
cross-entropy ``-sum_i sum_k p_ik log q_k(x_i)``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.tree import DecisionTreeClassifier
from sklearn.utils.validation import check_is_fitted, validate_data

SOFT_EPS = 1e-6


def _targets(estimator, X, y, sample_weight):
    """Validate X and y; return X, soft target matrix P (n, K), and per-image weights."""
    if isinstance(y, pd.DataFrame):
        classes = np.asarray(y.columns)
        y = y.to_numpy(dtype=float)
    else:
        classes = None
    y_arr = np.asarray(y)
    if y_arr.ndim == 2 and y_arr.shape[1] > 1 and np.issubdtype(y_arr.dtype, np.floating):
        X = validate_data(estimator, X, reset=True)
        P = np.asarray(y_arr, dtype=float)
        if P.shape[0] != X.shape[0]:
            raise ValueError(f"y has {P.shape[0]} rows, X has {X.shape[0]}")
        if (P < -1e-9).any() or not np.allclose(P.sum(1), 1, atol=1e-4):
            raise ValueError("soft targets must be non-negative and each row must sum to 1")
        estimator.classes_ = classes if classes is not None else np.arange(P.shape[1])
    else:
        X, y_arr = validate_data(estimator, X, y, reset=True)
        from sklearn.utils.multiclass import check_classification_targets
        check_classification_targets(y_arr)
        estimator.classes_, idx = np.unique(y_arr, return_inverse=True)
        P = np.zeros((len(idx), len(estimator.classes_)))
        P[np.arange(len(idx)), idx] = 1.0
    w = np.ones(X.shape[0]) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    if w.shape != (X.shape[0],) or (w < 0).any() or not (w > 0).any():
        raise ValueError("sample_weight: expected one non-negative weight per row, not all of them zero")
    return X, P, w


def _replicate(X, P, w):
    """Rows (x_i, k) with weight w_i * p_ik, dropping weights below SOFT_EPS."""
    n, K = P.shape
    W = P * w[:, None]
    i, k = np.nonzero(W > SOFT_EPS)
    return X[i], k, W[i, k]


def _soft_score(estimator, X, y):
    """Top-1 agreement with ``y`` (labels, or the argmax of soft targets)."""
    y = np.asarray(y.to_numpy() if isinstance(y, pd.DataFrame) else y)
    if y.ndim == 2 and y.shape[1] > 1:
        y = estimator.classes_[y.argmax(1)]
    return float(np.mean(estimator.predict(X) == y))


class TreeSurrogate(ClassifierMixin, BaseEstimator):
    """A decision tree fitted to a teacher's (soft) outputs over concept scores.

    Parameters
    ----------
    max_depth : int or None, default=4
    max_leaves : int or None, default=None
        Maximum number of leaves (best-first growth when set).
    min_weight_fraction_leaf : float, default=0.0
        Minimum fraction of the total (soft) weight in a leaf.
    ccp_alpha : float, default=0.0
        Cost-complexity pruning strength.
    random_state : int, default=0

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Concept names, when ``X`` is a DataFrame.
    tree_ : TreeArrays
        Node arrays (see :class:`surrogate.treeview.TreeArrays`).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[0.1], [0.2], [0.8], [0.9]])
    >>> P = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    >>> TreeSurrogate(max_depth=1).fit(X, P).predict(X).tolist()
    [0, 0, 1, 1]
    """

    def __init__(self, *, max_depth=4, max_leaves=None, min_weight_fraction_leaf=0.0, ccp_alpha=0.0,
                 random_state=0):
        self.max_depth = max_depth
        self.max_leaves = max_leaves
        self.min_weight_fraction_leaf = min_weight_fraction_leaf
        self.ccp_alpha = ccp_alpha
        self.random_state = random_state

    def fit(self, X, y, sample_weight=None):
        """Fit to concept scores ``X`` (n, k) and labels (n,) or soft targets (n, K)."""
        from .treeview import TreeArrays
        X, P, w = _targets(self, X, y, sample_weight)
        Xr, kr, wr = _replicate(X, P, w)
        tree = DecisionTreeClassifier(max_depth=self.max_depth, max_leaf_nodes=self.max_leaves,
                                      min_weight_fraction_leaf=self.min_weight_fraction_leaf,
                                      ccp_alpha=self.ccp_alpha, random_state=self.random_state)
        tree.fit(Xr, kr, sample_weight=wr)
        self.tree_ = TreeArrays.from_sklearn(tree, n_classes=P.shape[1])
        return self

    def cost_complexity_pruning_path(self, X, y, sample_weight=None) -> np.ndarray:
        """Effective alphas of minimal cost-complexity pruning for this tree's settings on (soft) targets.

        Each alpha, passed as ``ccp_alpha``, gives the next smaller subtree of the unpruned tree
        (Breiman et al. 1984); the same replication as :meth:`fit` makes them soft-target alphas.
        """
        X, P, w = _targets(clone(self), X, y, sample_weight)
        Xr, kr, wr = _replicate(X, P, w)
        tree = DecisionTreeClassifier(max_depth=self.max_depth, max_leaf_nodes=self.max_leaves,
                                      min_weight_fraction_leaf=self.min_weight_fraction_leaf,
                                      random_state=self.random_state)
        return tree.cost_complexity_pruning_path(Xr, kr, sample_weight=wr).ccp_alphas

    def apply(self, X) -> np.ndarray:
        """Index of the leaf each row ends in."""
        check_is_fitted(self, "tree_")
        X = validate_data(self, X, reset=False)
        return self.tree_.apply(X)

    def predict_proba(self, X) -> np.ndarray:
        """Class proportions of the (soft) training weight in each row's leaf, shape (n, K)."""
        check_is_fitted(self, "tree_")
        X = validate_data(self, X, reset=False)
        return self.tree_.value[self.tree_.apply(X)]

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self, "tree_")
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def score(self, X, y, sample_weight=None):
        """Top-1 agreement with labels, or with the argmax of soft targets (fidelity)."""
        return _soft_score(self, X, y)

    @property
    def depth_(self) -> int:
        check_is_fitted(self, "tree_")
        return self.tree_.depth

    @property
    def n_leaves_(self) -> int:
        check_is_fitted(self, "tree_")
        return self.tree_.n_leaves

    def feature_importances(self) -> np.ndarray:
        """Weighted impurity decrease per concept, normalised to sum to 1 (0 for an unsplit tree)."""
        check_is_fitted(self, "tree_")
        return self.tree_.importances(self.n_features_in_)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = False
        return tags


class LinearSurrogate(ClassifierMixin, BaseEstimator):
    """A sparse multinomial logistic model fitted to a teacher's (soft) outputs over concept scores.

    Inputs are transformed, then standardised: ``z = (t(x) - mean) / scale`` with ``t`` the logit
    ``log(x / (1 - x))`` of scores clipped to ``[eps, 1 - eps]`` when ``input_transform="logit"`` (or when
    ``"auto"`` and every training score lies in [0, 1]), else the identity. Probabilities are
    ``softmax(z @ coef_.T + intercept_)``.

    Parameters
    ----------
    C : float, default=1.0
        Inverse regularisation strength.
    l1_ratio : float, default=1.0
        Elastic-net mixing (1 = lasso, 0 = ridge).
    input_transform : {"auto", "logit", "none"}, default="auto"
    eps : float, default=1e-3
        Clipping for the logit transform.
    max_iter : int, default=3000
    tol : float, default=1e-4
        Stopping tolerance of the saga solver (smaller: closer to the optimum, slower).
    random_state : int, default=0

    Attributes
    ----------
    coef_ : ndarray of shape (n_classes, n_features)
        Weights per standardised (transformed) concept unit.
    intercept_ : ndarray of shape (n_classes,)
    mean_, scale_ : ndarray of shape (n_features,)
    transform_ : {"logit", "none"}
    n_iter_ : int
        Solver iterations used.
    """

    def __init__(self, *, C=1.0, l1_ratio=1.0, input_transform="auto", eps=1e-3, max_iter=3000, tol=1e-4,
                 random_state=0):
        self.C = C
        self.l1_ratio = l1_ratio
        self.input_transform = input_transform
        self.eps = eps
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    def _t(self, X):
        if self.transform_ == "logit":
            X = np.clip(X, self.eps, 1 - self.eps)
            return np.log(X / (1 - X))
        return X

    def standardise(self, X) -> np.ndarray:
        """The model's inputs ``z`` for raw concept scores ``X``."""
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, reset=False)
        return (self._t(X) - self.mean_) / self.scale_

    def fit(self, X, y, sample_weight=None):
        """Fit to concept scores ``X`` (n, k) and labels (n,) or soft targets (n, K)."""
        if self.input_transform not in ("auto", "logit", "none"):
            raise ValueError(f"input_transform={self.input_transform!r}: expected 'auto', 'logit' or 'none'")
        X, P, w = _targets(self, X, y, sample_weight)
        if self.input_transform == "auto":
            self.transform_ = "logit" if (X.min() >= 0 and X.max() <= 1) else "none"
        else:
            self.transform_ = self.input_transform
        T = self._t(X)
        self.mean_ = T.mean(0)
        self.scale_ = T.std(0)
        self.scale_[self.scale_ < 1e-12] = 1.0
        Z = (T - self.mean_) / self.scale_
        K = P.shape[1]
        Zr, kr, wr = _replicate(Z, P, w)
        present = np.unique(kr)
        if len(present) == 1:
            self.coef_ = np.zeros((K, X.shape[1]))
            self.intercept_ = np.full(K, -30.0)
            self.intercept_[present[0]] = 0.0
            self.n_iter_ = 0
            return self
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            lr = LogisticRegression(C=self.C, l1_ratio=self.l1_ratio, solver="saga", max_iter=self.max_iter,
                                    tol=self.tol, random_state=self.random_state)
            lr.fit(Zr, kr, sample_weight=wr * (len(X) / wr.sum()))
        self.n_iter_ = int(np.max(lr.n_iter_))
        coef = np.zeros((K, X.shape[1]))
        intercept = np.full(K, -30.0)
        if len(present) == 2:  # sklearn's binary parameterisation: one row for the second class
            coef[present[1]], intercept[present[1]] = lr.coef_[0], lr.intercept_[0]
            intercept[present[0]] = 0.0
        else:
            coef[present], intercept[present] = lr.coef_, lr.intercept_
        self.coef_, self.intercept_ = coef, intercept
        return self

    def decision_function(self, X) -> np.ndarray:
        """Class logits ``z @ coef_.T + intercept_``, shape (n, K)."""
        return self.standardise(X) @ self.coef_.T + self.intercept_

    def contributions(self, X) -> np.ndarray:
        """Per-concept contributions to each class logit, shape (n, K, k); they sum to logit - intercept."""
        z = self.standardise(X)
        return z[:, None, :] * self.coef_[None, :, :]

    def predict_proba(self, X) -> np.ndarray:
        d = self.decision_function(X)
        d = d - d.max(1, keepdims=True)
        e = np.exp(d)
        return e / e.sum(1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self, "coef_")
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]

    def score(self, X, y, sample_weight=None):
        """Top-1 agreement with labels, or with the argmax of soft targets (fidelity)."""
        return _soft_score(self, X, y)

    @property
    def n_nonzero_(self) -> int:
        """Concepts with a non-zero weight for at least one class."""
        check_is_fitted(self, "coef_")
        return int((np.abs(self.coef_) > 1e-10).any(0).sum())

    def feature_importances(self) -> np.ndarray:
        """Mean absolute weight per standardised concept over classes, normalised to sum to 1."""
        check_is_fitted(self, "coef_")
        imp = np.abs(self.coef_).mean(0)
        s = imp.sum()
        return imp / s if s > 0 else imp


SURROGATES = {"tree": TreeSurrogate, "linear": LinearSurrogate}
