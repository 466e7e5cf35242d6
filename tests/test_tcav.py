"""TCAV: score formulas, directional derivatives against finite differences, exact agreement with captum's
``TCAV`` fed our CAVs, and the significance test on concepts with random (shuffled-label) CAVs."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from concepts import datasets as zoo
from concepts.activations import extract
from concepts.images import Preprocess, iter_batches, load_concept_source, load_images
from concepts.probes import ConceptProbes, fit_probes
from concepts.tcav import directional_derivatives, magnitude, sign_count, tcav
from concepts.teacher import load_teacher

SIZE = 32
LAYER = "layer3"  # (16, 8, 8) on the 32-pixel width-4 ToyResNet of conftest


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Single-threaded torch and BLAS for this module: tiny tensors gain nothing from threads, and on a
    busy 2-core machine an oversubscribed OpenMP pool makes each op tens of times slower."""
    from threadpoolctl import threadpool_limits
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher(teacher_files):
    return load_teacher(teacher_files["pt2"])


@pytest.fixture(scope="module")
def pre():
    return Preprocess(SIZE)


@pytest.fixture(scope="module")
def concept_set(zoo_dir):
    return load_concept_source(zoo_dir / "tcav")


@pytest.fixture(scope="module")
def inputs(zoo_dir):
    """30 images spread over every class of the zoo folder (TCAV's inputs)."""
    images = load_images(zoo_dir / "images")
    return images.subset(np.linspace(0, len(images) - 1, 30).round().astype(int))


@pytest.fixture(scope="module")
def probes(teacher, concept_set, pre):
    return fit_probes(teacher, concept_set, [LAYER], pre, random_runs=4, progress=False)[0]


def _batch(images, pre) -> torch.Tensor:
    return torch.cat(list(iter_batches(images.paths, pre, batch_size=64)))


# ------------------------------------------------------------------------------------- the formulas
def test_sign_count_and_magnitude_on_hand_made_arrays():
    d = np.array([[1.0, -2.0, 3.0, 0.0],      # 2 of 4 positive; pos mass 4 of |.| mass 6
                  [-1.0, -1.0, -1.0, -1.0],   # none positive
                  [0.0, 0.0, 0.0, 0.0],       # all zero: sign count 0 (zero is not positive), magnitude 0.5
                  [0.5, 0.5, 2.0, 1e-9]])     # all positive
    np.testing.assert_allclose(sign_count(d), [0.5, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(magnitude(d), [4 / 6, 0.0, 0.5, 1.0])
    # over the last axis, any leading shape
    d3 = np.stack([d, -d])
    assert sign_count(d3).shape == magnitude(d3).shape == (2, 4)
    np.testing.assert_allclose(sign_count(d3)[1], [0.25, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(magnitude(d3)[1], [2 / 6, 1.0, 0.5, 0.0])


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 30)),
              elements=st.floats(-1e6, 1e6, allow_nan=False)))
def test_scores_lie_in_unit_interval(d):
    s, m = sign_count(d), magnitude(d)
    assert s.shape == m.shape == d.shape[:-1]
    assert np.all((s >= 0) & (s <= 1)) and np.all((m >= 0) & (m <= 1))
    np.testing.assert_allclose(s, [np.count_nonzero(row > 0) / len(row) for row in d])
    # flipping every sign swaps positive and negative parts (zeros stay out of the sign count)
    np.testing.assert_allclose(sign_count(-d), [np.count_nonzero(row < 0) / len(row) for row in d])
    nonzero = np.abs(d).sum(-1) > 0
    np.testing.assert_allclose((m + magnitude(-d))[nonzero], 1.0, atol=1e-9)


# ---------------------------------------------------------------------- derivatives: finite differences
def _logits_shifted(module, layer, x, delta):
    """Logits with ``delta`` added to ``layer``'s output (broadcast over the batch)."""
    handle = dict(module.named_modules())[layer].register_forward_hook(lambda _m, _i, out: out + delta)
    try:
        with torch.no_grad():
            return module(x)
    finally:
        handle.remove()


@pytest.mark.parametrize("pooling", ["mean", "flatten"])
def test_directional_derivatives_match_finite_differences(teacher, toy_model, inputs, pre, pooling):
    """Ours (float32, through the exported teacher) against central differences of the same network in
    float64 (the conftest module the .pt2 was exported from), perturbing the tapped layer's output."""
    images = inputs.subset(range(8))
    x = _batch(images, pre)
    shape = teacher.forward(x[:1], [LAYER])[1][LAYER].shape[1:]  # (c, h, w)
    rng = np.random.default_rng(0)
    d = int(shape[0]) if pooling == "mean" else int(np.prod(shape))
    cavs = rng.standard_normal((3, d))
    cavs /= np.linalg.norm(cavs, axis=1, keepdims=True)
    ours = directional_derivatives(teacher, images, pre, LAYER, cavs, pooling=pooling, progress=False)
    assert ours.shape == (len(zoo.CLASSES), 3, len(images))
    net = copy.deepcopy(toy_model).double().eval()
    x64 = x.double()
    eps = 1e-5
    for m, v in enumerate(cavs):
        v = torch.as_tensor(v, dtype=torch.float64)
        # mean/max pooling: every spatial position moves by eps * v; flatten: the whole map moves by eps * v
        step = v[None, :, None, None] if pooling == "mean" else v.reshape(1, *shape)
        up = _logits_shifted(net, LAYER, x64, eps * step)
        down = _logits_shifted(net, LAYER, x64, -eps * step)
        fd = ((up - down) / (2 * eps)).numpy().T  # (n_classes, n_images)
        scale = np.abs(fd).max()
        np.testing.assert_allclose(ours[:, m, :], fd, atol=1e-4 * scale, rtol=1e-3)
        # and the derivative is not trivially zero
        assert scale > 0


