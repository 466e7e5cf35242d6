"""Render a fitted surrogate tree as text, Graphviz DOT, or an image file.

Modelled on scikit-learn's ``sklearn/tree/_export.py``: free functions over a fitted model, private
exporter classes that share one node-text routine (:meth:`_BaseExporter.node_text`), and ``graphviz``
imported only where an image is actually drawn. The model itself has no drawing code.

Reading the picture: internal nodes ask ``score > t ?`` about one concept (scores are probabilities that
the concept is present); the right-hand edge is "yes" (concept present), the left-hand edge "no". A
leaf shows the predicted class, its share of the (soft) training weight in that leaf, the runners-up,
and the share of images reaching it. Leaves are tinted per class; a stronger tint means a purer leaf.

Every user-supplied string (concept names, class names, title, file paths) is escaped before it reaches
the DOT source, so names like ``a<b>&"c`` render literally and cannot inject DOT statements.
"""

from __future__ import annotations

import html
import numbers
import pathlib
import shutil
import subprocess
import warnings
from dataclasses import dataclass

import numpy as np

from concepts.errors import InputError, NotFittedError
from concepts.fileio import atomic_write_bytes

__all__ = ["export_text", "export_dot", "render"]

LEAF = -1

# matplotlib's tab10: a fixed qualitative palette, one hue per class (cycled past ten classes)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
PATH_COLOR = "#c2185b"  # highlighted path: a deep magenta that is not in the class palette
FONT = "DejaVu Sans,Helvetica,Arial,sans-serif"
SUFFIXES = {".svg": "svg", ".png": "png", ".pdf": "pdf", ".dot": "dot"}
RUNNER_UP_MIN = 0.05  # runners-up shown in a leaf when they hold at least this share
N_RUNNERS_UP = 2


# ----------------------------------------------------------------------------------------------------
# helpers


def _esc(s) -> str:
    """Escape any value for a Graphviz HTML-like label (also safe inside an attribute value)."""
    s = "".join(ch if ch.isprintable() else " " for ch in str(s))  # newlines, control chars, surrogates
    return html.escape(s, quote=True).replace("&#x27;", "&#39;")


def _words(name: str) -> str:
    """``pointy_ears`` -> ``pointy ears``."""
    return " ".join(str(name).replace("_", " ").split()) or str(name)


def _pct(p: float) -> str:
    """A proportion as a whole percentage that never rounds a non-zero share to 0% or an impure one to 100%."""
    if 0 < p < 0.005:
        return "<1%"
    if 0.995 <= p < 1:
        return ">99%"
    return f"{100 * p:.0f}%"


def _tint(color: str, alpha: float) -> str:
    """Mix ``color`` with white: ``alpha=0`` is white, ``alpha=1`` the colour itself."""
    rgb = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(255 + alpha * (c - 255)):02x}" for c in rgb)


def format_threshold(t: float, decimals: int = 2) -> str:
    """A threshold with ``decimals`` digits, more where rounding would hide it (0.9996 is not "1.00")."""
    text = f"{t:.{decimals}f}"
    for digits in range(decimals, 7):
        text = f"{t:.{digits}f}"
        if float(text) != float(round(t)) or abs(t - round(t)) < 1e-7:
            break
    return text


def _check_fitted(surrogate):
    tree = getattr(surrogate, "tree_", None)
    if tree is None or not hasattr(surrogate, "classes_"):
        raise NotFittedError(f"{type(surrogate).__name__} is not fitted yet: call fit(X, y) before exporting it")
    return tree


# ----------------------------------------------------------------------------------------------------
# the shared node-text routine


@dataclass(frozen=True)
class _NodeText:
    """Everything any exporter writes about one node, as plain (unescaped) strings."""

    leaf: bool
    concept: str = ""           # raw concept name (internal nodes)
    concept_words: str = ""     # "pointy ears"
    threshold: str = ""         # "0.50"
    classes: tuple = ()         # ((class name, "92%"), ...): the prediction first, then runners-up
    share: str = ""             # share of training images reaching the node, "18%"
    class_index: int = 0        # index of the predicted class
    purity: float = 1.0         # 0 (uniform over classes) .. 1 (one class)


