"""The pipeline as library functions: probe concepts, distil a surrogate, measure its fidelity."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.model_selection import train_test_split

from concepts.activations import extract
from concepts.errors import InputError
from concepts.images import ImageSet, Preprocess
from concepts.probes import ConceptProbes, fit_probes  # noqa: F401  (fit_probes moved to concepts.probes)
from concepts.teacher import Teacher

from .augment import augmented_queries
from .estimators import LinearSurrogate, TreeSurrogate
from .metrics import bootstrap_ci, completeness, kl_divergence, softmax, total_variation
from .model import SurrogateModel

TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
LINEAR_C = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
# concepts are called complete when a model of them can reproduce at least this share of the teacher's
# held-out decisions (the bar the toy zoo's full concept bank clears: 0.994; without "spots": 0.975)
COMPLETE_AT = 0.98


def parse_classes(value, n_outputs: int | None = None) -> list[str] | None:
    """``--classes``: comma-separated names or a file with one name per line."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        names = [str(v) for v in value]
    else:
        from pathlib import Path
        p = Path(value)
        if p.is_file():
            names = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
        elif "," in value or not (p.suffix or "/" in value):
            names = [s.strip() for s in value.split(",") if s.strip()]
        else:
            raise InputError(f"--classes {value}: no such file (give a file with one name per line, or a,b,c)")
    if len(set(names)) != len(names):
        raise InputError(f"--classes: duplicate class names in {', '.join(names)}")
    if n_outputs is not None and len(names) != n_outputs:
        raise InputError(f"--classes: {len(names)} names given but the teacher has {n_outputs} outputs")
    return names


def _make(kind, *, max_depth, max_leaves, C, seed, ccp_alpha=0.0):
    if kind == "tree":
        return TreeSurrogate(max_depth=max_depth, max_leaves=max_leaves, ccp_alpha=ccp_alpha, random_state=seed)
    if kind == "linear":
        return LinearSurrogate(C=C, random_state=seed)
    raise InputError(f"--kind {kind!r}: expected 'tree' or 'linear'")


def _choose_concepts(probes: ConceptProbes, layer: str, concepts) -> tuple[ConceptProbes, list[str]]:
    if isinstance(concepts, str) and concepts == "all":
        keep = list(probes.concepts_)
    elif isinstance(concepts, str) and concepts == "significant":
        keep = probes.significant_concepts(layer)
        if not keep:
            raise InputError(f"no concept's probe at layer '{layer}' beats random-vs-random probes; the teacher does "
                             "not seem to see any of these concepts there (try another --layer, or --use-concepts all)")
    else:
        keep = [concepts] if isinstance(concepts, str) else list(concepts)
        for c in keep:
            if c not in probes.concepts_:
                from concepts.errors import did_you_mean
                raise InputError(f"--use-concepts: '{c}' is not a probed concept.{did_you_mean(c, probes.concepts_)}")
    excluded = [c for c in probes.concepts_ if c not in keep]
    return (probes.select(keep) if excluded else probes), excluded


def select_complexity(kind, X_tr, P_tr, X_va, hard_va, *, max_depth, max_leaves, seed, tolerance=0.01,
                      max_candidates: int = 25) -> dict:
    """Fidelity-complexity frontier on a validation split, and the smallest model within ``tolerance``.

    Trees: the cost-complexity pruning path of the depth/leaf-limited tree; linear: the ``C`` grid
    :data:`LINEAR_C` (L1, fewer concepts for smaller C).

    Returns
    -------
    dict with ``frontier`` (list of ``{n_leaves or n_nonzero, fidelity}``, simplest first), ``C`` and
    ``ccp_alpha`` of the chosen model.
    """
    if kind == "tree":
        alphas = np.unique(np.clip(TreeSurrogate(max_depth=max_depth, max_leaves=max_leaves, random_state=seed)
                           .cost_complexity_pruning_path(X_tr, P_tr), 0.0, None))
        if len(alphas) > max_candidates:
            alphas = np.unique(np.quantile(alphas, np.linspace(0, 1, max_candidates), method="nearest"))
        fits = [(a, _make(kind, max_depth=max_depth, max_leaves=max_leaves, C=1.0, seed=seed, ccp_alpha=float(a))
                 .fit(X_tr, P_tr)) for a in alphas]
        size = [("n_leaves", f.n_leaves_) for _, f in fits]
    else:
        fits = [(c, _make(kind, max_depth=max_depth, max_leaves=max_leaves, C=c, seed=seed).fit(X_tr, P_tr))
                for c in LINEAR_C]
        size = [("n_nonzero", f.n_nonzero_) for _, f in fits]
    classes = np.asarray(P_tr.columns, dtype=object)
    fids = [float(np.mean(f.predict(X_va) == classes[hard_va])) for _, f in fits]
    best = max(fids)
    order = sorted(range(len(fits)), key=lambda i: (size[i][1], -fids[i]))
    chosen = next(i for i in order if fids[i] >= best - tolerance)
    frontier = [{size[i][0]: int(size[i][1]), "fidelity": fids[i]} for i in order]
    param = float(fits[chosen][0])
    return {"frontier": frontier, "C": param if kind == "linear" else 1.0,
            "ccp_alpha": param if kind == "tree" else 0.0, "chosen": frontier[order.index(chosen)]}


