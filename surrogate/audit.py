"""Auditing a teacher through its surrogate: reliance, significance, spurious concepts, blind spots."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from concepts.errors import InputError
from concepts.fileio import atomic_dir, to_json
from concepts.images import ImageSet, open_image
from concepts.tcav import tcav
from concepts.teacher import Teacher

from .distill import COMPLETE_AT, ceiling_models
from .explain import model_inputs
from .metrics import fidelity, softmax
from .model import SurrogateModel

FLAG_IMPORTANCE = 0.01  # a spurious concept with at least this surrogate importance is flagged


def cv_ceiling(X: np.ndarray, y: np.ndarray, *, seed: int = 0, folds: int = 5) -> np.ndarray:
    """Cross-validated predictions of the unconstrained models of :func:`surrogate.distill.ceiling_models`.

    ``ceiling_fidelity = max_g mean_i [g_{-fold(i)}(s_i) == y_i]``: on the audited images, how much of the
    teacher the better of those models explains, each image predicted by a model not fitted on it.
    Returns the predictions of the better model.
    """
    counts = np.bincount(y)
    folds = int(min(folds, counts[counts > 0].min())) if len(counts[counts > 0]) > 1 else 0
    if folds < 2:
        return y.copy()
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    preds = [cross_val_predict(model, X, y, cv=cv) for model in ceiling_models(seed).values()]
    return max(preds, key=lambda p: float(np.mean(p == y)))


def audit(model: SurrogateModel, images: ImageSet, *, spurious: Sequence[str] = (), compare: SurrogateModel | None = None,
          teacher: Teacher | None = None, seed: int = 0, batch_size: int = 64, progress: bool = True,
          tcav_images: int = 300) -> dict:
    """Audit the teacher on ``images`` (DESIGN.md ``report.json``).

    Parameters
    ----------
    model : SurrogateModel
    images : ImageSet
    spurious : sequence of str
        Concepts the teacher should not use; each is ``flagged`` when the surrogate relies on it
        (importance >= :data:`FLAG_IMPORTANCE`) or its TCAV score is significant for some class.
    compare : SurrogateModel, optional
        A second surrogate (e.g. of a retrained teacher) to compare with on the same images.
    tcav_images : int, default=300
        At most this many images (evenly spaced) for the TCAV gradients.

    Returns
    -------
    dict
        ``fidelity, ceiling_fidelity, concepts, per_class, disagreements, unexplained, tcav`` and more.
    """
    unknown = [c for c in spurious if c not in model.concepts]
    if unknown:
        from concepts.errors import did_you_mean
        raise InputError(f"--spurious: '{unknown[0]}' is not a concept of this model "
                         f"({', '.join(model.concepts)}).{did_you_mean(unknown[0], model.concepts)}")
    teacher = teacher or model.load_teacher()
    scores, logits = model_inputs(model, teacher, images, batch_size=batch_size, progress=progress)
    classes = np.array(model.classes, dtype=object)
    t_idx = logits.argmax(1)
    teacher_probs = softmax(logits)
    q = model.estimator.predict_proba(scores)
    s_idx = q.argmax(1)
    agree = t_idx == s_idx
    ceiling_pred = cv_ceiling(scores.to_numpy(), t_idx, seed=seed)
    paths = [str(p) for p in images.paths]

    # TCAV on an evenly spaced subset, for every class
    n_t = min(len(images), tcav_images)
    sub = images.subset(np.linspace(0, len(images) - 1, n_t).round().astype(int)) if n_t < len(images) else images
    tc, tcav_layer = pd.DataFrame(), model.layer
    if model.probes.random_runs >= 2:
        # where every class logit is linear in the layer (the last block before global pooling and a linear
        # head) each TCAV score is 0 or 1: then use the deepest other probed layer
        for tcav_layer in [model.layer] + [x for x in reversed(model.probes.layers_) if x != model.layer]:
            tc = tcav(teacher, sub, model.preprocess, model.probes, model.classes, layer=tcav_layer,
                      pooling=model.pooling, progress=progress)
            if not _degenerate(tc):
                break

    importance = model.importance().set_index("concept")["importance"]
    ranks = importance.rank(ascending=False, method="min").astype(int)
    quality = getattr(model.probes, "quality_", None)
    concept_rows = []
    for c in model.concepts:
        row = {"concept": c, "importance": float(importance[c]), "rank": int(ranks[c]),
               "tcav_score": None, "tcav_class": None, "p_value": None, "significant": False,
               "spurious": c in spurious}
        if len(tc):
            t = tc[tc["concept"] == c]
            best = t.loc[t["p_value"].idxmin()]
            row.update(tcav_score=float(best["tcav_score"]), tcav_class=str(best["class"]),
                       p_value=float(best["p_value"]), significant=bool(t["significant"].any()))
        if quality is not None and len(quality):
            qq = quality[(quality["concept"] == c) & (quality["layer"] == model.layer)]
            row["probe_auc"] = float(qq["auc"].iloc[0]) if len(qq) else None
        row["flagged"] = bool(row["spurious"] and (row["importance"] >= FLAG_IMPORTANCE or row["significant"]))
        concept_rows.append(row)

    per_class = [{"class": c, "fidelity": float(agree[t_idx == k].mean()) if (t_idx == k).any() else None,
                  "n": int((t_idx == k).sum()),
                  "ceiling_fidelity": float((ceiling_pred[t_idx == k] == k).mean()) if (t_idx == k).any() else None}
                 for k, c in enumerate(model.classes)]
    disagreements = [{"path": paths[i], "teacher_label": classes[t_idx[i]], "surrogate_label": classes[s_idx[i]],
                      "teacher_prob": float(teacher_probs[i].max())}
                     for i in np.nonzero(~agree)[0]]
    unexplained = [{"path": paths[i], "teacher_label": classes[t_idx[i]]} for i in np.nonzero(ceiling_pred != t_idx)[0]]
    report = {
        "fidelity": float(agree.mean()),
        "ceiling_fidelity": float((ceiling_pred == t_idx).mean()),
        "n_images": int(len(images)),
        "kind": model.kind, "layer": model.layer, "temperature": model.temperature,
        "teacher": model.teacher, "classes": model.classes,
        "concepts": concept_rows,
        "per_class": per_class,
        "disagreements": disagreements,
        "unexplained": unexplained,
        "tcav": tc.to_dict(orient="records") if len(tc) else [],
        "flagged": [r["concept"] for r in concept_rows if r["flagged"]],
        "tcav_degenerate": _degenerate(tc),
        "tcav_layer": tcav_layer,
        "distill_metrics": model.metrics,
    }
    labels = images.labels
    if labels is not None and all(lbl is not None for lbl in labels):
        report["teacher_accuracy"] = float(np.mean(classes[t_idx] == np.array(labels, dtype=object)))
    if compare is not None:
        report["compare"] = _compare(model, compare, images, teacher, q, t_idx, batch_size, progress)
    return report


def _degenerate(tc: pd.DataFrame) -> bool:
    """Every TCAV score is 0 or 1: the directional derivatives have the same sign for every image."""
    return bool(len(tc)) and bool(tc["tcav_score"].isin([0.0, 1.0]).all())


def _compare(model, other, images, teacher, q, t_idx, batch_size, progress):
    other_teacher = teacher if other.teacher == model.teacher else other.load_teacher()
    o_scores, o_logits = model_inputs(other, other_teacher, images, batch_size=batch_size, progress=progress)
    oq = other.estimator.predict_proba(o_scores)
    same_classes = list(other.classes) == list(model.classes)
    imp_a = model.importance().set_index("concept")["importance"]
    imp_b = other.importance().set_index("concept")["importance"]
    return {
        "teacher": other.teacher, "kind": other.kind,
        "fidelity": fidelity(o_logits, oq),
        "teachers_agree": float(np.mean(o_logits.argmax(1) == t_idx)) if same_classes else None,
        "surrogates_agree": float(np.mean(oq.argmax(1) == q.argmax(1))) if same_classes else None,
        "importance": [{"concept": c, "this": float(imp_a.get(c, np.nan)), "other": float(imp_b.get(c, np.nan))}
                       for c in dict.fromkeys(list(imp_a.index) + list(imp_b.index))],
    }


# ---------------------------------------------------------------------------------------------- HTML
def _thumb(path, size: int = 72) -> str:
    try:
        img = open_image(path)
    except InputError:
        return ""
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _fmt(v, pct=False):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if pct:
        return f"{100 * v:.1f}%"
    return f"{v:.3g}" if isinstance(v, float) else html.escape(str(v))


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.6rem} h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem} td,th{padding:.3rem .6rem;border-bottom:1px solid #eee;text-align:left}
th{background:#f6f6f6} .num{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:.7rem;background:#4c78a8;vertical-align:middle}
.flag{background:#fde2e1} .badge{display:inline-block;padding:0 .4rem;border-radius:.6rem;font-size:.8rem}
.bad{background:#d62728;color:#fff} .ok{background:#2ca02c;color:#fff} .muted{color:#777}
.cards{display:flex;gap:1rem;flex-wrap:wrap} .card{border:1px solid #ddd;border-radius:.5rem;padding:.6rem 1rem;min-width:10rem}
.card b{font-size:1.4rem;display:block} .tree svg{max-width:100%;height:auto}
.thumbs td img{border-radius:4px}
"""