class _BaseExporter:
    def __init__(self, surrogate, *, concept_names=None, class_names=None, decimals=2):
        self.tree = _check_fitted(surrogate)
        n_classes = int(np.asarray(self.tree.value).shape[1])
        used = np.asarray(self.tree.feature)
        n_features = getattr(surrogate, "n_features_in_", None)
        if n_features is None:
            n_features = int(used.max()) + 1 if used.size and used.max() >= 0 else 0
        self.n_features = int(n_features)

        if concept_names is None:
            names = getattr(surrogate, "feature_names_in_", None)
            concept_names = list(names) if names is not None else [f"concept_{i}" for i in range(self.n_features)]
        self.concept_names = [str(c) for c in concept_names]
        if len(self.concept_names) != self.n_features:
            raise InputError(f"concept_names has {len(self.concept_names)} names, "
                             f"expected {self.n_features} (one per concept the surrogate was fitted on)")

        if class_names is None:
            class_names = [str(c) for c in surrogate.classes_]
        self.class_names = [str(c) for c in class_names]
        if len(self.class_names) != n_classes:
            raise InputError(f"class_names has {len(self.class_names)} names, expected {n_classes}")

        if int(decimals) < 0:
            raise InputError(f"decimals={decimals}: expected a non-negative integer")
        self.decimals = int(decimals)

    def num(self, x: float) -> str:
        return f"{x:.{self.decimals}f}"

    def cut(self, t: float) -> str:
        return format_threshold(t, self.decimals)

    def is_leaf(self, node: int) -> bool:
        return int(self.tree.children_left[node]) == LEAF

    def node_text(self, node: int) -> _NodeText:
        """The one routine that decides what is said about a node; exporters only lay it out."""
        t = self.tree
        value = np.asarray(t.value[node], dtype=float)
        order = np.argsort(-value, kind="stable")
        top = int(order[0])
        classes = [(self.class_names[top], _pct(value[top]))]
        for k in order[1:1 + N_RUNNERS_UP]:
            if value[k] >= RUNNER_UP_MIN:
                classes.append((self.class_names[int(k)], _pct(value[k])))
        K = len(value)
        purity = 1.0 if K < 2 else float(np.clip((value[top] - 1 / K) / (1 - 1 / K), 0, 1))
        common = dict(classes=tuple(classes), share=_pct(float(t.weight[node])), class_index=top, purity=purity)
        if self.is_leaf(node):
            return _NodeText(leaf=True, **common)
        concept = self.concept_names[int(t.feature[node])]
        return _NodeText(leaf=False, concept=concept, concept_words=_words(concept),
                         threshold=self.cut(float(t.threshold[node])), **common)


# ----------------------------------------------------------------------------------------------------
# text


class _TextExporter(_BaseExporter):
    def export(self) -> str:
        lines: list[str] = []
        self._recurse(0, 1, lines)
        return "\n".join(lines) + "\n"

    def _recurse(self, node: int, depth: int, lines: list[str]) -> None:
        indent = "|   " * (depth - 1) + "|--- "
        info = self.node_text(node)
        if info.leaf:
            name, pct = info.classes[0]
            lines.append(f"{indent}class: {name} ({pct})")
            return
        lines.append(f"{indent}{info.concept} <= {info.threshold}")
        self._recurse(int(self.tree.children_left[node]), depth + 1, lines)
        lines.append(f"{indent}{info.concept} >  {info.threshold}")
        self._recurse(int(self.tree.children_right[node]), depth + 1, lines)


