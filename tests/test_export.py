"""Tests for surrogate.export: text, DOT, rendering, highlighting, escaping, atomic writes."""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest

from concepts.errors import InputError
from surrogate.estimators import TreeSurrogate
from surrogate.export import PATH_COLOR, export_dot, export_text, render

CONCEPTS = ["fur", "whiskers", "pointy_ears", "stripes"]
CLASSES = ["cat", "tiger", "dog"]
HOSTILE_CONCEPT = 'a<b>&"c'
HOSTILE_CLASS = "]; node [shape=box"

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' is not installed")

NODE_RE = re.compile(r"^(\d+) \[(.*)\];$")
EDGE_RE = re.compile(r"^(\d+) -> (\d+) \[(.*)\];$")


def _data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 3, n)
    noise = lambda: rng.normal(0, 0.15, n)  # noqa: E731
    X = pd.DataFrame({
        "fur": np.clip(np.where(cls < 2, 0.85, 0.5) + noise(), 0, 1),
        "whiskers": np.clip(np.where(cls < 2, 0.8, 0.2) + noise(), 0, 1),
        "pointy_ears": np.clip(np.where(cls < 2, 0.9, 0.1) + noise(), 0, 1),
        "stripes": np.clip(np.where(cls == 1, 0.85, 0.1) + noise(), 0, 1),
    })
    P = np.full((n, 3), 0.05)
    P[np.arange(n), cls] = 0.9
    return X, pd.DataFrame(P, columns=CLASSES)


@pytest.fixture(scope="module")
def data():
    return _data()


@pytest.fixture(scope="module")
def model(data):
    X, Y = data
    return TreeSurrogate(max_depth=3).fit(X, Y)


@pytest.fixture(scope="module")
def single_leaf(data):
    X, _ = data
    Y = pd.DataFrame(np.tile([1.0, 0.0, 0.0], (len(X), 1)), columns=CLASSES)
    m = TreeSurrogate(max_depth=3).fit(X, Y)
    assert m.tree_.n_nodes == 1
    return m


def _nodes(dot):
    return {int(m.group(1)): m.group(2) for line in dot.splitlines() if (m := NODE_RE.match(line))}


def _edges(dot):
    return {(int(m.group(1)), int(m.group(2))): m.group(3) for line in dot.splitlines() if (m := EDGE_RE.match(line))}


def _svg_text(svg: bytes) -> str:
    root = ET.fromstring(svg)
    return " ".join(t for el in root.iter() for t in [el.text] if t)


# ---------------------------------------------------------------------------------------------- text


def test_export_text_structure(model):
    text = export_text(model)
    lines = text.splitlines()
    tree = model.tree_
    leaf_lines = [ln for ln in lines if "class:" in ln]
    assert len(leaf_lines) == tree.n_leaves
    split_lines = [ln for ln in lines if "class:" not in ln]
    assert len(split_lines) == 2 * (tree.n_nodes - tree.n_leaves)
    for ln in split_lines:
        assert re.fullmatch(r"(\|   )*\|--- (fur|whiskers|pointy_ears|stripes) (<=|> ) \d\.\d\d", ln), ln
    for ln in leaf_lines:
        assert re.fullmatch(r"(\|   )*\|--- class: (cat|tiger|dog) \((\d{1,3}|>99|<1)%\)", ln), ln
    # the root split comes first, its threshold formatted with 2 decimals
    root = f"{CONCEPTS[tree.feature[0]]} <= {tree.threshold[0]:.2f}"
    assert lines[0] == f"|--- {root}"
    # leaves appear in pre-order (left first) with the predicted class
    leaves = [n for n in tree.leaf_paths()]
    predicted = [CLASSES[int(np.argmax(tree.value[n]))] for n in sorted(leaves, key=lambda n: tree.leaf_paths()[n])]
    assert [re.search(r"class: (\w+)", ln).group(1) for ln in leaf_lines] == predicted


def test_export_text_options(model):
    text = export_text(model, concept_names=["A", "B", "C", "D"], class_names=["x", "y", "z"], decimals=3)
    assert "fur" not in text and "cat" not in text
    assert re.search(r"[ABCD] <= \d\.\d{3}\n", text)
    with pytest.raises(InputError):
        export_text(model, concept_names=["only", "three", "names"])
    with pytest.raises(InputError):
        export_text(model, class_names=["x"])