def ceiling_models(seed: int = 0) -> dict:
    """The unconstrained models behind ``ceiling_fidelity``: gradient boosting and a random forest."""
    return {"gradient_boosting": HistGradientBoostingClassifier(random_state=seed, max_iter=200),
            "random_forest": RandomForestClassifier(n_estimators=200, min_samples_leaf=2, random_state=seed, n_jobs=1)}


def ceiling_fidelity(X_train, y_train, X_test, y_test, *, seed: int = 0) -> tuple[float, str]:
    """Held-out agreement of the best unconstrained model of the concept scores with the teacher's labels.

    ``ceiling = mean_i [g(s_i) == argmax p_i]`` over held-out images, where ``g`` is the model of
    :func:`ceiling_models` with the best agreement on a validation quarter of the training images,
    refitted on all of them: how much of the teacher the concept scores can explain at all.

    Returns
    -------
    ceiling : float
    model : str
        Name of the model chosen.
    """
    if len(np.unique(y_train)) < 2:
        return float(np.mean(y_test == y_train[0])), "constant"
    counts = np.bincount(y_train)
    strat = y_train if counts[counts > 0].min() >= 2 else None
    tr, va = train_test_split(np.arange(len(y_train)), test_size=0.25, random_state=seed, stratify=strat)
    scores = {}
    for name, model in ceiling_models(seed).items():
        scores[name] = float(np.mean(model.fit(X_train[tr], y_train[tr]).predict(X_train[va]) == y_train[va]))
    name = max(scores, key=scores.get)
    model = ceiling_models(seed)[name].fit(X_train, y_train)
    return float(np.mean(model.predict(X_test) == y_test)), name