def export_text(surrogate, *, concept_names=None, class_names=None, decimals=2) -> str:
    """The tree as indented text, like :func:`sklearn.tree.export_text`.

    Each split prints as ``|--- fur <= 0.50`` (concept absent side) and ``|--- fur >  0.50`` (present
    side); each leaf as ``|--- class: cat (92%)``, the predicted class and its share of the leaf.

    Parameters
    ----------
    surrogate : TreeSurrogate
        A fitted surrogate (anything with ``tree_``, ``classes_`` and optionally ``feature_names_in_``).
    concept_names : list of str, optional
        Defaults to ``feature_names_in_``, else ``concept_0, concept_1, ...``.
    class_names : list of str, optional
        Defaults to ``[str(c) for c in classes_]``.
    decimals : int, default=2
        Digits after the point in thresholds.
    """
    return _TextExporter(surrogate, concept_names=concept_names, class_names=class_names,
                         decimals=decimals).export()


# ----------------------------------------------------------------------------------------------------
# DOT


class _DotExporter(_BaseExporter):
    def __init__(self, surrogate, *, highlight=None, thumbnails=None, title=None, graph_attrs=None, **kw):
        super().__init__(surrogate, **kw)
        self.title = title
        self.graph_attrs = dict(graph_attrs or {})
        self.x = self._check_highlight(highlight)
        self.path = set(self.tree.decision_path(self.x)) if self.x is not None else set()
        self.thumbnails = self._check_thumbnails(thumbnails)

    def _check_highlight(self, highlight):
        if highlight is None:
            return None
        if hasattr(highlight, "index") and hasattr(highlight, "to_numpy"):  # a pandas Series: align by name
            index = [str(i) for i in highlight.index]
            if set(self.concept_names) <= set(index):
                highlight = highlight.to_numpy()[[index.index(c) for c in self.concept_names]]
            else:
                highlight = highlight.to_numpy()
        try:
            x = np.asarray(highlight, dtype=float).ravel()
        except (TypeError, ValueError) as e:
            raise InputError(f"highlight: expected one image's concept scores as numbers ({e})") from None
        if x.shape != (self.n_features,):
            raise InputError(f"highlight has {x.size} scores, expected {self.n_features} (one per concept)")
        if not np.isfinite(x).all():
            raise InputError("highlight: concept scores must be finite numbers (found NaN or inf)")
        return x

    def _check_thumbnails(self, thumbnails) -> dict[int, str]:
        out: dict[int, str] = {}
        for node, path in dict(thumbnails or {}).items():
            try:
                node = int(node)
            except (TypeError, ValueError):
                warnings.warn(f"thumbnails: key {node!r} is not a node index; ignored", stacklevel=4)
                continue
            if not (0 <= node < self.tree.n_nodes) or not self.is_leaf(node):
                warnings.warn(f"thumbnails: node {node} is not a leaf of this tree; ignored", stacklevel=4)
                continue
            p = pathlib.Path(path)
            if not p.is_file():
                warnings.warn(f"thumbnails: {str(p)!r} for leaf {node} does not exist; ignored", stacklevel=4)
                continue
            out[node] = str(p.resolve())
        return out

    # -- labels ------------------------------------------------------------------------------------

    @staticmethod
    def _table(rows: list[str], image: str | None = None) -> str:
        cells = ""
        if image is not None:  # a fixed-size cell, so a large image cannot blow up the leaf
            cells += f'<TR><TD FIXEDSIZE="TRUE" WIDTH="64" HEIGHT="64"><IMG SRC="{_esc(image)}" SCALE="TRUE"/></TD></TR>'
        cells += "".join(f"<TR><TD>{r}</TD></TR>" for r in rows)
        return f'<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="1">{cells}</TABLE>'

    def _label(self, node: int, info: _NodeText) -> str:
        on_path = node in self.path
        rows: list[str] = []
        if info.leaf:
            name, pct = info.classes[0]
            rows.append(f'<FONT POINT-SIZE="16"><B>{_esc(name)}</B> {_esc(pct)}</FONT>')
            for name, pct in info.classes[1:]:
                rows.append(f'<FONT POINT-SIZE="10">{_esc(name)} {_esc(pct)}</FONT>')
            rows.append(f'<FONT POINT-SIZE="9" COLOR="#444444">{_esc(info.share)} of images</FONT>')
            if on_path:
                rows.append(f'<FONT POINT-SIZE="10" COLOR="{PATH_COLOR}"><B>this image</B></FONT>')
        else:
            rows.append(f'<FONT POINT-SIZE="13"><B>{_esc(info.concept_words)}</B></FONT>')
            rows.append(f"score &gt; {_esc(info.threshold)} ?")
            if on_path:
                value = self.num(float(self.x[int(self.tree.feature[node])]))
                rows.append(f'<FONT COLOR="{PATH_COLOR}"><B>{_esc(info.concept_words)} = {_esc(value)}</B></FONT>')
        return self._table(rows, image=self.thumbnails.get(node))

    def _node_attrs(self, node: int, info: _NodeText) -> dict[str, str]:
        attrs: dict[str, str] = {}
        if info.leaf:
            base = PALETTE[info.class_index % len(PALETTE)]
            attrs["fillcolor"] = f'"{_tint(base, 0.12 + 0.43 * info.purity)}"'
            attrs["color"] = f'"{base}"'
            attrs["penwidth"] = "1.2"
        else:
            attrs["fillcolor"] = '"#f7f7f7"'
            attrs["color"] = '"#777777"'
            attrs["penwidth"] = "1"
        if node in self.path:
            attrs["color"] = f'"{PATH_COLOR}"'
            attrs["penwidth"] = "3"
        return attrs

    # -- graph -------------------------------------------------------------------------------------

    def export(self) -> str:
        graph = {"rankdir": "TB", "ordering": "out", "nodesep": "0.35", "ranksep": "0.6", "bgcolor": '"white"',
                 "fontname": f'"{FONT}"', "pad": "0.2"}
        if self.title is not None and str(self.title).strip():
            graph.update(label=f'<<FONT POINT-SIZE="18"><B>{_esc(self.title)}</B></FONT><BR/> >',
                         labelloc='"t"', labeljust='"c"')
        graph.update(self.graph_attrs)
        out = ["digraph Tree {",
               f"graph [{_attrs(graph)}];",
               f'node [shape=box, style="rounded,filled", fontname="{FONT}", fontsize=11, '
               f'margin="0.14,0.06", fillcolor="white", color="#777777"];',
               f'edge [fontname="{FONT}", labelfontname="{FONT}", labelfontsize=10, color="#888888", labelfontcolor="#444444", arrowsize=0.7];']
        t = self.tree
        stack = [0]
        while stack:  # pre-order, left ("no") before right ("yes")
            node = stack.pop()
            info = self.node_text(node)
            out.append(f"{node} [label=<{self._label(node, info)}>, {_attrs(self._node_attrs(node, info))}];")
            if info.leaf:
                continue
            left, right = int(t.children_left[node]), int(t.children_right[node])
            # the answer sits next to the parent, on the outer side of its edge ("no" left, "yes" right)
            for child, word, angle in ((left, "no", "-25"), (right, "yes", "25")):
                attrs = {"taillabel": f'"{word}"', "labelangle": angle, "labeldistance": "3"}
                if node in self.path and child in self.path:
                    attrs.update(taillabel=f"<<B>{word}</B>>", color=f'"{PATH_COLOR}"', labelfontcolor=f'"{PATH_COLOR}"',
                                 penwidth="3")
                out.append(f"{node} -> {child} [{_attrs(attrs)}];")
            stack.extend([right, left])
        out.append("}")
        return "\n".join(out) + "\n"


