"""Tests for surrogate.explain: explanation objects, decision paths, contributions, counterfactuals,
plots and text, on SurrogateModels built from synthetic activations (no teacher network)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from synthetic import CLASSES, CONCEPTS, synthetic  # noqa: E402  (tests/synthetic.py)

from concepts.fileio import to_json
from concepts.images import Preprocess
from concepts.probes import ConceptProbes
from surrogate.estimators import LinearSurrogate, TreeSurrogate
from surrogate.explain import explain_scores, format_explanation, plot_explanation
from surrogate.metrics import softmax
from surrogate.model import SurrogateModel

TEMPERATURE = 2.0
PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])

scores_st = arrays(np.float64, (4,), elements=st.floats(0, 1, allow_nan=False))
logits_st = arrays(np.float64, (4,), elements=st.floats(-8, 8, allow_nan=False))


def _synthetic(n=240, seed=0):
    return synthetic(n, seed)


def _model(kind, estimator, probes):
    return SurrogateModel(kind=kind, estimator=estimator, probes=probes, classes=list(CLASSES),
                          teacher={"spec": "x.pt2", "weights_sha256": "0" * 64, "weights": None}, layer="layer4",
                          pooling="mean", preprocess=Preprocess(32), temperature=TEMPERATURE,
                          metrics={"fidelity": 0.9})


@pytest.fixture(scope="module")
def fitted():
    acts, labels, logits = _synthetic()
    probes = ConceptProbes(random_runs=3).fit(acts, labels)
    X = probes.transform(acts)
    P = pd.DataFrame(softmax(logits, TEMPERATURE), columns=CLASSES)
    tree = _model("tree", TreeSurrogate(max_depth=4).fit(X, P), probes)
    linear = _model("linear", LinearSurrogate(C=1.0).fit(X, P), probes)
    return {"tree": tree, "linear": linear, "X": X, "logits": logits}


def _apply(model, x, changes):
    z = np.array(x, dtype=float)
    for c, v in changes.items():
        z[model.concepts.index(c)] = v
    return model.estimator.predict(pd.DataFrame([z], columns=model.concepts))[0]


def _check_common(model, e, x, logits):
    est = model.estimator
    X = pd.DataFrame([x], columns=model.concepts)
    assert set(e) >= {"teacher", "surrogate", "concept_scores", "path", "contributions", "counterfactuals"}
    assert e["surrogate"]["label"] == est.predict(X)[0]
    # argmax of the probabilities (not of the raw logits: they may differ only below float resolution)
    assert e["teacher"]["label"] == CLASSES[int(np.argmax(softmax(logits[None], 1.0)[0]))]
    assert e["teacher"]["probs"][e["teacher"]["label"]] == max(e["teacher"]["probs"].values())
    assert e["surrogate"]["agrees"] == (e["teacher"]["label"] == e["surrogate"]["label"])
    for who in ("teacher", "surrogate"):
        probs = e[who]["probs"]
        assert list(probs) == CLASSES
        assert sum(probs.values()) == pytest.approx(1.0)
    np.testing.assert_allclose(list(e["surrogate"]["probs"].values()), est.predict_proba(X)[0])
    np.testing.assert_allclose(list(e["teacher"]["probs"].values()), softmax(logits[None], 1.0)[0])
    assert e["concept_scores"] == dict(zip(CONCEPTS, map(float, x)))
    # JSON-serialisable, and the round trip keeps the content
    back = json.loads(to_json(e))
    assert back["surrogate"]["label"] == e["surrogate"]["label"]
    assert back["counterfactuals"] == e["counterfactuals"]


def _check_counterfactuals(model, e, x, n):
    cfs = e["counterfactuals"]
    assert len(cfs) <= n
    labels = [cf["surrogate_label"] for cf in cfs]
    assert len(set(labels)) == len(labels)  # one per target label
    for cf in cfs:
        assert cf["changes"], cf
        assert set(cf["changes"]) <= set(CONCEPTS)
        assert all(0.0 <= v <= 1.0 for v in cf["changes"].values())
        assert cf["surrogate_label"] != e["surrogate"]["label"]
        assert _apply(model, x, cf["changes"]) == cf["surrogate_label"], (x, cf)


# -------------------------------------------------------------------------------------------- tree
@PROPS
@given(x=scores_st, logits=logits_st)
def test_tree_explanation(fitted, x, logits):
    model = fitted["tree"]
    est, tree = model.estimator, model.estimator.tree_
    e = explain_scores(model, x, logits, n_counterfactuals=3)
    _check_common(model, e, x, logits)
    leaf = int(est.apply(pd.DataFrame([x], columns=CONCEPTS))[0])
    assert e["leaf"] == leaf
    path = tree.leaf_paths()[leaf]
    assert len(e["path"]) == len(path) - 1
    for step, node, nxt in zip(e["path"], path[:-1], path[1:]):
        f = CONCEPTS.index(step["concept"])
        assert f == tree.feature[node]
        assert step["threshold"] == tree.threshold[node]
        assert step["value"] == x[f]
        assert (step["went"] == "<=") == (step["value"] <= step["threshold"])
        assert step["went"] in ("<=", ">")
        assert nxt == (tree.children_left[node] if step["went"] == "<=" else tree.children_right[node])
    # per-concept contributions telescope to leaf minus root proportion of the predicted class
    k = CLASSES.index(e["surrogate"]["label"])
    assert sum(e["contributions"].values()) == pytest.approx(tree.value[leaf, k] - tree.value[0, k])
    _check_counterfactuals(model, e, x, 3)
    changed = [len(cf["changes"]) for cf in e["counterfactuals"]]
    assert changed == sorted(changed)


def test_tree_counterfactuals_on_training_rows(fitted):
    model, X, logits = fitted["tree"], fitted["X"].to_numpy(), fitted["logits"]
    n_found = 0
    for x, z in zip(X[:60], logits[:60]):
        e = explain_scores(model, x, z, n_counterfactuals=5)
        _check_counterfactuals(model, e, x, 5)
        changed = [len(cf["changes"]) for cf in e["counterfactuals"]]
        assert changed == sorted(changed)
        n_found += len(e["counterfactuals"])
    assert n_found > 60  # every row has at least one other reachable class in a 4-class tree


def test_tree_counterfactual_count_limit(fitted):
    model, x, z = fitted["tree"], fitted["X"].to_numpy()[0], fitted["logits"][0]
    assert len(explain_scores(model, x, z, n_counterfactuals=1)["counterfactuals"]) == 1
    assert explain_scores(model, x, z, n_counterfactuals=0)["counterfactuals"] == []
    assert explain_scores(fitted["linear"], x, z, n_counterfactuals=0)["counterfactuals"] == []


# ------------------------------------------------------------------------------------------ linear
@PROPS
@given(x=scores_st, logits=logits_st)
def test_linear_explanation(fitted, x, logits):
    model = fitted["linear"]
    est = model.estimator
    e = explain_scores(model, x, logits, n_counterfactuals=3)
    _check_common(model, e, x, logits)
    assert e["path"] == [] and "leaf" not in e
    assert list(e["contributions"]) == CONCEPTS
    k = CLASSES.index(e["surrogate"]["label"])
    d = est.decision_function(pd.DataFrame([x], columns=CONCEPTS))[0, k]
    assert sum(e["contributions"].values()) + e["intercept"] == pytest.approx(d, abs=1e-9)
    assert e["intercept"] == est.intercept_[k]
    _check_counterfactuals(model, e, x, 3)


def test_linear_counterfactuals_on_training_rows(fitted):
    model, X, logits = fitted["linear"], fitted["X"].to_numpy(), fitted["logits"]
    for x, z in zip(X[:30], logits[:30]):
        e = explain_scores(model, x, z)
        _check_counterfactuals(model, e, x, 3)
        assert e["counterfactuals"], x
        # single-concept changes come first; a pair is only tried when no single change works
        sizes = {len(cf["changes"]) for cf in e["counterfactuals"]}
        assert sizes in ({1}, {2})


# ------------------------------------------------------------------------------------ plot & text
@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "cat.png"
    Image.new("RGB", (24, 20), (200, 120, 40)).save(p)
    return p


@pytest.mark.parametrize("kind", ["tree", "linear"])
def test_plot_explanation_writes_png(fitted, image_path, tmp_path, kind):
    model = fitted[kind]
    e = explain_scores(model, fitted["X"].to_numpy()[3], fitted["logits"][3])
    out = plot_explanation(e, image_path, tmp_path / "sub" / "explain.png", dpi=40)
    assert out == tmp_path / "sub" / "explain.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
    assert [p.name for p in out.parent.iterdir()] == ["explain.png"]  # no temp files left beside it


@pytest.mark.parametrize("kind", ["tree", "linear"])
def test_format_explanation_mentions_labels(fitted, kind):
    model = fitted[kind]
    x = fitted["X"].to_numpy()[5]
    e = explain_scores(model, x, fitted["logits"][5])
    text = format_explanation(e)
    lines = text.splitlines()
    assert lines[0].startswith("teacher:") and e["teacher"]["label"] in lines[0]
    assert lines[1].startswith("surrogate:") and e["surrogate"]["label"] in lines[1]
    assert "because:" in text and "concepts:" in text
    for cf in e["counterfactuals"]:
        assert f"would be {cf['surrogate_label']}" in text
    # a teacher that disagrees is flagged
    s = e["surrogate"]["label"]
    other = next(c for c in CLASSES if c != s)
    z = np.full(4, -5.0)
    z[CLASSES.index(other)] = 5.0
    e2 = explain_scores(model, x, z)
    assert e2["surrogate"]["agrees"] is False
    assert "DISAGREES" in format_explanation(e2) and other in format_explanation(e2).splitlines()[0]
