"""Tests for surrogate.model: the MODEL_DIR format (save/load round trip, refusals, atomic replacement)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from synthetic import CLASSES, CONCEPTS, synthetic  # noqa: E402  (tests/synthetic.py)

from concepts.errors import InputError
from concepts.images import Preprocess
from concepts.probes import ConceptProbes
from surrogate.estimators import LinearSurrogate, TreeSurrogate
from surrogate.metrics import softmax
from surrogate.model import ARRAYS_FILE, FORMAT_VERSION, MODEL_FILE, SurrogateModel

UNPICKLED = []  # filled if loading ever unpickles the booby-trapped array below


def _trap():
    UNPICKLED.append(True)
    return "unpickled"


class _Trap:
    def __reduce__(self):
        return (_trap, ())


@pytest.fixture(scope="module")
def setup():
    layer_acts, labels, logits = synthetic(200, 0)
    acts = layer_acts["layer4"]
    probes = ConceptProbes(random_runs=3).fit({"layer4": acts}, labels)
    X = probes.transform({"layer4": acts})
    P = pd.DataFrame(softmax(logits, 2.0), columns=CLASSES)
    models = {}
    for kind, est in (("tree", TreeSurrogate(max_depth=4)), ("linear", LinearSurrogate(C=0.5))):
        models[kind] = SurrogateModel(
            kind=kind, estimator=est.fit(X, P), probes=probes, classes=list(CLASSES),
            teacher={"spec": "x.pt2", "weights_sha256": "0" * 64, "weights": None}, layer="layer4",
            pooling="mean", preprocess=Preprocess(32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)),
            temperature=2.0, metrics={"fidelity": 0.9, "fidelity_ci": [0.85, 0.95]}, examples={3: "img/a.png"})
    return {"models": models, "acts": acts, "X": X}


# ------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("kind", ["tree", "linear"])
def test_round_trip(setup, tmp_path, kind):
    model, acts, X = setup["models"][kind], setup["acts"], setup["X"]
    out = model.save(tmp_path / "model")
    assert out == tmp_path / "model"
    back = SurrogateModel.load(out)
    assert back.kind == kind
    assert back.concepts == CONCEPTS and back.classes == CLASSES
    assert back.temperature == 2.0 and back.layer == "layer4" and back.pooling == "mean"
    assert back.preprocess == model.preprocess
    assert back.teacher == model.teacher
    assert back.metrics == model.metrics
    assert back.examples == {3: "img/a.png"}
    # the probes reproduce the same concept scores, so the whole pipeline gives the same outputs
    pd.testing.assert_frame_equal(back.concept_scores({"layer4": acts}), model.concept_scores({"layer4": acts}))
    np.testing.assert_array_equal(back.probes.transform(acts, "layer4"), model.probes.transform(acts, "layer4"))
    np.testing.assert_array_equal(back.estimator.predict_proba(X), model.estimator.predict_proba(X))
    np.testing.assert_array_equal(back.estimator.predict(X), model.estimator.predict(X))
    assert list(back.estimator.feature_names_in_) == CONCEPTS
    assert back.estimator.get_params() == model.estimator.get_params()
    np.testing.assert_array_equal(back.estimator.feature_importances(), model.estimator.feature_importances())
    if kind == "linear":
        assert back.estimator.transform_ == model.estimator.transform_
        np.testing.assert_array_equal(back.estimator.decision_function(X), model.estimator.decision_function(X))
    else:
        np.testing.assert_array_equal(back.estimator.apply(X), model.estimator.apply(X))
        assert back.estimator.depth_ == model.estimator.depth_
    # and it saves again identically
    back.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / MODEL_FILE).read_text()) == json.loads((out / MODEL_FILE).read_text())


@pytest.mark.parametrize("kind", ["tree", "linear"])
def test_saved_files(setup, tmp_path, kind):
    model = setup["models"][kind]
    out = model.save(tmp_path / "model")
    expected = {MODEL_FILE, ARRAYS_FILE, "metrics.json", "importance.csv"}
    if kind == "linear":
        expected.add("coefficients.csv")
    assert {p.name for p in out.iterdir()} == expected
    meta = json.loads((out / MODEL_FILE).read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["kind"] == kind
    assert json.loads((out / "metrics.json").read_text()) == model.metrics
    imp = pd.read_csv(out / "importance.csv")
    assert list(imp.columns) == ["concept", "importance"]
    assert list(imp["concept"]) == CONCEPTS
    assert imp["importance"].sum() == pytest.approx(1.0)
    with np.load(out / ARRAYS_FILE, allow_pickle=False) as npz:
        assert all(npz[k].dtype != object for k in npz.files)
    if kind == "linear":
        coef = pd.read_csv(out / "coefficients.csv")
        assert list(coef.columns) == ["class", "concept", "weight"]
        assert len(coef) == len(CLASSES) * (len(CONCEPTS) + 1)
        inter = coef[coef["concept"] == "(intercept)"].set_index("class")["weight"]
        assert list(inter.index) == CLASSES
        np.testing.assert_allclose(inter.to_numpy(), model.estimator.intercept_)
        w = coef[coef["concept"] != "(intercept)"].pivot(index="class", columns="concept", values="weight")
        np.testing.assert_allclose(w.loc[CLASSES, CONCEPTS].to_numpy(), model.estimator.coef_)
    else:
        with pytest.raises(InputError, match="linear"):
            model.coefficients()


# --------------------------------------------------------------------------------------- refusals
def test_unknown_format_version(setup, tmp_path):
    out = setup["models"]["tree"].save(tmp_path / "model")
    meta = json.loads((out / MODEL_FILE).read_text())
    meta["format_version"] = 999
    (out / MODEL_FILE).write_text(json.dumps(meta))
    with pytest.raises(InputError, match="999"):
        SurrogateModel.load(out)
    del meta["format_version"]
    (out / MODEL_FILE).write_text(json.dumps(meta))
    with pytest.raises(InputError, match="format version"):
        SurrogateModel.load(out)


def test_pickled_array_is_refused_without_unpickling(setup, tmp_path):
    out = setup["models"]["tree"].save(tmp_path / "model")
    with np.load(out / ARRAYS_FILE, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    trap = np.empty(1, dtype=object)
    trap[0] = _Trap()
    arrays["tree_value"] = trap  # an array the loader needs, replaced by a pickled object array
    np.savez(out / ARRAYS_FILE, **arrays)  # allow_pickle defaults to True when writing
    with np.load(out / ARRAYS_FILE, allow_pickle=True) as npz:  # sanity: the file really holds a pickle
        assert npz["tree_value"].dtype == object
    UNPICKLED.clear()
    with pytest.raises(InputError, match="unpickling"):
        SurrogateModel.load(out)
    assert UNPICKLED == []


def test_missing_model_json(tmp_path):
    with pytest.raises(InputError, match=MODEL_FILE):
        SurrogateModel.load(tmp_path)
    with pytest.raises(InputError, match=MODEL_FILE):
        SurrogateModel.load(tmp_path / "nope")


def test_corrupt_files(setup, tmp_path):
    out = setup["models"]["linear"].save(tmp_path / "model")
    (out / ARRAYS_FILE).write_bytes(b"not a zip")
    with pytest.raises(InputError, match=ARRAYS_FILE):
        SurrogateModel.load(out)
    (out / ARRAYS_FILE).unlink()
    with pytest.raises(InputError, match=ARRAYS_FILE):
        SurrogateModel.load(out)
    (out / MODEL_FILE).write_text("{not json")
    with pytest.raises(InputError, match="JSON"):
        SurrogateModel.load(out)


def test_unknown_kind(setup, tmp_path):
    out = setup["models"]["tree"].save(tmp_path / "model")
    meta = json.loads((out / MODEL_FILE).read_text())
    meta["kind"] = "forest"
    (out / MODEL_FILE).write_text(json.dumps(meta))
    with pytest.raises(InputError, match="forest"):
        SurrogateModel.load(out)


# ---------------------------------------------------------------------------------- atomic saving
def test_save_replaces_existing_dir_completely(setup, tmp_path):
    parent = tmp_path / "out"
    target = parent / "model"
    setup["models"]["linear"].save(target)
    (target / "stale.txt").write_text("left over")
    (target / "sub").mkdir()
    setup["models"]["tree"].save(target)
    assert {p.name for p in target.iterdir()} == {MODEL_FILE, ARRAYS_FILE, "metrics.json", "importance.csv"}
    assert SurrogateModel.load(target).kind == "tree"
    assert [p.name for p in parent.iterdir()] == ["model"]  # no temp or .old folders beside it


def test_failed_save_keeps_previous_dir(setup, tmp_path, monkeypatch):
    parent = tmp_path / "out"
    target = parent / "model"
    setup["models"]["linear"].save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        setup["models"]["tree"].save(target)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in parent.iterdir()] == ["model"]
    assert SurrogateModel.load(target).kind == "linear"


def test_save_over_a_file_is_refused(setup, tmp_path):
    target = tmp_path / "model"
    target.write_text("a file")
    with pytest.raises(InputError, match="not a folder"):
        setup["models"]["tree"].save(target)
    assert target.read_text() == "a file"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