def test_export_text_default_names_without_dataframe(data):
    X, Y = data
    m = TreeSurrogate(max_depth=2).fit(X.to_numpy(), Y.to_numpy())
    text = export_text(m)
    assert "concept_" in text and "class: " in text
    assert re.search(r"class: [012] \(", text)


def test_single_leaf_text(single_leaf):
    assert export_text(single_leaf) == "|--- class: cat (100%)\n"


# ----------------------------------------------------------------------------------------------- dot


def test_export_dot_contents(model):
    dot = export_dot(model, title="My tree")
    tree = model.tree_
    used = {CONCEPTS[f] for f in tree.feature if f >= 0}
    for c in used:
        assert f"<B>{c.replace('_', ' ')}</B>" in dot
    assert "pointy_ears" not in dot  # underscores become spaces
    predicted = {CLASSES[int(np.argmax(tree.value[n]))] for n in range(tree.n_nodes) if tree.children_left[n] < 0}
    for c in predicted:
        assert f"<B>{c}</B>" in dot
    assert "My tree" in dot and "rankdir=TB" in dot and "rounded" in dot
    assert set(_nodes(dot)) == set(range(tree.n_nodes))
    edges = _edges(dot)
    assert len(edges) == tree.n_nodes - 1
    for n in range(tree.n_nodes):
        if tree.children_left[n] >= 0:
            assert '"no"' in edges[(n, int(tree.children_left[n]))]
            assert '"yes"' in edges[(n, int(tree.children_right[n]))]
            assert f"score &gt; {tree.threshold[n]:.2f} ?" in dot
    # "no" edges are declared before "yes" edges so ordering=out keeps "yes" on the right
    assert "ordering=out" in dot
    order = [k for k in edges]
    for n in range(tree.n_nodes):
        if tree.children_left[n] >= 0:
            assert order.index((n, tree.children_left[n])) < order.index((n, tree.children_right[n]))
    assert "of images" in dot


def test_highlight_marks_exactly_the_decision_path(model, data):
    X, _ = data
    for i in (0, 7, 42):
        x = X.iloc[i].to_numpy()
        path = model.tree_.decision_path(x)
        dot = export_dot(model, highlight=x)
        marked = {n for n, attrs in _nodes(dot).items() if PATH_COLOR in attrs}
        assert marked == set(path)
        bold_edges = {e for e, attrs in _edges(dot).items() if PATH_COLOR in attrs}
        assert bold_edges == set(zip(path[:-1], path[1:]))
        for n in path[:-1]:
            name = CONCEPTS[model.tree_.feature[n]].replace("_", " ")
            assert f"{name} = {x[model.tree_.feature[n]]:.2f}" in _nodes(dot)[n]
        assert "this image" in _nodes(dot)[path[-1]]
    # a pandas Series is aligned by concept name
    s = X.iloc[7][::-1]
    assert export_dot(model, highlight=s) == export_dot(model, highlight=X.iloc[7].to_numpy())
    assert PATH_COLOR not in export_dot(model)
    with pytest.raises(InputError):
        export_dot(model, highlight=[0.5, 0.5])
    with pytest.raises(InputError):
        export_dot(model, highlight=[np.nan, 0.5, 0.5, 0.5])


def test_hostile_names_are_escaped(model):
    concepts = [HOSTILE_CONCEPT, "whiskers", HOSTILE_CLASS, "x & y"]
    classes = [HOSTILE_CLASS, 'a<b>&"c', "d'o\ng"]
    dot = export_dot(model, concept_names=concepts, class_names=classes, title='<T> & "title"',
                     highlight=[0.9, 0.9, 0.9, 0.9])
    assert "a&lt;b&gt;&amp;&quot;c" in dot
    assert "&lt;T&gt; &amp; &quot;title&quot;" in dot
    assert 'a<b>&"c' not in dot and "<T>" not in dot and '"title"' not in dot
    assert "d&#39;o g" in dot  # newline flattened, quote escaped
    # no raw < > & " inside any label's text: strip the known markup and look for leftovers
    for line in dot.splitlines():
        for m in re.finditer(r"<TD[^>]*>(.*?)</TD>", line):
            text = re.sub(r"</?(FONT|B|BR)[^>]*>|<IMG [^>]*/>", "", m.group(1))
            assert not re.search(r'[<>"]|&(?!(lt|gt|amp|quot|#39);)', text), text
    # the injected statement did not create nodes
    assert set(_nodes(dot)) == set(range(model.tree_.n_nodes))


