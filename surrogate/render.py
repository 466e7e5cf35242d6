"""``surrogate render``: draw a saved surrogate (a tree through Graphviz, a linear model as a weight map)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np

from concepts.errors import InputError
from concepts.fileio import atomic_write_bytes
from concepts.images import open_image

from .model import SurrogateModel

THUMB_SIZE = 64


def render_model(model, out, *, highlight=None, thumbnails: bool = False, title: str | None = None) -> Path:
    """Draw ``model`` (a :class:`SurrogateModel` or a ``MODEL_DIR``) to ``out`` (.svg/.png/.pdf/.dot).

    Parameters
    ----------
    highlight : str or Path, optional
        An image whose decision path is highlighted (the teacher runs on it to get concept scores).
    thumbnails : bool, default=False
        Show in each leaf the distillation image most typical of it (stored in ``MODEL_DIR``).
    """
    if not isinstance(model, SurrogateModel):
        model = SurrogateModel.load(model)
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".svg", ".png", ".pdf", ".dot"):
        raise InputError(f"--out {out}: expected a .svg, .png, .pdf or .dot file")
    if model.kind == "linear":
        if highlight or thumbnails:
            raise InputError("--highlight/--thumbnails: only for tree surrogates")
        return render_linear(model, out)
    from .export import render
    x = None
    if highlight:
        from .explain import explain
        x = np.array(list(explain(model, highlight)["concept_scores"].values()))
    title = title or (f"{model.kind} surrogate of {Path(model.teacher['spec']).name} at {model.layer}: "
                      f"fidelity {model.metrics.get('fidelity', float('nan')):.1%}")
    with tempfile.TemporaryDirectory() as tmp:
        thumbs = _thumbnails(model, Path(tmp)) if thumbnails else None
        return render(model.estimator, out, concept_names=model.concepts, class_names=model.classes,
                      highlight=x, thumbnails=thumbs, title=title)


def _thumbnails(model, tmp: Path) -> dict[int, str]:
    examples = model.examples or {}
    if not examples:
        raise InputError("--thumbnails: this MODEL_DIR stores no example images; distill it again")
    out = {}
    for leaf, path in examples.items():
        try:
            img = open_image(path)
        except InputError:
            continue  # the user's image moved: that leaf just has no picture
        img.thumbnail((THUMB_SIZE, THUMB_SIZE))
        dest = tmp / f"leaf{int(leaf)}.png"
        img.save(dest)
        out[int(leaf)] = str(dest)
    return out


def render_linear(model: SurrogateModel, out: Path) -> Path:
    """A class × concept heat map of the linear surrogate's weights (per standardised concept unit)."""
    if out.suffix.lower() == ".dot":
        raise InputError(f"--out {out}: .dot is only for tree surrogates; use .svg, .png or .pdf")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    w = model.estimator.coef_
    lim = max(float(np.abs(w).max()), 1e-9)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(model.concepts), 1.2 + 0.5 * len(model.classes)))
    im = ax.imshow(w, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(model.concepts)), [c.replace("_", " ") for c in model.concepts], rotation=40, ha="right")
    ax.set_yticks(range(len(model.classes)), model.classes)
    for (i, j), v in np.ndenumerate(w):
        if abs(v) > 1e-10:
            ax.text(j, i, f"{v:+.1f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="weight per standardised concept unit")
    ax.set_title(f"linear surrogate: fidelity {model.metrics.get('fidelity', float('nan')):.1%}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=out.suffix.lower()[1:], dpi=150)
    plt.close(fig)
    return atomic_write_bytes(out, buf.getvalue())
