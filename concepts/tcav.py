"""TCAV: how much a class logit moves along each concept activation vector.

For an image ``x``, layer activations ``a(x)`` of shape (c, h, w), class logit ``z_k`` and a CAV ``v``
(a direction in the pooled c-dimensional space), the directional derivative is

    S_k(x, v) = sum_{i,j} grad_a z_k(x)[:, i, j] · v

i.e. the derivative of ``z_k`` when every spatial position of ``a`` moves by ``eps * v`` (for flattened
activations, ``grad_a z_k(x) · v`` over the flattened vector).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .images import ImageSet, Preprocess, iter_batches
from .probes import null_p_value
from .teacher import Teacher


def sign_count(derivs: np.ndarray) -> np.ndarray:
    """TCAV score: fraction of images whose directional derivative is positive.

    ``TCAV_Q = |{x : S(x) > 0}| / |X|`` over the last axis of ``derivs``. Always in [0, 1].
    """
    return (np.asarray(derivs) > 0).mean(axis=-1)


def magnitude(derivs: np.ndarray) -> np.ndarray:
    """TCAV magnitude: ``sum_x max(S(x), 0) / sum_x |S(x)|`` over the last axis (0.5 where all are 0)."""
    d = np.asarray(derivs, dtype=float)
    total = np.abs(d).sum(-1)
    pos = np.clip(d, 0, None).sum(-1)
    return np.divide(pos, total, out=np.full_like(total, 0.5), where=total > 0)


def directional_derivatives(teacher: Teacher, images: ImageSet, preprocess: Preprocess, layer: str,
                            cavs: np.ndarray, *, pooling: str = "mean", batch_size: int = 32,
                            progress: bool = True) -> np.ndarray:
    """Directional derivatives ``S_k(x, v)`` for every class, CAV and image.

    Parameters
    ----------
    cavs : ndarray of shape (m, d)
        Directions in the pooled activation space of ``layer``.
    pooling : {"mean", "max", "flatten"}
        How the CAVs' space was pooled; ``mean`` and ``max`` use the spatial sum of the gradient.

    Returns
    -------
    ndarray of shape (n_classes, m, n_images)
    """
    layer = teacher.resolve_layers([layer])[0]
    v = torch.as_tensor(np.asarray(cavs, dtype=np.float32))
    chunks = []
    for batch in tqdm(iter_batches(images.paths, preprocess, batch_size=batch_size), desc="tcav",
                      disable=not progress, leave=False):
        with torch.enable_grad():
            logits, acts = teacher.forward(batch, [layer], grad_layer=layer)
            a = acts[layer]
            per_class = []
            for k in range(logits.shape[1]):
                (g,) = torch.autograd.grad(logits[:, k].sum(), a, retain_graph=k < logits.shape[1] - 1)
                g = g.reshape(g.shape[0], -1) if (pooling == "flatten" or g.dim() <= 2) else g.flatten(2).sum(-1)
                per_class.append((g @ v.T).T.detach().numpy())  # (m, b)
        chunks.append(np.stack(per_class))  # (K, m, b)
    return np.concatenate(chunks, axis=2)


def tcav(teacher: Teacher, images: ImageSet, preprocess: Preprocess, probes, classes: Sequence[str], *,
         layer: str | None = None, class_indices: Sequence[int] | None = None, alpha: float = 0.05,
         min_auc: float = 0.7, pooling: str = "mean", progress: bool = True) -> pd.DataFrame:
    """TCAV scores with significance for every (class, concept).

    ``tcav_score`` is the sign count (:func:`sign_count`) of the probe's CAV; ``tcav_sd`` the standard
    deviation of the sign counts of ``R`` CAVs fitted on 80% subsamples (how stable the score is).
    Significance, as in Kim et al. (2018), compares the concept with random directions: ``R``
    random-vs-random CAVs (the same examples with shuffled labels) form the null, and ``p_value`` is the
    two-sided :func:`concepts.probes.null_p_value` of the concept's score as one new draw from it. (A
    t-test of the subsample runs' mean against the null is not calibrated: the subsamples share one
    labelling, so their scores cluster and random concepts come out "significant".) ``significant`` requires ``p < alpha / (n_classes * n_concepts)`` (Bonferroni) and a probe
    held-out AUC of at least ``min_auc`` at this layer (a gate on CAV accuracy).

    Parameters
    ----------
    images : ImageSet
        Images on which the scores are computed (TCAV's usual inputs: images of the class).
    probes : ConceptProbes
        Fitted probes with ``random_runs >= 2``.
    classes : sequence of str
        Names of the teacher's outputs, in order.
    class_indices : sequence of int, optional
        Outputs to report (default: all).

    Returns
    -------
    DataFrame with columns class, concept, layer, tcav_score, magnitude, tcav_sd, p_value, significant
    """
    layer = layer or probes.layer_
    concepts = list(probes.concepts_)
    main = probes.cavs(layer)
    real, null = probes.cav_runs(layer)
    runs = real.shape[1]
    directions = np.concatenate([main, real.reshape(-1, main.shape[1]), null.reshape(-1, main.shape[1])])
    derivs = directional_derivatives(teacher, images, preprocess, layer, directions, pooling=pooling,
                                     progress=progress)
    scores, mags = sign_count(derivs), magnitude(derivs)  # (K, m)
    k_n = len(concepts)
    real_scores = scores[:, k_n:k_n + k_n * runs].reshape(len(scores), k_n, runs)
    null_scores = scores[:, k_n + k_n * runs:].reshape(len(scores), k_n, runs)
    quality = getattr(probes, "quality_", None)
    class_indices = range(len(classes)) if class_indices is None else list(class_indices)
    n_tests = max(1, len(class_indices) * k_n)
    rows = []
    for k in class_indices:
        for j, concept in enumerate(concepts):
            b = null_scores[k, j]
            p = null_p_value(float(scores[k, j]), b) if runs >= 2 else 1.0
            gate = True
            if quality is not None:
                q = quality[(quality["concept"] == concept) & (quality["layer"] == layer)]
                gate = bool(len(q)) and float(q["auc"].iloc[0]) >= min_auc
            rows.append({"class": classes[k], "concept": concept, "layer": layer, "tcav_score": float(scores[k, j]),
                         "magnitude": float(mags[k, j]), "tcav_sd": float(real_scores[k, j].std(ddof=1)) if runs > 1 else 0.0,
                         "p_value": p,
                         "significant": bool(p < alpha / n_tests and gate)})
    return pd.DataFrame(rows)


def quality_with_tcav(teacher: Teacher, images: ImageSet, preprocess: Preprocess, probes, classes: Sequence[str],
                      class_index: int, *, pooling: str = "mean", progress: bool = True) -> pd.DataFrame:
    """The probes' quality table with ``tcav_score``, ``p_value`` and ``significant`` of class ``class_index``
    at every probed layer, computed on ``images`` (``probe --target``; the probe's own test stays in
    ``probe_p_value``/``probe_significant``)."""
    quality = probes.quality_.copy()
    for layer in probes.layers_:
        tc = tcav(teacher, images, preprocess, probes, classes, layer=layer, class_indices=[class_index],
                  pooling=pooling, progress=progress)
        for _, row in tc.iterrows():
            m = (quality["concept"] == row["concept"]) & (quality["layer"] == layer)
            quality.loc[m, ["tcav_score", "p_value", "significant"]] = [row["tcav_score"], row["p_value"],
                                                                       row["significant"]]
    return quality
