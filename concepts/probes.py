"""Linear concept probes (CAVs): one logistic probe per concept and layer, with held-out quality.

A probe maps a pooled activation vector ``a`` to a margin ``m = w · (a - mu) / sigma + b`` and a score
``p = 1 / (1 + exp(-m))`` (the probability that the concept is present). Its concept activation
vector (CAV) in raw activation space is ``w / sigma``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from .errors import InputError, NotFittedError

QUALITY_COLUMNS = ["concept", "layer", "auc", "accuracy", "n_pos", "n_neg", "tcav_score", "p_value", "significant"]
C_GRID = (0.01, 0.1, 1.0, 10.0)
_STATE_KEYS = ("mean", "scale", "coef", "intercept", "runs_real", "runs_null", "pu_scale")
MAX_CONTAMINATION = 0.95
# positives whose out-of-fold score reaches this quantile stand for "clear" positives in the contamination
# estimate: the mean (Elkan & Noto's e1) is pulled down by ambiguous positives and overestimates
# contamination (measured on the toy zoo: +0.10 on average, against -0.06 with the upper quartile)
CLEAR_POSITIVE_QUANTILE = 0.75


@dataclass
class _LayerProbes:
    mean: np.ndarray      # (d,)
    scale: np.ndarray     # (d,)
    coef: np.ndarray      # (k, d) in standardised units
    intercept: np.ndarray  # (k,)
    runs_real: np.ndarray  # (k, R, d) unit CAVs fitted on subsamples (raw activation space)
    runs_null: np.ndarray  # (k, R, d) unit CAVs fitted with shuffled labels (random-vs-random)
    pu_scale: np.ndarray   # (k,) pi / r for probes fitted against a random (unlabelled) set, 0 otherwise

    def margins(self, acts: np.ndarray) -> np.ndarray:
        z = (np.asarray(acts, dtype=np.float64) - self.mean) / self.scale
        return z @ self.coef.T + self.intercept

    def log_odds(self, acts: np.ndarray) -> np.ndarray:
        """Log-odds that each concept is present; positive-unlabelled probes are corrected (see fit)."""
        m = self.margins(acts)
        pu = self.pu_scale > 0
        if pu.any():
            log_p = np.minimum(np.log(np.where(pu, self.pu_scale, 1.0)) + m, np.log1p(-1e-6))
            m = np.where(pu, log_p - np.log(-np.expm1(log_p)), m)
        return m


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _fit_logistic(x, y, C, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(x, y)


def _oof_margins(x, y, C, seed, folds) -> np.ndarray:
    """Out-of-fold decision values of a logistic probe (stratified ``folds``-fold cross-validation)."""
    out = np.zeros(len(y))
    for tr, te in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y):
        out[te] = _fit_logistic(x[tr], y[tr], C, seed).decision_function(x[te])
    return out


def _ridge_oof_auc(x, Y, folds, seed, alpha) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold AUC of ridge probes for every label column of ``Y`` (n, m), and their full-data weights (d, m)."""
    strat = Y[:, 0]
    pred = np.zeros(Y.shape, dtype=float)
    eye = alpha * np.eye(x.shape[1])
    for tr, te in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, strat):
        xm, ym = x[tr].mean(0), Y[tr].mean(0)
        W = np.linalg.solve((x[tr] - xm).T @ (x[tr] - xm) + eye, (x[tr] - xm).T @ (Y[tr] - ym))
        pred[te] = (x[te] - xm) @ W
    auc = np.array([roc_auc_score(Y[:, i], pred[:, i]) for i in range(Y.shape[1])])
    xm = x - x.mean(0)
    return auc, np.linalg.solve(xm.T @ xm + eye, xm.T @ (Y - Y.mean(0)))


