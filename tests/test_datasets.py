"""Tests for the procedural toy zoo (concepts.datasets)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from concepts.datasets import (
    CLASSES,
    CONCEPTS,
    SPURIOUS,
    ZooSample,
    make_samples,
    render,
    write_concept_folders,
    write_image_folder,
    write_table,
)

ALL = CONCEPTS + SPURIOUS


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


@pytest.fixture(scope="module")
def population():
    return make_samples(2000, seed=123)


# ---------------------------------------------------------------- sampling


def test_sample_structure():
    samples = make_samples(30, seed=5)
    assert len(samples) == 30
    for i, s in enumerate(samples):
        assert isinstance(s, ZooSample)
        assert s.index == i
        assert s.label in CLASSES
        assert set(s.concepts) == set(ALL)
        assert all(isinstance(v, bool) for v in s.concepts.values())
        # params are JSON-serialisable and survive a round trip unchanged
        assert json.loads(json.dumps(s.params)) == s.params


def test_determinism_same_seed():
    a = make_samples(25, seed=7)
    b = make_samples(25, seed=7)
    assert a == b
    for s, t in zip(a[:5], b[:5], strict=True):
        assert _png_bytes(render(s)) == _png_bytes(render(t))
        assert _png_bytes(render(s)) == _png_bytes(render(s))  # repeated calls


def test_prefix_stability():
    assert make_samples(10, seed=3)[:4] == make_samples(4, seed=3)


def test_different_seed_differs():
    a = make_samples(25, seed=1)
    b = make_samples(25, seed=2)
    assert [s.params for s in a] != [s.params for s in b]
    assert [s.label for s in a] != [s.label for s in b]
    assert _png_bytes(render(a[0])) != _png_bytes(render(b[0]))


def test_geometry_independent_of_rule_arguments():
    a = make_samples(20, seed=4)
    b = make_samples(20, seed=4, watermark_class="dog", watermark_corr=0.8, label_noise=0.3)
    assert [s.params for s in a] == [s.params for s in b]
    for s, t in zip(a, b, strict=True):
        assert {c: s.concepts[c] for c in CONCEPTS} == {c: t.concepts[c] for c in CONCEPTS}


def test_class_rules(population):
    always = {
        "cat": ["pointy_ears", "whiskers", "fur"],
        "tiger": ["pointy_ears", "whiskers", "fur", "stripes"],
        "leopard": ["pointy_ears", "whiskers", "fur", "spots"],
        "dog": ["floppy_ears", "long_snout"],
        "cow": ["horns"],
        "rabbit": ["floppy_ears", "whiskers"],
    }
    never = {
        "cat": ["stripes", "horns", "floppy_ears", "long_snout", "spots"],
        "tiger": ["horns", "floppy_ears", "long_snout", "spots"],
        "leopard": ["horns", "floppy_ears", "long_snout", "stripes"],
        "dog": ["pointy_ears", "horns", "stripes"],
        "cow": ["whiskers", "pointy_ears", "stripes"],
        "rabbit": ["long_snout", "horns", "pointy_ears", "stripes"],
    }
    counts = {c: 0 for c in CLASSES}
    for s in population:
        counts[s.label] += 1
        for c in always[s.label]:
            assert s.concepts[c], (s.label, c)
        for c in never[s.label]:
            assert not s.concepts[c], (s.label, c)
        assert not (s.concepts["pointy_ears"] and s.concepts["floppy_ears"])
    # classes are roughly uniform
    for c in CLASSES:
        expected = 0.2 if c in ("cat", "tiger", "leopard") else 0.4 / 3
        assert abs(counts[c] / len(population) - expected) < 0.04


def test_class_conditional_rates(population):
    df = pd.DataFrame([{"label": s.label, **s.concepts} for s in population])
    rates = df.groupby("label")[list(CONCEPTS)].mean()
    assert rates.loc["dog", "spots"] == pytest.approx(0.3, abs=0.08)
    assert rates.loc["dog", "fur"] == pytest.approx(0.7, abs=0.08)
    assert rates.loc["cow", "spots"] == pytest.approx(0.7, abs=0.08)
    assert rates.loc["cow", "floppy_ears"] == pytest.approx(0.4, abs=0.08)
    assert rates.loc["rabbit", "fur"] == pytest.approx(0.8, abs=0.08)


def test_label_noise():
    clean = make_samples(300, seed=9)
    noisy = make_samples(300, seed=9, label_noise=1.0)
    for s, t in zip(clean, noisy, strict=True):
        assert s.concepts == t.concepts
        assert s.label != t.label
    some = make_samples(1000, seed=9, label_noise=0.2)
    flipped = np.mean([s.label != t.label for s, t in zip(make_samples(1000, seed=9), some, strict=True)])
    assert flipped == pytest.approx(0.2, abs=0.04)


def test_watermark_correlation():
    samples = make_samples(2000, seed=11, watermark_class="cow", watermark_corr=0.9)
    cow = [s.concepts["watermark"] for s in samples if s.label == "cow"]
    other = [s.concepts["watermark"] for s in samples if s.label != "cow"]
    assert np.mean(cow) == pytest.approx(0.9, abs=0.05)
    assert np.mean(other) == pytest.approx(0.025, abs=0.02)


def test_watermark_default_rate(population):
    assert np.mean([s.concepts["watermark"] for s in population]) == pytest.approx(0.1, abs=0.03)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        make_samples(3, watermark_class="unicorn", watermark_corr=0.5)
    with pytest.raises(ValueError):
        make_samples(3, watermark_corr=1.5)
    with pytest.raises(ValueError):
        make_samples(3, seed=-1)
    with pytest.raises(KeyError):
        render(make_samples(1)[0], overrides={"wings": True})


def test_decision_tree_learnability(population):
    tree_mod = pytest.importorskip("sklearn.tree")
    test = make_samples(1000, seed=456)
    x_tr = np.array([[s.concepts[c] for c in CONCEPTS] for s in population], dtype=int)
    y_tr = [s.label for s in population]
    x_te = np.array([[s.concepts[c] for c in CONCEPTS] for s in test], dtype=int)
    y_te = np.array([s.label for s in test])
    clf = tree_mod.DecisionTreeClassifier(max_depth=4, random_state=0).fit(x_tr, y_tr)
    assert np.mean(clf.predict(x_te) == y_te) >= 0.95


# ---------------------------------------------------------------- rendering


@pytest.mark.parametrize("size", [32, 64, 128])
def test_render_size_and_mode(size):
    img = render(make_samples(1, seed=2)[0], image_size=size)
    assert img.mode == "RGB"
    assert img.size == (size, size)


def _head_box(s: ZooSample, size: int, pad: float):
    h = s.params["head"]
    x0 = int(np.floor((h["cx"] - h["rx"]) * size - pad))
    x1 = int(np.ceil((h["cx"] + h["rx"]) * size + pad))
    y0 = int(np.floor((h["cy"] - h["ry"]) * size - pad))
    y1 = int(np.ceil((h["cy"] + h["ry"]) * size + pad))
    return max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)


@pytest.mark.parametrize("concept", ALL)
def test_override_toggles(concept):
    for s in make_samples(4, seed=21):
        base = render(s)
        same = render(s, overrides={concept: s.concepts[concept]})
        assert _png_bytes(base) == _png_bytes(same)
        flipped = render(s, overrides={concept: not s.concepts[concept]})
        diff = np.abs(_arr(base) - _arr(flipped)).sum(axis=2) > 0
        assert diff.any(), concept
        # a toggle is local: it never repaints most of the image
        assert diff.mean() < 0.6, (concept, diff.mean())
        # and the far corners (background) are untouched except by the
        # watermark, which lives in a corner itself
        if concept != "watermark":
            # watermark corners: 0 top-left, 1 top-right, 2 bottom-right, 3 bottom-left
            wm_corner = s.params["watermark"]["corner"]
            for k, (i, j) in enumerate([(0, 0), (0, -1), (-1, -1), (-1, 0)]):
                if s.concepts["watermark"] and k == wm_corner:
                    continue
                assert not diff[i, j], (concept, (i, j))


@pytest.mark.parametrize("concept", ["stripes", "spots", "fur"])
def test_markings_stay_on_the_head(concept):
    size = 64
    for s in make_samples(6, seed=31):
        on = render(s, image_size=size, overrides={concept: True})
        off = render(s, image_size=size, overrides={concept: False})
        diff = np.abs(_arr(on) - _arr(off)).sum(axis=2) > 0
        # fur tufts reach ~15% past the outline; Lanczos adds up to 3 px
        pad = 4 + (0.15 * size * s.params["head"]["rx"] if concept == "fur" else 0)
        x0, y0, x1, y1 = _head_box(s, size, pad=pad)
        outside = diff.copy()
        outside[y0:y1, x0:x1] = False
        assert diff.any()
        assert not outside.any(), concept


def test_override_all_off_and_on_is_consistent():
    s = make_samples(1, seed=8)[0]
    all_on = {c: True for c in ALL}
    a = render(s, overrides=all_on)
    b = render(s, overrides=all_on)
    assert _png_bytes(a) == _png_bytes(b)
    assert _png_bytes(a) != _png_bytes(render(s, overrides={c: False for c in ALL}))


# ---------------------------------------------------------------- writing


def _check_frame(df: pd.DataFrame, root, samples):
    assert list(df.columns) == ["path", "label", *ALL]
    assert len(df) == len(samples)
    for c in ALL:
        assert pd.api.types.is_integer_dtype(df[c]), c
        assert set(df[c].unique()) <= {0, 1}
    for row, s in zip(df.itertuples(index=False), samples, strict=True):
        assert not os.path.isabs(row.path)
        assert row.path == f"{s.label}/{s.label}_{s.index:05d}.png"
        assert (root / row.path).is_file()
        assert row.label == s.label
        for c in ALL:
            assert getattr(row, c) == int(s.concepts[c])


def test_write_image_folder(tmp_path):
    samples = make_samples(12, seed=41)
    df = write_image_folder(samples, tmp_path / "imgs", image_size=32)
    root = tmp_path / "imgs"
    _check_frame(df, root, samples)
    with Image.open(root / df.path[0]) as im:
        assert im.size == (32, 32)
        assert im.mode == "RGB"
        assert np.array_equal(np.asarray(im), np.asarray(render(samples[0], image_size=32)))
    assert {p.name for p in root.iterdir()} == {s.label for s in samples}
    assert not list(root.rglob("*.tmp"))


def test_write_table(tmp_path):
    samples = make_samples(10, seed=42)
    path = write_table(samples, tmp_path, image_size=32, name="meta.csv")
    assert path == tmp_path / "meta.csv"
    df = pd.read_csv(path)
    _check_frame(df, tmp_path, samples)
    assert not list(tmp_path.rglob("*.tmp"))
    # rewriting replaces the file cleanly
    path2 = write_table(samples[:4], tmp_path, image_size=32, name="meta.csv")
    assert len(pd.read_csv(path2)) == 4


@pytest.mark.parametrize("random_from", ["negatives", "all"])
def test_write_concept_folders(tmp_path, random_from):
    out = write_concept_folders(
        tmp_path / "tcav", n_per_concept=3, n_random=5, seed=1, image_size=32, random_from=random_from
    )
    assert out == tmp_path / "tcav"
    assert {p.name for p in out.iterdir()} == set(CONCEPTS) | {"random", "truth.csv"}
    for c in CONCEPTS:
        files = sorted((out / c).glob("*.png"))
        assert len(files) == 3
        with Image.open(files[0]) as im:
            assert im.size == (32, 32)
    assert len(list((out / "random").glob("*.png"))) == 5
    truth = pd.read_csv(out / "truth.csv")
    assert len(truth) == 3 * len(CONCEPTS) + 5 and all((out / p).is_file() for p in truth["path"])
    for c in CONCEPTS:  # every example of a concept's folder shows it
        assert truth[truth["path"].str.startswith(f"{c}/")][c].all()
    if random_from == "negatives":  # at most one listed concept left on in each random image
        assert (truth[truth["path"].str.startswith("random/")][list(CONCEPTS)].sum(1) <= 1).all()


def test_write_concept_folders_deterministic_and_subset(tmp_path):
    kw = dict(n_per_concept=2, n_random=3, seed=5, image_size=32, concepts=("stripes", "horns"))
    a = write_concept_folders(tmp_path / "a", **kw)
    b = write_concept_folders(tmp_path / "b", **kw)
    assert {p.name for p in a.iterdir()} == {"stripes", "horns", "random", "truth.csv"}
    for f in sorted(a.rglob("*.png")):
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes()
    with pytest.raises(ValueError):
        write_concept_folders(tmp_path / "c", concepts=("wings",))
    with pytest.raises(ValueError):
        write_concept_folders(tmp_path / "c", random_from="somewhere")


def test_concept_folder_contents(tmp_path, monkeypatch):
    import concepts.datasets as ds

    calls = []
    real_render = ds.render

    def spy(sample, *, image_size=64, overrides=None):
        calls.append((sample, dict(overrides or {})))
        return real_render(sample, image_size=image_size, overrides=overrides)

    monkeypatch.setattr(ds, "render", spy)
    listed = ("whiskers", "stripes", "horns", "spots")
    ds.write_concept_folders(
        tmp_path,
        n_per_concept=4,
        n_random=40,
        seed=3,
        image_size=16,
        concepts=listed,
        random_from="negatives",
    )
    assert len(calls) == 4 * len(listed) + 40
    positives, randoms = calls[: 4 * len(listed)], calls[4 * len(listed) :]
    for k, c in enumerate(listed):
        for sample, overrides in positives[4 * k : 4 * k + 4]:
            assert sample.concepts[c] and not overrides
    n_on = []
    for sample, overrides in randoms:
        effective = {**sample.concepts, **overrides}
        n_on.append(sum(effective[c] for c in listed))
    assert max(n_on) <= 1
    assert 0 < sum(n_on) < 40  # some variety, mostly negatives