def report_html(report: dict, *, tree_svg: str | None = None, max_thumbs: int = 24) -> str:
    """A self-contained HTML page (inline CSS, inline SVG, base64 thumbnails) for an audit report."""
    e = html.escape
    r = report
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Concept audit</title><style>{CSS}</style></head><body>",
             "<h1>Concept audit of the teacher</h1>",
             f"<p class='muted'>Teacher <code>{e(str(r['teacher'].get('spec')))}</code>, layer <code>{e(r['layer'])}</code>, "
             f"{e(r['kind'])} surrogate, {r['n_images']} images.</p>", "<div class='cards'>"]
    cards = [("fidelity", r["fidelity"], "surrogate agrees with the teacher"),
             ("ceiling", r["ceiling_fidelity"], "best any model of these concepts does (cross-validated)")]
    if "teacher_accuracy" in r:
        cards.append(("teacher accuracy", r["teacher_accuracy"], "against the images' labels"))
    for name, v, note in cards:
        parts.append(f"<div class='card'>{e(name)}<b>{_fmt(v, pct=True)}</b><span class='muted'>{e(note)}</span></div>")
    parts.append("</div>")
    if r["ceiling_fidelity"] < COMPLETE_AT:
        parts.append(f"<p><span class='badge bad'>incomplete</span> Even an unconstrained model of these concept scores "
                     f"agrees with the teacher on only {_fmt(r['ceiling_fidelity'], True)} of the images: the teacher uses "
                     "something the concept bank does not name.</p>")
    if r["flagged"]:
        parts.append("<p><span class='badge bad'>spurious</span> The teacher relies on declared-spurious concept(s): "
                     + ", ".join(f"<b>{e(c)}</b>" for c in r["flagged"]) + ".</p>")
    parts.append("<h2>Concepts</h2><table><tr><th>rank</th><th>concept</th><th>surrogate importance</th><th>TCAV score</th>"
                 "<th>for class</th><th>p-value</th><th>significant</th><th>probe AUC</th><th>spurious</th></tr>")
    for c in sorted(r["concepts"], key=lambda c: c["rank"]):
        cls = " class='flag'" if c["flagged"] else ""
        width = int(120 * c["importance"])
        sig = "<span class='badge ok'>yes</span>" if c["significant"] else "<span class='muted'>no</span>"
        parts.append(f"<tr{cls}><td class='num'>{c['rank']}</td><td>{e(c['concept'])}</td>"
                     f"<td><span class='bar' style='width:{width}px'></span> {_fmt(c['importance'])}</td>"
                     f"<td class='num'>{_fmt(c['tcav_score'])}</td><td>{e(str(c.get('tcav_class') or '–'))}</td>"
                     f"<td class='num'>{_fmt(c['p_value'])}</td><td>{sig}</td><td class='num'>{_fmt(c.get('probe_auc'))}</td>"
                     f"<td>{'yes' if c['spurious'] else ''}</td></tr>")
    if r.get("tcav_degenerate"):
        parts.append("</table><p><span class='badge bad'>TCAV degenerate</span> Every TCAV score is 0 or 1: at this "
                     "layer each class logit is linear in the activations (e.g. the last block before global pooling "
                     "and a linear head), so the directional derivative is the same for every image. Probe an "
                     "earlier layer for meaningful TCAV scores.</p><table style='display:none'>")
    parts.append(f"</table><p class='muted'>TCAV scores at layer <code>{e(str(r.get('tcav_layer')))}</code>: share of "
                 "images whose class logit rises along the concept direction, for the class where the concept is most significant; significance against random-vs-random "
                 "directions with Bonferroni correction.</p>")
    if tree_svg:
        parts.append(f"<h2>The surrogate tree</h2><div class='tree'>{tree_svg}</div>")
    parts.append("<h2>Per class</h2><table><tr><th>class (teacher)</th><th>n</th><th>fidelity</th><th>ceiling</th></tr>")
    for pc in r["per_class"]:
        parts.append(f"<tr><td>{e(pc['class'])}</td><td class='num'>{pc['n']}</td><td class='num'>{_fmt(pc['fidelity'], True)}</td>"
                     f"<td class='num'>{_fmt(pc['ceiling_fidelity'], True)}</td></tr>")
    parts.append("</table>")
    if "compare" in r:
        cmp_ = r["compare"]
        parts.append(f"<h2>Compared with <code>{e(str(cmp_['teacher'].get('spec')))}</code></h2>"
                     f"<p>Its surrogate's fidelity: {_fmt(cmp_['fidelity'], True)}; teachers agree on "
                     f"{_fmt(cmp_['teachers_agree'], True)}, surrogates on {_fmt(cmp_['surrogates_agree'], True)} of the images.</p>"
                     "<table><tr><th>concept</th><th>importance here</th><th>importance there</th></tr>")
        for row in cmp_["importance"]:
            parts.append(f"<tr><td>{e(row['concept'])}</td><td class='num'>{_fmt(row['this'])}</td><td class='num'>{_fmt(row['other'])}</td></tr>")
        parts.append("</table>")
    for title, rows, note in (("Where the surrogate disagrees with the teacher", r["disagreements"], "surrogate_label"),
                              ("Where no concept explains the teacher", r["unexplained"], None)):
        parts.append(f"<h2>{e(title)} ({len(rows)})</h2>")
        if not rows:
            parts.append("<p class='muted'>None.</p>")
            continue
        parts.append("<table class='thumbs'><tr><th></th><th>image</th><th>teacher</th>" + ("<th>surrogate</th>" if note else "") + "</tr>")
        for row in rows[:max_thumbs]:
            parts.append(f"<tr><td>{_thumb(row['path'])}</td><td><code>{e(Path(row['path']).name)}</code></td>"
                         f"<td>{e(row['teacher_label'])}</td>" + (f"<td>{e(row[note])}</td>" if note else "") + "</tr>")
        parts.append("</table>")
        if len(rows) > max_thumbs:
            parts.append(f"<p class='muted'>… and {len(rows) - max_thumbs} more in report.json.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: dict, out_dir, *, model: SurrogateModel | None = None) -> Path:
    """Write ``report.json`` and ``report.html`` (with the tree as inline SVG for tree surrogates) atomically."""
    svg = None
    if model is not None and model.kind == "tree":
        from .export import _pipe, export_dot
        try:
            svg = _pipe(export_dot(model.estimator, concept_names=model.concepts, class_names=model.classes), "svg").decode()
            svg = svg[svg.find("<svg"):]
        except InputError:
            svg = None  # Graphviz missing: the report is still complete without the picture
    with atomic_dir(out_dir) as tmp:
        (tmp / "report.json").write_text(to_json(report) + "\n")
        (tmp / "report.html").write_text(report_html(report, tree_svg=svg))
    return Path(out_dir)