def distill(teacher: Teacher, probes: ConceptProbes, images: ImageSet, preprocess: Preprocess, *,
            kind: str = "tree", max_depth: int | None = 4, max_leaves: int | None = None,
            temperature: float | str = 1.0, test_size: float = 0.3, classes: Sequence[str] | None = None,
            pooling: str = "mean", seed: int = 0, batch_size: int = 64, progress: bool = True,
            layer: str | None = None, activations=None, tolerance: float = 0.01,
            concepts: str | Sequence[str] = "significant", augment: int = 0) -> SurrogateModel:
    """Distil the teacher's temperature-softened outputs into a surrogate over concept scores.

    Parameters
    ----------
    kind : {"tree", "linear"}
    max_depth, max_leaves : int or None
        Tree complexity.
    temperature : float or "auto"
        Softmax temperature T of the soft targets ``softmax(z / T)``; ``auto`` picks T from
        :data:`TEMPERATURES` by fidelity on a validation split of the training images.
    test_size : float, default=0.3
        Fraction of images held out (never used for fitting or choosing anything) for the metrics.
    classes : sequence of str, optional
        Names of the teacher's outputs; default ``class_0 … class_{K-1}``.
    layer : str, optional
        Probe layer; default the probes' best layer.
    tolerance : float, default=0.01
        Complexity choice: the smallest model (fewest leaves, or fewest non-zero concepts) whose
        validation fidelity is within ``tolerance`` of the best on the path.
    concepts : "significant", "all" or sequence of str, default="significant"
        Concepts the surrogate may use. ``significant`` keeps those whose probe beats random-vs-random
        probes at ``layer`` (a probe of a concept the teacher does not see fits noise; its scores must
        not reach the surrogate); the others are listed in ``metrics["excluded_concepts"]``.
    augment : int, default=0
        Extra teacher queries per training image (flips, crops, mixup; :mod:`surrogate.augment`) added to
        the surrogate's training data. Validation and held-out images stay un-augmented.
    activations : concepts.activations.Activations, optional
        Activations of ``images`` at ``layer`` already extracted with ``preprocess`` and ``pooling``
        (to distil several surrogates from one pass over the images).

    Returns
    -------
    SurrogateModel
        With ``metrics`` holding the keys of ``metrics.json`` (DESIGN.md).
    """
    if not (0 < test_size < 1):
        raise InputError(f"--test-size {test_size}: expected a fraction in (0, 1)")
    if max_depth is not None and max_depth < 1:
        raise InputError(f"--max-depth {max_depth}: expected a positive integer")
    if augment < 0:
        raise InputError(f"--augment {augment}: expected a non-negative integer")
    if max_leaves is not None and max_leaves < 2:
        raise InputError(f"--max-leaves {max_leaves}: expected an integer >= 2")
    layer = layer or probes.layer_
    acts = activations if activations is not None else extract(
        teacher, images, [layer], preprocess, batch_size=batch_size, pooling=pooling, progress=progress, desc="distill")
    if layer not in acts.layers or len(acts.logits) != len(images):
        raise InputError(f"activations: expected layer '{layer}' for {len(images)} images")
    logits = acts.logits
    K = logits.shape[1]
    classes = list(classes) if classes is not None else [f"class_{k}" for k in range(K)]
    if len(classes) != K:
        raise InputError(f"--classes: {len(classes)} names given but the teacher has {K} outputs")
    probes, excluded = _choose_concepts(probes, layer, concepts)
    scores = probes.transform(acts.layers[layer], layer)
    n = len(scores)
    if n < 10:
        raise InputError(f"--images: {n} images; distillation needs at least 10")
    hard = logits.argmax(1)
    counts = np.bincount(hard, minlength=K)
    strat = hard if counts[counts > 0].min() >= 2 else None
    train, test = train_test_split(np.arange(n), test_size=test_size, random_state=seed, stratify=strat)
    obs = _Observations(scores, logits)
    if augment:
        aug, src = augmented_queries(teacher, images.subset(train), preprocess, layer, n_per_image=augment,
                                     pooling=pooling, seed=seed, batch_size=batch_size, progress=progress)
        obs.add(probes.transform(aug.layers[layer], layer), aug.logits, train[src])

    # every choice (temperature, sparsity, pruning) is made on a validation split of the training images
    names = np.array(classes, dtype=object)
    tr, va = train_test_split(train, test_size=0.25, random_state=seed)
    if temperature == "auto":
        fids = [np.mean(_make(kind, max_depth=max_depth, max_leaves=max_leaves, C=1.0, seed=seed)
                        .fit(*obs.fit_rows(tr, T, classes)).predict(scores.iloc[va]) == names[hard[va]])
                for T in TEMPERATURES]
        T = TEMPERATURES[int(np.argmax(fids))]
    else:
        T = float(temperature)
        if T <= 0:
            raise InputError(f"--temperature {temperature}: expected a positive number or 'auto'")
    complexity = select_complexity(kind, *obs.fit_rows(tr, T, classes), scores.iloc[va], hard[va],
                                   max_depth=max_depth, max_leaves=max_leaves, seed=seed, tolerance=tolerance)
    C, ccp_alpha = complexity["C"], complexity["ccp_alpha"]

    X_fit, P_fit = obs.fit_rows(train, T, classes)
    est = _make(kind, max_depth=max_depth, max_leaves=max_leaves, C=C, seed=seed, ccp_alpha=ccp_alpha).fit(X_fit, P_fit)
    q = est.predict_proba(scores.iloc[test])
    p_test = softmax(logits[test], T)
    agree = np.argmax(q, 1) == hard[test]
    fit_hard = P_fit.to_numpy().argmax(1)  # argmax is the same at every temperature
    hard_est = _make(kind, max_depth=max_depth, max_leaves=max_leaves, C=C, seed=seed, ccp_alpha=ccp_alpha)
    hard_fid = float(np.mean(hard_est.fit(X_fit, names[fit_hard]).predict(scores.iloc[test]) == names[hard[test]]))
    ceiling, ceiling_model = ceiling_fidelity(X_fit.to_numpy(), fit_hard, scores.iloc[test].to_numpy(), hard[test],
                                              seed=seed)
    per_class = [{"class": c, "fidelity": float(agree[hard[test] == k].mean()) if (hard[test] == k).any() else None,
                  "n": int((hard[test] == k).sum())} for k, c in enumerate(classes)]
    metrics = {
        "kind": kind, "classes": classes, "concepts": list(scores.columns), "layer": layer,
        "temperature": T, "n_train": int(len(train)), "n_test": int(len(test)),
        "n_augmented": int(len(X_fit) - len(train)),
        "fidelity": float(agree.mean()), "fidelity_ci": list(bootstrap_ci(agree, seed=seed)),
        "hard_label_fidelity": hard_fid, "ceiling_fidelity": ceiling, "ceiling_model": ceiling_model,
        "completeness": completeness(ceiling, 1.0, float(np.bincount(hard[test], minlength=K).max() / len(test))),
        "kl": kl_divergence(p_test, q), "total_variation": total_variation(p_test, q),
        "depth": int(est.depth_) if kind == "tree" else None,
        "n_leaves": int(est.n_leaves_) if kind == "tree" else None,
        "n_nonzero": int(est.n_nonzero_) if kind == "linear" else int((est.feature_importances() > 0).sum()),
        "C": C if kind == "linear" else None,
        "ccp_alpha": ccp_alpha if kind == "tree" else None,
        "frontier": complexity["frontier"],
        "per_class": per_class,
        "concepts_complete": bool(ceiling >= COMPLETE_AT),
        "excluded_concepts": excluded,
        "seed": seed,
    }
    labels = images.labels
    if labels is not None and all(lbl is not None for lbl in labels) and set(labels) <= set(classes):
        metrics["teacher_accuracy"] = float(np.mean(names[hard] == np.array(labels, dtype=object)))
    if not metrics["concepts_complete"]:
        metrics["warning"] = (f"The concepts are incomplete: even an unconstrained model over these concept scores "
                              f"agrees with the teacher on only {ceiling:.1%} of held-out images")
    model = SurrogateModel(kind=kind, estimator=est, probes=probes, classes=classes, teacher=teacher.to_dict(),
                           layer=layer, pooling=pooling, preprocess=preprocess, temperature=T, metrics=metrics)
    if kind == "tree":
        model.examples = leaf_examples(est, scores.iloc[train], logits[train], [str(images.paths[i]) for i in train])
    model.fit_data = {"scores": scores, "logits": logits, "train": train, "test": test, "paths": images.paths}
    return model