def _attrs(d: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def export_dot(surrogate, *, concept_names=None, class_names=None, highlight=None, thumbnails=None, title=None,
               decimals=2) -> str:
    """The tree as Graphviz DOT source (top-to-bottom, rounded boxes, HTML-like labels).

    Internal nodes show the concept in words and the test ``score > t ?``; the right edge is "yes"
    (concept present), the left edge "no". Leaves show the predicted class and its share, up to two
    runners-up holding at least 5%, and the share of images reaching the leaf, tinted per class.

    Parameters
    ----------
    surrogate : TreeSurrogate
        A fitted surrogate (anything with ``tree_``, ``classes_`` and optionally ``feature_names_in_``).
    concept_names, class_names : list of str, optional
        See :func:`export_text`.
    highlight : array-like of shape (n_concepts,), optional
        One image's concept scores: the path it takes is drawn bold in a highlight colour, internal
        nodes on it show the image's score (``fur = 0.93``), and its leaf says "this image".
    thumbnails : dict {leaf node index: image path}, optional
        Small PNGs drawn inside those leaves. Missing files and non-leaf keys are ignored with a warning.
    title : str, optional
        Drawn at the top.
    decimals : int, default=2
        Digits after the point in thresholds and highlighted scores.
    """
    return _DotExporter(surrogate, concept_names=concept_names, class_names=class_names, highlight=highlight,
                        thumbnails=thumbnails, title=title, decimals=decimals).export()


# ----------------------------------------------------------------------------------------------------
# files


_NO_DOT = ("the Graphviz 'dot' program was not found: install Graphviz (e.g. `apt-get install graphviz` "
           "or `brew install graphviz`), or write a .dot file instead")


def _pipe(source: str, fmt: str) -> bytes:
    """Run ``dot -T<fmt>`` on ``source`` through the ``graphviz`` package (``dot`` directly if it is absent)."""
    try:
        import graphviz
    except ImportError:  # pragma: no cover - graphviz is a declared dependency
        exe = shutil.which("dot")
        if exe is None:
            raise InputError(_NO_DOT) from None
        return subprocess.run([exe, f"-T{fmt}"], input=source.encode("utf-8"), capture_output=True,
                              check=True).stdout
    try:
        return graphviz.Source(source).pipe(format=fmt, quiet=True)
    except graphviz.ExecutableNotFound:
        raise InputError(_NO_DOT) from None


def _embed_images(svg: bytes, thumbnails) -> bytes:
    """Replace references to thumbnail files in an SVG by data URIs, so the SVG stands alone."""
    import base64
    text = svg.decode("utf-8")
    for path in {str(p) for p in dict(thumbnails).values()}:
        try:
            data = pathlib.Path(path).read_bytes()
        except OSError:
            continue
        mime = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
        uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        text = text.replace(f'"{_esc(path)}"', f'"{uri}"')
    return text.encode("utf-8")


def render(surrogate, out_path, *, concept_names=None, class_names=None, highlight=None, thumbnails=None,
           title=None, dpi=150) -> pathlib.Path:
    """Draw the tree to ``out_path``; the format follows the suffix: ``.svg``, ``.png``, ``.pdf`` or ``.dot``.

    The file is written atomically (a temporary file in the same folder, then ``os.replace``); nothing
    is written when anything fails. ``dpi`` sets the resolution of ``.png`` output. Other parameters
    are those of :func:`export_dot`. Returns the path written.

    Raises
    ------
    InputError
        For an unknown suffix, or when an image format is asked for and Graphviz's ``dot`` is missing.
    """
    out = pathlib.Path(out_path)
    fmt = SUFFIXES.get(out.suffix.lower())
    if fmt is None:
        raise InputError("--out FILE: expected .svg, .png, .pdf or .dot")
    graph_attrs = {}
    if fmt == "png":
        if isinstance(dpi, bool) or not isinstance(dpi, numbers.Real) or not 1 <= dpi <= 2400:
            raise InputError(f"dpi={dpi!r}: expected a number between 1 and 2400")
        graph_attrs["dpi"] = f"{float(dpi):g}"
    source = _DotExporter(surrogate, concept_names=concept_names, class_names=class_names, highlight=highlight,
                          thumbnails=thumbnails, title=title, graph_attrs=graph_attrs).export()
    data = source.encode("utf-8") if fmt == "dot" else _pipe(source, fmt)
    if fmt == "svg" and thumbnails:
        data = _embed_images(data, thumbnails)
    if out.parent != pathlib.Path("") and not out.parent.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    return out