# ------------------------------------------------------------------------------- captum equivalence
def _captum_scores(model, layer, x, directions, n_classes, save_path):
    """captum's ``TCAV.interpret`` sign counts and magnitudes for fixed CAVs in captum's (flattened) space.

    Direction ``i`` is concept ``i``; each experimental set is ``[concept i, random]`` and the fixed
    classifier returns ``[v_i, -v_i]`` for it, so captum's score for concept ``i`` is its sign count
    along ``v_i``. Returns arrays of shape (n_classes, n_directions) for the concept and for random.
    """
    from captum.concept import TCAV, Classifier, Concept
    from torch.utils.data import DataLoader

    vectors = torch.as_tensor(np.asarray(directions), dtype=torch.float32)
    random_id = len(vectors)

    class FixedCAVs(Classifier):
        """A captum concept classifier that trains nothing: its weights are our CAVs."""

        def __init__(self):
            self._ids = []

        def train_and_eval(self, dataloader, **kwargs):
            # which experimental set is being "trained": the concept ids are the labels
            self._ids = sorted({int(i) for _, labels in dataloader for i in labels})
            return {"accs": torch.tensor(1.0)}

        def weights(self):
            (j,) = [i for i in self._ids if i != random_id]
            return torch.stack([vectors[j] if i == j else -vectors[j] for i in self._ids])

        def classes(self):
            return list(self._ids)  # plain ints: captum reloads saved CAVs with weights_only=True

    examples = DataLoader(x[:1], batch_size=1)  # activations captum computes but our classifier ignores
    concepts = [Concept(i, f"c{i}", examples) for i in range(len(vectors))]
    rnd = Concept(random_id, "random", examples)
    sets = [[c, rnd] for c in concepts]
    tc = TCAV(model, [layer], classifier=FixedCAVs(), save_path=str(save_path))
    sign = np.zeros((n_classes, len(vectors)))
    sign_random = np.zeros_like(sign)
    mag = np.zeros_like(sign)
    for k in range(n_classes):
        out = tc.interpret(x, sets, target=k)
        for i in range(len(vectors)):
            res = out[f"{i}-{random_id}"][layer]
            sign[k, i], sign_random[k, i] = res["sign_count"].tolist()
            mag[k, i] = float(res["magnitude"][0])  # captum's "magnitude" is the mean product, not a ratio
    return sign, sign_random, mag


def _counts(fractions, n):
    """Sign-count fractions (captum's are float32 means) as exact counts of positive images."""
    counts = np.rint(np.asarray(fractions, dtype=np.float64) * n)
    np.testing.assert_allclose(counts, np.asarray(fractions, dtype=np.float64) * n, atol=1e-4)
    return counts.astype(int)


def _all_directions(probes, layer):
    main = probes.cavs(layer)
    real, null = probes.cav_runs(layer)
    return np.concatenate([main, real.reshape(-1, main.shape[1]), null.reshape(-1, main.shape[1])])


def test_tcav_scores_equal_captum_with_our_cavs_tiled_over_positions(teacher, inputs, pre, probes, tmp_path):
    """Mean-pooled CAVs: captum works on the flattened (c*h*w) map; our spatial-sum derivative equals
    captum's gradient · CAV with each channel's weight repeated over the h*w positions (channel-major,
    i.e. ``repeat_interleave``, matching captum's ``reshape(n, -1)`` of an (n, c, h, w) tensor)."""
    K = len(zoo.CLASSES)
    ours = tcav(teacher, inputs, pre, probes, zoo.CLASSES, layer=LAYER, progress=False)
    directions = _all_directions(probes, LAYER)
    derivs = directional_derivatives(teacher, inputs, pre, LAYER, directions, progress=False)
    c, h, w = teacher.forward(_batch(inputs.subset([0]), pre), [LAYER])[1][LAYER].shape[1:]
    assert directions.shape[1] == c
    tiled = np.repeat(directions, h * w, axis=1)  # (m, c*h*w), channel-major
    x = _batch(inputs, pre)
    sign, sign_random, mag = _captum_scores(teacher.module, LAYER, x, tiled, K, tmp_path / "cav")

    # every derivative is clear of zero, so float32 summation order cannot flip a sign
    assert np.abs(derivs).min() > 1e-5 * np.abs(derivs).max()
    n = len(inputs)
    np.testing.assert_array_equal(_counts(sign, n), (derivs > 0).sum(-1))
    np.testing.assert_array_equal(_counts(sign_random, n), (derivs < 0).sum(-1))
    np.testing.assert_allclose(mag, derivs.mean(-1), rtol=1e-4, atol=1e-6 * np.abs(derivs).max())
    # our reported tcav_score for each (class, concept) is captum's sign count of the same CAV
    k_n = len(probes.concepts_)
    expect = pd.DataFrame([(zoo.CLASSES[k], concept, sign[k, j]) for k in range(K)
                           for j, concept in enumerate(probes.concepts_)], columns=["class", "concept", "captum"])
    merged = ours.merge(expect, on=["class", "concept"], validate="one_to_one")
    assert len(merged) == K * k_n
    np.testing.assert_array_equal(_counts(merged["tcav_score"], n), _counts(merged["captum"], n))
    # not a degenerate comparison: some scores are strictly between 0 and 1
    assert ((sign > 0) & (sign < 1)).any()