class _Observations:
    """Concept scores and teacher logits of the images, plus augmented queries tied to their source image."""

    def __init__(self, scores: pd.DataFrame, logits: np.ndarray):
        self.scores, self.logits = scores, logits
        self.extra_scores = scores.iloc[:0]
        self.extra_logits = logits[:0]
        self.extra_source = np.zeros(0, dtype=int)

    def add(self, scores: pd.DataFrame, logits: np.ndarray, source: np.ndarray) -> None:
        self.extra_scores, self.extra_logits, self.extra_source = scores, logits, np.asarray(source)

    def fit_rows(self, idx: np.ndarray, T: float, classes) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Concept scores and soft targets at temperature ``T`` of images ``idx`` and their augmentations."""
        extra = np.isin(self.extra_source, idx)
        X = pd.concat([self.scores.iloc[idx], self.extra_scores[extra]], ignore_index=True)
        z = np.concatenate([self.logits[idx], self.extra_logits[extra]])
        return X, pd.DataFrame(softmax(z, T), columns=list(classes))


def leaf_examples(est: TreeSurrogate, scores: pd.DataFrame, logits: np.ndarray, paths: Sequence[str]) -> dict[int, str]:
    """For each leaf, the image whose teacher probability of the leaf's class is highest among those in it."""
    leaves = est.apply(scores)
    probs = softmax(logits, 1.0)
    out = {}
    for leaf in np.unique(leaves):
        idx = np.nonzero(leaves == leaf)[0]
        k = int(np.argmax(est.tree_.value[leaf]))
        out[int(leaf)] = paths[int(idx[np.argmax(probs[idx, k])])]
    return out