@needs_dot
def test_hostile_names_render(model, tmp_path):
    concepts = [HOSTILE_CONCEPT, "whiskers", HOSTILE_CLASS, "x & y"]
    classes = [HOSTILE_CLASS, 'a<b>&"c', "dog"]
    out = render(model, tmp_path / "h.svg", concept_names=concepts, class_names=classes, title='<T> & "t"',
                 highlight=[0.9, 0.1, 0.9, 0.1])
    svg = out.read_bytes()
    text = _svg_text(svg)  # XML-parses, so the SVG itself is well formed
    used = {concepts[f] for f in model.tree_.feature if f >= 0}
    for c in used:
        assert c in text
    assert '<T> & "t"' in text
    assert svg.count(b'class="node"') == model.tree_.n_nodes


# -------------------------------------------------------------------------------------------- render


@needs_dot
@pytest.mark.parametrize("suffix", [".svg", ".png", ".pdf", ".dot"])
def test_render_formats(model, tmp_path, suffix):
    out = render(model, tmp_path / f"tree{suffix}", title="t")
    assert out == tmp_path / f"tree{suffix}"
    data = out.read_bytes()
    magic = {".svg": b"<svg", ".png": b"\x89PNG\r\n\x1a\n", ".pdf": b"%PDF", ".dot": b"digraph Tree"}[suffix]
    if suffix == ".svg":
        assert magic in data
        assert "pointy ears" in _svg_text(data) or "stripes" in _svg_text(data)
    else:
        assert data.startswith(magic)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"tree{suffix}"]  # no temp files left


@needs_dot
def test_render_png_dpi(model, tmp_path):
    from PIL import Image

    small = Image.open(render(model, tmp_path / "a.png", dpi=50)).size
    big = Image.open(render(model, tmp_path / "b.png", dpi=100)).size
    assert big[0] > 1.5 * small[0]
    with pytest.raises(InputError):
        render(model, tmp_path / "c.png", dpi=0)


def test_render_dot_needs_no_graphviz(model, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")
    out = render(model, tmp_path / "t.DOT")
    assert out.read_text().startswith("digraph Tree {")


def test_missing_dot_binary_is_an_input_error(model, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(InputError, match="install Graphviz") as e:
        render(model, tmp_path / "t.png")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_unknown_suffix_writes_nothing(model, tmp_path):
    for name in ("tree.jpg", "tree", "tree.svg.bak"):
        with pytest.raises(InputError, match=r"--out FILE: expected \.svg, \.png, \.pdf or \.dot"):
            render(model, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


@needs_dot
def test_atomic_write_replaces_and_cleans_up(model, tmp_path, monkeypatch):
    out = tmp_path / "tree.svg"
    out.write_text("old")
    render(model, out)
    assert out.read_bytes() != b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["tree.svg"]

    import concepts.fileio as fileio

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", boom)
    before = out.read_bytes()
    with pytest.raises(OSError):
        render(model, out, title="new")
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tree.svg"]


@needs_dot
def test_single_leaf_renders(single_leaf, tmp_path):
    dot = export_dot(single_leaf, highlight=[0.1, 0.2, 0.3, 0.4])
    assert set(_nodes(dot)) == {0} and _edges(dot) == {}
    assert "<B>cat</B> 100%" in dot and "this image" in dot
    out = render(single_leaf, tmp_path / "one.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_dot
def test_thumbnails(model, tmp_path):
    from PIL import Image

    leaves = sorted(model.tree_.leaf_paths())
    thumb = tmp_path / 'th<u>mb "1".png'
    Image.new("RGB", (32, 32), (200, 30, 30)).save(thumb)
    thumbs = {leaves[0]: thumb, leaves[1]: tmp_path / "missing.png", 0: thumb}
    with pytest.warns(UserWarning) as rec:
        dot = export_dot(model, thumbnails=thumbs)
    msgs = " ".join(str(w.message) for w in rec)
    assert "missing.png" in msgs and "not a leaf" in msgs
    nodes = _nodes(dot)
    assert "<IMG" in nodes[leaves[0]] and "th&lt;u&gt;mb &quot;1&quot;.png" in nodes[leaves[0]]
    assert sum("<IMG" in a for a in nodes.values()) == 1
    with pytest.warns(UserWarning):
        out = render(model, tmp_path / "t.png", thumbnails=thumbs)
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([thumb.name, "t.png"])


def test_not_fitted():
    from concepts.errors import NotFittedError

    with pytest.raises(NotFittedError):
        export_text(TreeSurrogate())