def test_tcav_scores_equal_captum_in_flattened_space(teacher, concept_set, inputs, pre, tmp_path):
    """``pooling="flatten"``: our CAVs live in captum's own space and go in unchanged."""
    probes, acts = fit_probes(teacher, concept_set, [LAYER], pre, random_runs=2, pooling="flatten",
                              progress=False)
    K = len(zoo.CLASSES)
    directions = _all_directions(probes, LAYER)
    assert directions.shape[1] == acts[LAYER].shape[1] == 16 * 8 * 8
    ours = tcav(teacher, inputs, pre, probes, zoo.CLASSES, layer=LAYER, pooling="flatten", progress=False)
    derivs = directional_derivatives(teacher, inputs, pre, LAYER, directions, pooling="flatten", progress=False)
    sign, sign_random, _ = _captum_scores(teacher.module, LAYER, _batch(inputs, pre), directions, K, tmp_path / "cav")
    assert np.abs(derivs).min() > 1e-5 * np.abs(derivs).max()
    n = len(inputs)
    np.testing.assert_array_equal(_counts(sign, n), (derivs > 0).sum(-1))
    np.testing.assert_array_equal(_counts(sign_random, n), (derivs < 0).sum(-1))
    k_n = len(probes.concepts_)
    got = ours.set_index(["class", "concept"])["tcav_score"]
    for k in range(K):
        for j, concept in enumerate(probes.concepts_):
            assert _counts(got[(zoo.CLASSES[k], concept)], n) == _counts(sign[k, j], n)
    assert sign.shape == (K, k_n + 2 * k_n * 2)


# ------------------------------------------------------------------------------------- significance
def _shuffled(labels: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Each concept column's known labels permuted: the probes' CAVs (and their runs) are random."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    for c in out.columns:
        col = out[c].to_numpy(dtype=float, copy=True)
        known = ~np.isnan(col)
        col[known] = rng.permutation(col[known])
        out[c] = col
    return out


@pytest.fixture(scope="module")
def concept_acts(teacher, concept_set, pre):
    return extract(teacher, concept_set, [LAYER], pre, progress=False).layers


def _check_frame(df, n_rows):
    assert len(df) == n_rows
    assert list(df.columns) == ["class", "concept", "layer", "tcav_score", "magnitude", "tcav_sd", "p_value", "significant"]
    assert df["p_value"].between(0, 1).all()
    assert df["tcav_score"].between(0, 1).all() and df["magnitude"].between(0, 1).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_concept_is_not_significant(teacher, concept_set, concept_acts, inputs, pre, seed):
    labels = _shuffled(concept_set.table[concept_set.concepts], seed)
    probes = ConceptProbes(random_runs=6, random_state=seed).fit(concept_acts, labels)
    df = tcav(teacher, inputs, pre, probes, zoo.CLASSES, layer=LAYER, progress=False)
    _check_frame(df, len(zoo.CLASSES) * len(concept_set.concepts))
    assert not df["significant"].any(), df[df["significant"]]


def test_real_concepts_report_valid_p_values(teacher, probes, inputs, pre):
    df = tcav(teacher, inputs, pre, probes, zoo.CLASSES, layer=LAYER, class_indices=[0, 2], progress=False)
    _check_frame(df, 2 * len(probes.concepts_))
    assert set(df["class"]) == {zoo.CLASSES[0], zoo.CLASSES[2]}


def test_p_values_of_random_concepts_are_calibrated_without_the_auc_gate(teacher, concept_set, concept_acts,
                                                                       inputs, pre):
    p = []
    for seed in range(3):
        labels = _shuffled(concept_set.table[concept_set.concepts], 100 + seed)
        probes = ConceptProbes(random_runs=6, random_state=seed).fit(concept_acts, labels)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            df = tcav(teacher, inputs, pre, probes, zoo.CLASSES, layer=LAYER, min_auc=0.0, progress=False)
        p.extend(df["p_value"])
    # under the null a calibrated p-value is uniform: about 5% below 0.05 (54 tests here)
    assert np.mean(np.asarray(p) < 0.05) <= 0.15
