"""Explaining single predictions: teacher vs surrogate, concept scores, path, contributions, counterfactuals."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from concepts.activations import extract
from concepts.errors import InputError
from concepts.fileio import atomic_write_bytes
from concepts.images import ImageSet, open_image
from concepts.teacher import Teacher

from .export import format_threshold
from .metrics import softmax
from .model import SurrogateModel

MARGIN = 0.02  # how far past a threshold a counterfactual moves a score


def model_inputs(model: SurrogateModel, teacher: Teacher, images: ImageSet, *, batch_size: int = 64,
                 progress: bool = True) -> tuple[pd.DataFrame, np.ndarray]:
    """Concept scores (DataFrame) and teacher logits for ``images``, as the surrogate sees them."""
    acts = extract(teacher, images, [model.layer], model.preprocess, batch_size=batch_size,
                   pooling=model.pooling, progress=progress, desc="score")
    return model.concept_scores(acts.layers[model.layer]), acts.logits


def _single(path) -> ImageSet:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"IMAGE {p}: no such file")
    open_image(p)  # one-line error for unreadable images before the teacher runs
    return ImageSet(p.parent.resolve(), pd.DataFrame({"path": [p.name], "label": [pd.NA]}), [])


def explain(model: SurrogateModel, image, *, teacher: Teacher | None = None, n_counterfactuals: int = 3) -> dict:
    """Explain one image (DESIGN.md ``explain --json`` object).

    Parameters
    ----------
    model : SurrogateModel
    image : str or Path
    teacher : Teacher, optional
        Default: loaded from the model's stored spec (its weights hash is checked).

    Returns
    -------
    dict with keys teacher, surrogate, concept_scores, path, contributions, counterfactuals
    """
    teacher = teacher or model.load_teacher()
    scores, logits = model_inputs(model, teacher, _single(image), progress=False)
    out = explain_scores(model, scores.iloc[0].to_numpy(), logits[0], n_counterfactuals=n_counterfactuals)
    out["image"] = str(image)
    return out


def explain_scores(model: SurrogateModel, x: np.ndarray, logits: np.ndarray, *, n_counterfactuals: int = 3) -> dict:
    """The explanation object for one row of concept scores ``x`` and the teacher's ``logits``."""
    est, concepts, classes = model.estimator, model.concepts, model.classes
    X = pd.DataFrame([x], columns=concepts)
    q = est.predict_proba(X)[0]
    p = softmax(logits[None, :], 1.0)[0]
    t_label, s_label = classes[int(np.argmax(p))], classes[int(np.argmax(q))]
    out = {
        "teacher": {"label": t_label, "probs": dict(zip(classes, map(float, p)))},
        "surrogate": {"label": s_label, "probs": dict(zip(classes, map(float, q))), "agrees": t_label == s_label},
        "concept_scores": dict(zip(concepts, map(float, x))),
        "path": [],
        "contributions": {},
        "counterfactuals": [],
    }
    k = int(np.argmax(q))
    if model.kind == "tree":
        tree = est.tree_
        nodes = tree.decision_path(x)
        contrib = dict.fromkeys(concepts, 0.0)
        for node, nxt in zip(nodes[:-1], nodes[1:]):
            f = int(tree.feature[node])
            went = "<=" if nxt == tree.children_left[node] else ">"
            out["path"].append({"concept": concepts[f], "threshold": float(tree.threshold[node]),
                                "value": float(x[f]), "went": went})
            # change in the predicted class's proportion attributed to this split's concept
            contrib[concepts[f]] += float(tree.value[nxt, k] - tree.value[node, k])
        out["contributions"] = contrib
        out["leaf"] = int(nodes[-1])
        out["counterfactuals"] = _tree_counterfactuals(model, x, n_counterfactuals)
    else:
        c = est.contributions(X)[0, k]
        out["contributions"] = dict(zip(concepts, map(float, c)))
        out["intercept"] = float(est.intercept_[k])
        out["counterfactuals"] = _scan_counterfactuals(model, x, n_counterfactuals)
    return out


def _tree_counterfactuals(model, x, n):
    """Smallest changes (fewest concepts, then smallest L1 change) that reach a leaf of another class."""
    tree, concepts, classes = model.estimator.tree_, model.concepts, model.classes
    current = int(np.argmax(tree.value[tree.decision_path(x)[-1]]))
    options = []
    for leaf, path in tree.leaf_paths().items():
        label = int(np.argmax(tree.value[leaf]))
        if label == current:
            continue
        lo = np.full(len(x), -np.inf)
        hi = np.full(len(x), np.inf)
        for node, nxt in zip(path[:-1], path[1:]):
            f, t = int(tree.feature[node]), float(tree.threshold[node])
            if nxt == tree.children_left[node]:
                hi[f] = min(hi[f], t)
            else:
                lo[f] = max(lo[f], t)
        if (lo >= hi).any():
            continue
        changes = {}
        for f in range(len(x)):
            if x[f] > hi[f]:
                changes[f] = max(hi[f] - MARGIN, lo[f] + (hi[f] - lo[f]) / 2 if np.isfinite(lo[f]) else -np.inf)
            elif x[f] <= lo[f]:
                changes[f] = min(lo[f] + MARGIN, hi[f] - (hi[f] - lo[f]) / 2 if np.isfinite(hi[f]) else np.inf)
        cost = (len(changes), sum(abs(v - x[f]) for f, v in changes.items()))
        options.append((cost, label, changes))
    return _best_per_label(options, concepts, classes, n)