def _fold_directions(x, y, C, seed, folds, runs) -> list[np.ndarray]:
    """``runs`` CAVs (coefficients) of logistic probes fitted on random 80% subsamples."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for _ in range(runs):
        sub = rng.choice(len(x), size=max(4, int(0.8 * len(x))), replace=False)
        if len(np.unique(y[sub])) < 2:
            sub = np.arange(len(x))
        out.append(_fit_logistic(x[sub], y[sub], C, seed).coef_[0])
    return out


def _choose_C(x, y, seed) -> float:
    """Regularisation by 3-fold cross-validated log-loss over :data:`C_GRID`."""
    n_splits = int(min(3, np.bincount(y).min()))
    if n_splits < 2:
        return 1.0
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    best, best_loss = 1.0, np.inf
    for C in C_GRID:
        loss = 0.0
        for tr, te in cv.split(x, y):
            p = np.clip(_fit_logistic(x[tr], y[tr], C, seed).predict_proba(x[te])[:, 1], 1e-7, 1 - 1e-7)
            loss += -np.mean(y[te] * np.log(p) + (1 - y[te]) * np.log(1 - p))
        if loss < best_loss - 1e-9:
            best, best_loss = C, loss
    return best


def null_p_value(observed: float, null: np.ndarray) -> float:
    """Two-sided p-value of ``observed`` as a new draw from the null sample (t prediction interval).

    ``t = (observed - mean(null)) / (sd(null) * sqrt(1 + 1/K))`` with ``K - 1`` degrees of freedom,
    ``p = 2 * (1 - F_t(|t|))``.
    """
    null = np.asarray(null, dtype=float)
    k = len(null)
    sd = null.std(ddof=1) if k > 1 else 0.0
    if sd == 0:
        return 0.0 if observed != null.mean() else 1.0
    t = (observed - null.mean()) / (sd * np.sqrt(1 + 1 / k))
    return float(2 * stats.t.sf(abs(t), df=k - 1))


class ConceptProbes:
    """Linear concept probes over pooled layer activations.

    Each probe's held-out ranking accuracy (out-of-fold AUC against its own labels, of a ridge probe of
    the same standardised activations) is tested against ``random_runs`` ridge probes fitted to the same
    images with
    shuffled labels (random-vs-random); ``p_value`` is :func:`null_p_value` and ``significant`` requires
    ``p_value < alpha / (n_concepts * n_layers)`` (Bonferroni) and an AUC above 0.5. AUC rather than
    plain accuracy: against a random set that holds the concept by chance, or with unbalanced classes, a
    probe that separates well can still have the accuracy of always answering "absent".

    Parameters
    ----------
    test_size : float, default=0.25
        Share of the images each cross-validation fold holds out (``round(1 / test_size)`` folds): AUC and
        accuracy are those of out-of-fold scores, every image scored by a probe not fitted on it.
    random_runs : int, default=10
        Number of random-label probes per concept and layer that form the null for ``p_value``.
    alpha : float, default=0.05
        Family-wise significance level (Bonferroni over concepts and layers).
    random_state : int, default=0

    Attributes
    ----------
    concepts_ : list of str
    layers_ : list of str
    layer_ : str
        The layer used by :meth:`transform` (best mean held-out AUC unless set by the caller).
    quality_ : DataFrame
        One row per (concept, layer) with the columns of ``quality.csv``.
    C_ : dict of (str, str) to float
        Regularisation chosen per (concept, layer).
    """

    def __init__(self, *, test_size: float = 0.25, random_runs: int = 10, alpha: float = 0.05,
                 random_state: int = 0):
        self.test_size = test_size
        self.random_runs = random_runs
        self.alpha = alpha
        self.random_state = random_state

    def fit(self, acts: dict[str, np.ndarray], labels: pd.DataFrame, *, random_negatives: bool = False) -> ConceptProbes:
        """Fit one probe per concept (column of ``labels``) and layer (key of ``acts``); see :meth:`_fit`."""
        # many small fits: a multi-threaded BLAS only adds overhead (and oversubscribes a busy machine)
        with threadpool_limits(1):
            return self._fit(acts, labels, random_negatives)

    def _fit(self, acts: dict[str, np.ndarray], labels: pd.DataFrame, random_negatives: bool) -> ConceptProbes:
        """Fit one probe per concept (column of ``labels``) and layer (key of ``acts``).

        With ``random_negatives`` the 0 labels come from a random set (TCAV's ``random/``), which holds
        the concept by chance: positive-unlabelled learning (case-control, Elkan & Noto 2008). A probe ``g``
        of labelled positives (``n_P``) against the random set (``n_U``) has odds ``r * p(x|concept) / p(x)``
        with ``r = n_P / n_U``; on clear positives that is ``r / pi`` with ``pi`` the share of the random set
        holding the concept, so ``pi = r * (1 - c) / c`` with ``c`` the upper quartile of ``g`` over
        out-of-fold positives (:data:`CLEAR_POSITIVE_QUANTILE`).
        The quality table then reports ``contamination = pi``, ``auc_raw`` (positives vs random set) and
        ``auc = (auc_raw - pi / 2) / (1 - pi)`` (a positive in the random set ties with the positives on
        average), and scores are ``P(concept | x) = min(1, pi * odds(x) / r)``.

        Parameters
        ----------
        acts : dict of str to ndarray of shape (n_images, d)
        labels : DataFrame of shape (n_images, n_concepts)
            1 = concept present, 0 = absent, NaN = unknown (row unused for that concept).
        """
        if not (0 < self.test_size < 1):
            raise InputError(f"test_size {self.test_size}: expected a fraction in (0, 1)")
        self.concepts_ = [str(c) for c in labels.columns]
        self.layers_ = list(acts)
        seed = self.random_state
        rng = np.random.default_rng(seed)
        self._probes: dict[str, _LayerProbes] = {}
        self.C_ = {}
        rows = []
        for layer, a in acts.items():
            a = np.asarray(a, dtype=np.float64)
            mean = a.mean(0)
            scale = a.std(0)
            scale[scale < 1e-8] = 1.0
            z = (a - mean) / scale
            coef = np.zeros((len(self.concepts_), a.shape[1]))
            intercept = np.zeros(len(self.concepts_))
            runs_real = np.zeros((len(self.concepts_), self.random_runs, a.shape[1]))
            runs_null = np.zeros_like(runs_real)
            pu_scale = np.zeros(len(self.concepts_))
            for j, concept in enumerate(self.concepts_):
                col = labels[concept].to_numpy(dtype=float)
                known = ~np.isnan(col)
                x, y = z[known], col[known].astype(int)
                n_pos, n_neg = int(y.sum()), int((1 - y).sum())
                if n_pos < 2 or n_neg < 2:
                    raise InputError(f"concept '{concept}': {n_pos} positive and {n_neg} negative examples; "
                                     "need at least 2 of each")
                folds = int(min(max(2, round(1 / self.test_size)), n_pos, n_neg))
                C = _choose_C(x, y, seed)
                oof = _oof_margins(x, y, C, seed, folds)  # every image scored by a probe not fitted on it
                auc_raw = float(roc_auc_score(y, oof))
                acc = float(((oof > 0).astype(int) == y).mean())
                auc, contamination = auc_raw, float("nan")
                if random_negatives:
                    c = float(np.quantile(1 / (1 + np.exp(-oof[y == 1])), CLEAR_POSITIVE_QUANTILE))
                    contamination = float(np.clip(n_pos / n_neg * (1 - c) / max(c, 1e-6), 0.0, MAX_CONTAMINATION))
                    auc = float(np.clip((auc_raw - contamination / 2) / (1 - contamination), 0.0, 1.0))
                # random-vs-random null: the same images with shuffled labels. The test statistic is the
                # out-of-fold AUC of a ridge probe, for the labels and R permutations at once (one solve per
                # fold serves every permutation); its solutions for the permutations are the null CAVs.
                perms = np.stack([y] + [rng.permutation(y) for _ in range(self.random_runs)], axis=1)
                ridge_auc, ridge_dirs = _ridge_oof_auc(x, perms, folds, seed, alpha=1.0 / C)
                null = ridge_auc[1:]
                null_dirs = list(ridge_dirs[:, 1:].T)
                real_dirs = _fold_directions(x, y, C, seed, folds, self.random_runs)
                runs_real[j] = _unit(np.array(real_dirs).reshape(-1, a.shape[1]) / scale)
                runs_null[j] = _unit(np.array(null_dirs).reshape(-1, a.shape[1]) / scale)
                p_value = null_p_value(float(ridge_auc[0]), null) if self.random_runs >= 2 else float("nan")
                final = _fit_logistic(x, y, C, seed)  # the probe used downstream sees every labelled image
                coef[j], intercept[j] = final.coef_[0], final.intercept_[0]
                if random_negatives:
                    pu_scale[j] = max(contamination, 1e-3) * n_neg / n_pos
                self.C_[(concept, layer)] = C
                rows.append({"concept": concept, "layer": layer, "auc": auc, "accuracy": acc,
                             "n_pos": n_pos, "n_neg": n_neg, "tcav_score": np.nan, "p_value": p_value,
                             "auc_raw": auc_raw, "contamination": contamination})
            self._probes[layer] = _LayerProbes(mean, scale, coef, intercept, runs_real, runs_null, pu_scale)
        q = pd.DataFrame(rows, columns=QUALITY_COLUMNS[:-1] + ["auc_raw", "contamination"])
        n_tests = max(1, len(q))
        q["significant"] = (q["p_value"] < self.alpha / n_tests) & (q["auc_raw"] > 0.5)
        # the probe's own test, kept when TCAV results later take over p_value/significant (--target)
        q["probe_p_value"] = q["p_value"]
        q["probe_significant"] = q["significant"]
        self.quality_ = q[QUALITY_COLUMNS + ["probe_p_value", "probe_significant", "auc_raw", "contamination"]]
        self.layer_ = str(q.groupby("layer", sort=False)["auc"].mean().idxmax())
        return self

    def significant_concepts(self, layer: str | None = None) -> list[str]:
        """Concepts whose probe at ``layer`` beats random-vs-random probes (``probe_significant``), in order.

        Without a quality table (or that column) every concept counts as significant.
        """
        layer = self._layer(layer)
        q = getattr(self, "quality_", None)
        if q is None or "probe_significant" not in q:
            return list(self.concepts_)
        q = q[q["layer"] == layer]
        ok = {str(c) for c, sig in zip(q["concept"], q["probe_significant"]) if bool(sig)}
        return [c for c in self.concepts_ if c in ok]

    def _check(self):
        if not hasattr(self, "_probes"):
            raise NotFittedError("ConceptProbes is not fitted yet; call fit(acts, labels) first")

    def _layer(self, layer):
        self._check()
        layer = self.layer_ if layer is None else layer
        if layer not in self._probes:
            raise InputError(f"layer '{layer}': the probes were fitted on {', '.join(self._probes)}")
        return layer

    def _acts(self, acts, layer):
        return acts[layer] if isinstance(acts, dict) else acts

    def decision_function(self, acts, layer: str | None = None) -> pd.DataFrame:
        """Signed margins (log-odds that each concept is present), columns named by concept."""
        layer = self._layer(layer)
        return pd.DataFrame(self._probes[layer].log_odds(self._acts(acts, layer)), columns=self.concepts_)

    def transform(self, acts, layer: str | None = None) -> pd.DataFrame:
        """Concept scores in [0, 1] (probability the concept is present), shape (n_images, n_concepts).

        Parameters
        ----------
        acts : dict of str to ndarray, or ndarray of shape (n_images, d)
        layer : str, optional
            Default: :attr:`layer_`.
        """
        m = self.decision_function(acts, layer)
        return 1.0 / (1.0 + np.exp(-m.clip(-50, 50)))

    def cavs(self, layer: str | None = None) -> np.ndarray:
        """Unit-norm concept activation vectors in raw activation space, shape (n_concepts, d)."""
        layer = self._layer(layer)
        p = self._probes[layer]
        return _unit(p.coef / p.scale)

    def cav_runs(self, layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per concept, ``random_runs`` CAVs on subsamples and as many random-vs-random (shuffled-label)
        CAVs, each of shape (n_concepts, random_runs, d): the inputs of TCAV's significance test."""
        layer = self._layer(layer)
        p = self._probes[layer]
        return p.runs_real, p.runs_null

    # ---------------------------------------------------------------- persistence
    def to_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able metadata, arrays) describing the fitted probes."""
        self._check()
        arrays = {}
        for i, p in enumerate(self._probes.values()):
            for key in _STATE_KEYS:
                arrays[f"l{i}_{key}"] = getattr(p, key)
        meta = {"concepts": self.concepts_, "layers": list(self._probes), "layer": self.layer_,
                "params": {"test_size": self.test_size, "random_runs": self.random_runs, "alpha": self.alpha,
                           "random_state": self.random_state}}
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays) -> ConceptProbes:
        self = cls(**meta["params"])
        self.concepts_ = list(meta["concepts"])
        self.layers_ = list(meta["layers"])
        self.layer_ = meta["layer"]
        self._probes = {}
        for i, layer in enumerate(self.layers_):
            values = {k: np.asarray(arrays[f"l{i}_{k}"], dtype=np.float64) for k in _STATE_KEYS
                      if f"l{i}_{k}" in arrays}
            values.setdefault("pu_scale", np.zeros(len(self.concepts_)))
            self._probes[layer] = _LayerProbes(**values)
        return self

    def select(self, concepts) -> ConceptProbes:
        """A copy keeping only ``concepts`` (in that order)."""
        self._check()
        idx = [self.concepts_.index(c) for c in concepts]
        meta, arrays = self.to_state()
        meta = json.loads(json.dumps(meta))
        meta["concepts"] = list(concepts)
        for i in range(len(self.layers_)):
            arrays[f"l{i}_coef"] = arrays[f"l{i}_coef"][idx]
            for key in ("intercept", "runs_real", "runs_null", "pu_scale"):
                arrays[f"l{i}_{key}"] = arrays[f"l{i}_{key}"][idx]
        out = ConceptProbes.from_state(meta, arrays)
        if hasattr(self, "quality_"):
            out.quality_ = self.quality_[self.quality_["concept"].isin(concepts)].reset_index(drop=True)
        return out


def fit_probes(teacher, concepts, layers, preprocess, *, random_runs: int = 10, pooling: str = "mean",
               test_size: float = 0.25, seed: int = 0, batch_size: int = 64,
               progress: bool = True) -> tuple[ConceptProbes, dict[str, np.ndarray]]:
    """Extract activations of the concept examples and fit one linear probe per concept and layer.

    Parameters
    ----------
    teacher : concepts.teacher.Teacher
    concepts : concepts.images.ImageSet
        Concept examples (:func:`concepts.images.load_concept_source`); a TCAV folder layout makes the
        probes positive-unlabelled (see :meth:`ConceptProbes._fit`).
    layers : str or sequence of str
    preprocess : concepts.images.Preprocess

    Returns
    -------
    probes : ConceptProbes
    acts : dict of str to ndarray
        Pooled activations of the concept examples per layer (for TCAV).
    """
    from .activations import extract

    layers = teacher.resolve_layers(layers)
    acts = extract(teacher, concepts, layers, preprocess, batch_size=batch_size, pooling=pooling,
                   progress=progress, desc="probe").layers
    probes = ConceptProbes(test_size=test_size, random_runs=random_runs, random_state=seed)
    probes.fit(acts, concepts.table[concepts.concepts], random_negatives=concepts.random_negatives)
    return probes, acts


# -------------------------------------------------------------------------------- PROBES_DIR
PROBES_FORMAT_VERSION = 1


def save_probes(path, probes: ConceptProbes, *, teacher: dict, preprocess: dict, pooling: str,
                quality: pd.DataFrame | None = None):
    """Write ``PROBES_DIR`` atomically: ``quality.csv``, ``probes.json`` (metadata) and ``probes.npz``."""
    from .fileio import atomic_dir, to_json
    meta, arrays = probes.to_state()
    doc = {"format_version": PROBES_FORMAT_VERSION, "teacher": teacher, "preprocess": preprocess,
           "pooling": pooling, "probes": meta}
    with atomic_dir(path) as tmp:
        (tmp / "probes.json").write_text(to_json(doc) + "\n")
        np.savez(tmp / "probes.npz", **arrays)
        (quality if quality is not None else probes.quality_).to_csv(tmp / "quality.csv", index=False)
    return path


def load_probes(path) -> tuple[ConceptProbes, dict]:
    """Read a ``PROBES_DIR``; returns the probes and the metadata (teacher, preprocess, pooling)."""
    from pathlib import Path
    path = Path(path)
    from .fileio import load_arrays, read_json
    mfile = path / "probes.json"
    doc = read_json(mfile, what=f"PROBES_DIR {path} (expected a folder written by 'surrogate probe')")
    if doc.get("format_version") != PROBES_FORMAT_VERSION:
        raise InputError(f"{mfile}: format version {doc.get('format_version')!r} is not supported "
                         f"(expected {PROBES_FORMAT_VERSION}); run 'surrogate probe' again")
    probes = ConceptProbes.from_state(doc["probes"], load_arrays(path / "probes.npz"))
    q = path / "quality.csv"
    if q.is_file():
        probes.quality_ = pd.read_csv(q)
    return probes, doc
