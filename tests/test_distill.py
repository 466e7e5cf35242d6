"""Distillation pipeline: metrics, choices on validation data only, concept gate, augmentation."""

import numpy as np
import pandas as pd
import pytest

from concepts.errors import InputError
from concepts.fileio import to_json
from concepts.images import load_images
from concepts.probes import ConceptProbes, fit_probes
from concepts.teacher import load_teacher
from surrogate.distill import distill, select_complexity
from surrogate.metrics import bootstrap_ci, completeness, kl_divergence, softmax, total_variation


@pytest.fixture(scope="module")
def setup(teacher_files, zoo_dir):
    teacher = load_teacher(teacher_files["pt2"])
    concepts = load_images(zoo_dir / "concepts" / "images.csv")
    probes, _ = fit_probes(teacher, concepts, ["layer4"], teacher.preprocess, random_runs=3, progress=False)
    return teacher, probes, load_images(zoo_dir / "images")


def test_metric_formulas():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    q = np.array([[0.5, 0.4, 0.1], [0.2, 0.2, 0.6]])
    expected_kl = np.mean([sum(pi * np.log(pi / qi) for pi, qi in zip(pr, qr)) for pr, qr in zip(p, q)])
    assert kl_divergence(p, q) == pytest.approx(expected_kl)
    assert kl_divergence(p, p) == pytest.approx(0.0)
    assert total_variation(p, q) == pytest.approx(np.mean([0.5 * np.abs(a - b).sum() for a, b in zip(p, q)]))
    z = np.array([[2.0, 0.0, -1.0]])
    assert softmax(z, 2.0) == pytest.approx(np.exp(z / 2) / np.exp(z / 2).sum())
    assert completeness(0.9, 1.0, 0.2) == pytest.approx(0.875)
    assert completeness(1.0, 1.0, 0.2) == 1.0 and np.isnan(completeness(0.5, 0.2, 0.2))
    lo, hi = bootstrap_ci(np.array([1] * 90 + [0] * 10), seed=0)
    assert lo < 0.9 < hi and 0.8 < lo and hi < 0.97


def test_distill_metrics_and_determinism(setup):
    teacher, probes, images = setup
    a = distill(teacher, probes, images, teacher.preprocess, kind="tree", concepts="all", progress=False)
    b = distill(teacher, probes, images, teacher.preprocess, kind="tree", concepts="all", progress=False)
    m = a.metrics
    assert m["n_train"] + m["n_test"] == len(images) and m["n_augmented"] == 0
    assert m["fidelity_ci"][0] <= m["fidelity"] <= m["fidelity_ci"][1]
    assert 0 <= m["kl"] and 0 <= m["total_variation"] <= 1
    assert sum(pc["n"] for pc in m["per_class"]) == m["n_test"]
    assert m["frontier"] and all({"n_leaves", "fidelity"} == set(f) for f in m["frontier"])
    assert [f["n_leaves"] for f in m["frontier"]] == sorted(f["n_leaves"] for f in m["frontier"])
    assert a.estimator.n_leaves_ == m["n_leaves"]
    np.testing.assert_array_equal(a.estimator.tree_.threshold, b.estimator.tree_.threshold)
    assert to_json(m) == to_json(b.metrics)  # NaN-safe comparison
    # held-out images never fitted: the test rows are not among the training rows
    assert not set(a.fit_data["train"]) & set(a.fit_data["test"])


def test_select_complexity_picks_smallest_within_tolerance():
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.random((400, 3)), columns=["a", "b", "c"])
    y = (X["a"] > 0.5).astype(int) + (X["b"] > 0.7).astype(int)
    P = pd.DataFrame(np.eye(3)[y] * 0.9 + 0.1 / 3, columns=["x", "y", "z"])
    out = select_complexity("tree", X[:300], P[:300], X[300:], y[300:].to_numpy(), max_depth=6, max_leaves=None,
                            seed=0, tolerance=0.01)
    best = max(f["fidelity"] for f in out["frontier"])
    chosen = out["chosen"]
    assert chosen["fidelity"] >= best - 0.01
    assert all(f["n_leaves"] >= chosen["n_leaves"] for f in out["frontier"] if f["fidelity"] >= best - 0.01)


def test_noise_concepts_are_kept_out():
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(300, 12))
    labels = pd.DataFrame({"visible": (acts[:, 0] + 0.3 * rng.normal(size=300) > 0).astype(float),
                           "noise": rng.integers(0, 2, 300).astype(float)})
    probes = ConceptProbes(random_runs=8, random_state=0).fit({"l": acts}, labels)
    q = probes.quality_.set_index("concept")
    assert q.loc["visible", "probe_significant"] and not q.loc["noise", "probe_significant"]
    assert probes.significant_concepts() == ["visible"]
    assert probes.select(["visible"]).transform(acts).columns.tolist() == ["visible"]


def test_concept_choice_errors_and_augmentation(setup):
    teacher, probes, images = setup
    with pytest.raises(InputError, match="Did you mean 'horns'"):
        distill(teacher, probes, images, teacher.preprocess, concepts=["hornz"], progress=False)
    with pytest.raises(InputError, match="--augment"):
        distill(teacher, probes, images, teacher.preprocess, augment=-1, progress=False)
    m = distill(teacher, probes, images, teacher.preprocess, kind="linear", concepts=["fur", "horns", "stripes"],
                augment=1, progress=False)
    assert m.concepts == ["fur", "horns", "stripes"]
    assert m.metrics["excluded_concepts"] == [c for c in probes.concepts_ if c not in ("fur", "horns", "stripes")]
    assert m.metrics["n_augmented"] == m.metrics["n_train"]


def test_positive_unlabelled_probes_estimate_contamination():
    # labelled positives vs a random set of which 40% hold the concept (TCAV's random/ in real use)
    rng = np.random.default_rng(1)
    d, n_l, n_u, pi = 8, 150, 300, 0.4
    shift = np.zeros(d)
    shift[0] = 3.0
    pos = rng.normal(size=(n_l, d)) + shift
    u_has = rng.random(n_u) < pi
    unl = rng.normal(size=(n_u, d)) + np.outer(u_has, shift)
    acts = {"l": np.vstack([pos, unl])}
    labels = pd.DataFrame({"c": np.r_[np.ones(n_l), np.zeros(n_u)]})
    pu = ConceptProbes(random_runs=5, random_state=0).fit(acts, labels, random_negatives=True)
    plain = ConceptProbes(random_runs=5, random_state=0).fit(acts, labels)
    q = pu.quality_.iloc[0]
    assert abs(q["contamination"] - u_has.mean()) < 0.15
    assert q["auc"] > q["auc_raw"] and bool(q["probe_significant"])
    assert np.isnan(plain.quality_.iloc[0]["contamination"])
    # scores of the random set: concept holders high, the others low, unlike the plain probe's
    s_pu = pu.transform(acts)["c"].to_numpy()[n_l:]
    s_plain = plain.transform(acts)["c"].to_numpy()[n_l:]
    assert s_pu[u_has].mean() > 0.6 and s_pu[~u_has].mean() < 0.2
    assert s_plain[u_has].mean() < s_pu[u_has].mean()
    # the correction keeps the ranking
    from scipy.stats import spearmanr
    assert spearmanr(s_pu, s_plain).correlation > 0.99
