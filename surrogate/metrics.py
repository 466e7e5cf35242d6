"""Fidelity metrics: how well a surrogate reproduces its teacher. Each formula is stated once, here."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Temperature-softened probabilities ``softmax(z / T)`` row-wise (Hinton et al. 2015)."""
    if temperature <= 0:
        raise ValueError(f"temperature {temperature}: expected a positive number")
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fidelity(teacher_probs: np.ndarray, surrogate_probs: np.ndarray) -> float:
    """Top-1 agreement: ``mean_i [argmax p_i == argmax q_i]``."""
    return float(np.mean(np.argmax(teacher_probs, 1) == np.argmax(surrogate_probs, 1)))


def bootstrap_ci(agree: np.ndarray, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of a 0/1 agreement vector (resampling images)."""
    agree = np.asarray(agree, dtype=float)
    if len(agree) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = agree[rng.integers(0, len(agree), size=(n_boot, len(agree)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-12) -> float:
    """Mean over images of ``KL(p || q) = sum_k p_k log(p_k / q_k)`` (q clipped at ``eps``)."""
    p = np.asarray(p, dtype=float)
    q = np.clip(np.asarray(q, dtype=float), eps, None)
    terms = np.where(p > 0, p * (np.log(np.clip(p, eps, None)) - np.log(q)), 0.0)
    return float(terms.sum(1).mean())


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over images of ``TV(p, q) = 0.5 * sum_k |p_k - q_k|``."""
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum(1).mean())


def completeness(concept_accuracy: float, model_accuracy: float, random_accuracy: float) -> float:
    """Completeness score of Yeh et al. (2020), "On Completeness-aware Concept-Based Explanations".

    ``eta = (concept_accuracy - random_accuracy) / (model_accuracy - random_accuracy)``, where
    ``concept_accuracy`` is the accuracy of the best model that sees only the concept scores,
    ``model_accuracy`` the network's own and ``random_accuracy`` that of always predicting the most
    frequent class. We measure accuracy against the teacher's own predictions, so ``model_accuracy = 1``
    and ``concept_accuracy`` is the ceiling fidelity; the best concept model is the ceiling model (Yeh et
    al. reconstruct the layer from the concept scores and run the rest of the network instead). 1 means
    the concepts explain everything the teacher does, 0 no more than guessing the majority class.
    Undefined (NaN) when ``model_accuracy == random_accuracy``.
    """
    denom = model_accuracy - random_accuracy
    if denom <= 0:
        return float("nan")
    return float((concept_accuracy - random_accuracy) / denom)