def _best_per_label(options, concepts, classes, n):
    options.sort(key=lambda o: o[0])
    seen, out = set(), []
    for _, label, changes in options:
        if label in seen:
            continue
        seen.add(label)
        out.append({"changes": {concepts[f]: float(np.clip(v, 0.0, 1.0)) for f, v in changes.items()},
                    "surrogate_label": classes[label]})
        if len(out) == n:
            break
    return out[:max(n, 0)]


def _scan_counterfactuals(model, x, n, grid: int = 101):
    """Single-concept changes over the score range [0, 1], then pairs, that change the label."""
    est, concepts = model.estimator, model.concepts
    current = int(np.argmax(est.predict_proba(pd.DataFrame([x], columns=concepts))[0]))
    values = np.linspace(0.0, 1.0, grid)
    options = []
    for f in range(len(x)):
        X = np.repeat(x[None, :], grid, 0)
        X[:, f] = values
        labels = est.predict_proba(pd.DataFrame(X, columns=concepts)).argmax(1)
        for i in np.argsort(np.abs(values - x[f])):
            if labels[i] != current:
                options.append(((1, abs(values[i] - x[f])), int(labels[i]), {f: values[i]}))
                break
    if not options:  # try pairs of concepts at their extremes
        for f in range(len(x)):
            for g in range(f + 1, len(x)):
                for vf in (0.0, 1.0):
                    for vg in (0.0, 1.0):
                        z = x.copy()
                        z[f], z[g] = vf, vg
                        label = int(est.predict_proba(pd.DataFrame([z], columns=concepts)).argmax(1)[0])
                        if label != current:
                            options.append(((2, abs(vf - x[f]) + abs(vg - x[g])), label, {f: vf, g: vg}))
    return _best_per_label(options, concepts, model.classes, n)


def plot_explanation(explanation: dict, image, out_path, *, dpi: int = 110) -> Path:
    """Draw an explanation (image, concept scores, path or contributions, counterfactuals) to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = open_image(image)
    scores = explanation["concept_scores"]
    names = list(scores)
    on_path = {step["concept"] for step in explanation["path"]}
    fig, (ax_img, ax_bar) = plt.subplots(1, 2, figsize=(9, 3.8), gridspec_kw={"width_ratios": [1, 1.5]})
    ax_img.imshow(img)
    ax_img.axis("off")
    t, s = explanation["teacher"], explanation["surrogate"]
    verdict = "agrees" if s["agrees"] else "DISAGREES"
    ax_img.set_title(f"teacher: {t['label']} ({t['probs'][t['label']]:.0%})\n"
                     f"surrogate: {s['label']} ({s['probs'][s['label']]:.0%}), {verdict}", fontsize=9)
    y = np.arange(len(names))
    colors = ["#d62728" if n in on_path else "#7f7f7f" for n in names]
    ax_bar.barh(y, [scores[n] for n in names], color=colors)
    ax_bar.set_yticks(y, [n.replace("_", " ") for n in names], fontsize=8)
    for label, n in zip(ax_bar.get_yticklabels(), names):
        if n in on_path:
            label.set_color("#d62728")
            label.set_fontweight("bold")
    ax_bar.invert_yaxis()
    ax_bar.set_xlim(0, 1)
    ax_bar.set_xlabel("concept score (probability present)", fontsize=8)
    for step in explanation["path"]:
        i = names.index(step["concept"])
        ax_bar.plot([step["threshold"]] * 2, [i - 0.4, i + 0.4], color="black", lw=1)
    lines = []
    if explanation["path"]:
        lines.append("path: " + " ∧ ".join(
            f"{st['concept'].replace('_', ' ')} {st['went']} {format_threshold(st['threshold'])}" for st in explanation["path"]))
    else:
        top = sorted(explanation["contributions"].items(), key=lambda kv: -abs(kv[1]))[:3]
        lines.append("top contributions: " + ", ".join(f"{c.replace('_', ' ')} {v:+.2f}" for c, v in top))
    for cf in explanation["counterfactuals"][:2]:
        ch = ", ".join(f"{c.replace('_', ' ')}→{v:.2f}" for c, v in cf["changes"].items())
        lines.append(f"would be {cf['surrogate_label']} if {ch}")
    ax_bar.set_title("concept scores (red: on the decision path, ticks: its thresholds)" if on_path
                     else "concept scores", fontsize=8)
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=8, va="bottom")
    fig.tight_layout(rect=(0, 0.04 + 0.035 * len(lines), 1, 0.96))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write_bytes(out_path, buf.getvalue())


def format_explanation(e: dict) -> str:
    """A few lines of plain text for a person reading the terminal."""
    t, s = e["teacher"], e["surrogate"]
    lines = [f"teacher:   {t['label']} ({t['probs'][t['label']]:.0%})",
             f"surrogate: {s['label']} ({s['probs'][s['label']]:.0%}) - " + ("agrees" if s["agrees"] else "DISAGREES")]
    if e["path"]:
        because = " AND ".join(f"{st['concept'].replace('_', ' ')} {st['went']} {format_threshold(st['threshold'])} ({st['value']:.2f})"
                               for st in e["path"])
        lines.append(f"because:   {because}")
    else:
        top = sorted(e["contributions"].items(), key=lambda kv: -abs(kv[1]))[:4]
        lines.append("because:   " + ", ".join(f"{c.replace('_', ' ')} {v:+.2f}" for c, v in top))
    lines.append("concepts:  " + ", ".join(f"{c.replace('_', ' ')} {v:.2f}" for c, v in e["concept_scores"].items()))
    for cf in e["counterfactuals"]:
        ch = ", ".join(f"{c.replace('_', ' ')} -> {v:.2f}" for c, v in cf["changes"].items())
        lines.append(f"would be {cf['surrogate_label']} if {ch}")
    return "\n".join(lines)

