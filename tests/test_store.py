"""The activation cache (ACT_DIR): manifest, cache hits and misses, resume, torchrun sharding, bad images."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from concepts import datasets as zoo
from concepts.activations import extract
from concepts.errors import InputError
from concepts.images import Preprocess, load_images
from concepts.models import ToyResNet
from concepts.store import cache_key, cached_extract, extract_to_dir, load_activations, partial_dir
from concepts.teacher import load_teacher
from surrogate.cli import main

SPEC = "concepts.models:ToyResNet"  # a factory teacher: ToyResNet(5 classes, width 16), weights from a file
LAYERS = ["layer3", "fc"]
PRE = Preprocess(32)
N_IMAGES = 40
BATCH = 8  # 5 batches


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared machine, OpenMP threads competing for cores make the tiny
    forward passes here many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_state(path, seed):
    torch.manual_seed(seed)
    torch.save(ToyResNet().state_dict(), path)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A pristine image folder and a weights file; tests copy them before changing anything."""
    root = tmp_path_factory.mktemp("store-src")
    zoo.write_image_folder(zoo.make_samples(N_IMAGES, seed=21), root / "images", image_size=32)
    _write_state(root / "toy.pth", seed=1)
    return root


@pytest.fixture
def work(source, tmp_path):
    """A private copy of the images and weights (mtimes preserved) in ``tmp_path``."""
    shutil.copytree(source / "images", tmp_path / "images")
    shutil.copy2(source / "toy.pth", tmp_path / "toy.pth")
    return tmp_path


@pytest.fixture(scope="module")
def reference(source):
    """In-memory activations of the pristine inputs, batch by batch as the cache computes them."""
    teacher = load_teacher(SPEC, str(source / "toy.pth"))
    return extract(teacher, load_images(source / "images"), LAYERS, PRE, batch_size=BATCH, progress=False)


class Counter:
    """Wraps ``teacher.forward`` to count calls and rows; raises KeyboardInterrupt on call ``fail_at``."""

    def __init__(self, teacher, fail_at=None):
        self.calls = self.rows = 0
        self.fail_at = fail_at
        self._forward = teacher.forward
        teacher.forward = self

    def __call__(self, x, layers=(), **kw):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt
        self.rows += x.shape[0]
        return self._forward(x, layers, **kw)


def _run(work, out="act", fail_at=None, **kw):
    teacher = load_teacher(SPEC, str(work / "toy.pth"))
    counter = Counter(teacher, fail_at)
    acts = cached_extract(teacher, load_images(work / "images"), LAYERS, PRE, work / out, batch_size=BATCH,
                          progress=False, **kw)
    return acts, counter


def _same(acts, ref):
    assert set(acts.layers) == set(ref.layers)
    for name in ref.layers:
        np.testing.assert_array_equal(np.asarray(acts.layers[name]), ref.layers[name])
    np.testing.assert_array_equal(np.asarray(acts.logits), ref.logits)


def test_manifest_shapes_and_readonly_memmaps(work, reference):
    acts, counter = _run(work)
    out = work / "act"
    assert counter.rows == N_IMAGES
    assert sorted(p.name for p in out.iterdir()) == ["fc.npy", "layer3.npy", "logits.npy", "manifest.json"]
    assert not partial_dir(out).exists()
    m = json.loads((out / "manifest.json").read_text())
    images = load_images(work / "images")
    teacher = load_teacher(SPEC, str(work / "toy.pth"))
    assert m["complete"] is True and m["rows_done"] == N_IMAGES and m["n_images"] == N_IMAGES
    assert m["layers"] == LAYERS and m["pooling"] == "mean"
    assert m["preprocess"] == PRE.to_dict()
    assert m["images"] == list(images.table["path"])
    assert m["teacher"]["spec"] == SPEC and m["teacher"]["weights_sha256"] == teacher.weights_sha256
    assert m["shapes"] == {"layer3": [N_IMAGES, 64], "fc": [N_IMAGES, 5]}
    assert m["logits_shape"] == [N_IMAGES, 5]
    assert m["hash"] == cache_key(teacher, LAYERS, PRE, "mean", images)
    for name in LAYERS:
        arr = np.load(out / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        assert arr.dtype == np.float32 and list(arr.shape) == m["shapes"][name]
    assert isinstance(acts.layers["layer3"], np.memmap) and not acts.layers["layer3"].flags.writeable
    assert isinstance(acts.logits, np.memmap) and not acts.logits.flags.writeable
    _same(acts, reference)
    _same(load_activations(out), reference)


def test_cache_hit_runs_no_forward(work, reference):
    _run(work)
    stamp = (work / "act" / "manifest.json").stat().st_mtime_ns
    acts, counter = _run(work)
    assert counter.calls == 0
    assert (work / "act" / "manifest.json").stat().st_mtime_ns == stamp
    _same(acts, reference)
    # extract(cache_dir=...) uses the same cache
    teacher = load_teacher(SPEC, str(work / "toy.pth"))
    counter = Counter(teacher)
    again = extract(teacher, load_images(work / "images"), LAYERS, PRE, batch_size=BATCH, progress=False,
                    cache_dir=work / "act")
    assert counter.calls == 0
    _same(again, reference)


def test_touched_image_is_a_cache_miss(work, reference):
    _run(work)
    old_hash = json.loads((work / "act" / "manifest.json").read_text())["hash"]
    img = sorted((work / "images").rglob("*.png"))[3]
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    acts, counter = _run(work)
    assert counter.rows == N_IMAGES
    assert json.loads((work / "act" / "manifest.json").read_text())["hash"] != old_hash
    _same(acts, reference)  # same content, recomputed


def test_replaced_image_is_a_cache_miss(work, reference):
    _run(work)
    paths = load_images(work / "images").paths
    i, j = 5, 30
    tmp = paths[i].with_suffix(".tmp")
    shutil.copyfile(paths[j], tmp)
    os.replace(tmp, paths[i])  # image i now shows image j
    acts, counter = _run(work)
    assert counter.rows == N_IMAGES
    np.testing.assert_allclose(acts.layers["layer3"][i], reference.layers["layer3"][j], atol=1e-5)
    assert not np.allclose(acts.layers["layer3"][i], reference.layers["layer3"][i])
    assert [p.name for p in work.iterdir() if p.name.startswith(".act")] == []  # old folder swapped out and removed


def test_changed_weights_file_is_a_cache_miss(work, reference):
    _run(work)
    _write_state(work / "toy.pth", seed=2)
    acts, counter = _run(work)
    assert counter.rows == N_IMAGES
    assert not np.allclose(acts.logits, reference.logits)


def test_interrupted_run_resumes_where_it_stopped(work, reference):
    with pytest.raises(KeyboardInterrupt):
        _run(work, fail_at=3)  # batches 1 and 2 are written, the third forward is interrupted
    out = work / "act"
    assert not out.exists()
    part = partial_dir(out)
    progress = json.loads((part / "progress-0.json").read_text())
    assert progress["rows_done"] == 2 * BATCH and progress["done"] == [[0, 2 * BATCH]]
    assert json.loads((part / "manifest.json").read_text())["complete"] is False

    acts, counter = _run(work)
    assert counter.calls == 3 and counter.rows == N_IMAGES - 2 * BATCH
    assert not part.exists()
    _same(acts, reference)  # identical to a one-shot run


def test_stale_work_folder_is_discarded(work, reference):
    with pytest.raises(KeyboardInterrupt):
        _run(work, fail_at=2)
    _write_state(work / "toy.pth", seed=2)  # a new key: the partial rows must not be reused
    acts, counter = _run(work)
    assert counter.rows == N_IMAGES
    fresh = extract(load_teacher(SPEC, str(work / "toy.pth")), load_images(work / "images"), LAYERS, PRE,
                    batch_size=BATCH, progress=False)
    _same(acts, fresh)


def test_missing_image_is_one_line_error_and_writes_nothing(work):
    images = load_images(work / "images")
    gone = images.paths[7]
    gone.unlink()
    teacher = load_teacher(SPEC, str(work / "toy.pth"))
    with pytest.raises(InputError, match=gone.name) as e:
        cached_extract(teacher, images, LAYERS, PRE, work / "act", batch_size=BATCH, progress=False)
    assert "\n" not in str(e.value)
    assert not (work / "act").exists() and not partial_dir(work / "act").exists()


def test_unreadable_image_leaves_old_cache_and_no_partial(work, capsys):
    _run(work)
    before = (work / "act" / "manifest.json").read_text()
    bad = load_images(work / "images").paths[25]  # in the fourth batch
    bad.write_bytes(b"not a png")
    code = main(["extract", "--teacher", SPEC, "--weights", str(work / "toy.pth"), "--image-size", "32",
                 "--layer", "layer3,fc", "--images", str(work / "images"), "--batch-size", str(BATCH),
                 "--out", str(work / "act"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and bad.name in err
    assert (work / "act" / "manifest.json").read_text() == before  # the previous complete cache is untouched
    assert not partial_dir(work / "act").exists()


def test_cli_refuses_to_replace_a_foreign_folder(work, capsys):
    (work / "notes").mkdir()
    (work / "notes" / "keep.txt").write_text("mine")
    code = main(["extract", "--teacher", SPEC, "--weights", str(work / "toy.pth"), "--image-size", "32",
                 "--layer", "fc", "--images", str(work / "images"), "--out", str(work / "notes"), "--quiet"])
    assert code == 2 and "manifest.json" in capsys.readouterr().err
    assert (work / "notes" / "keep.txt").read_text() == "mine"


def test_extract_to_dir_is_a_thin_wrapper(work, reference):
    teacher = load_teacher(SPEC, str(work / "toy.pth"))
    out = extract_to_dir(teacher, load_images(work / "images"), LAYERS, PRE, work / "act", batch_size=BATCH,
                         progress=False)
    _same(load_activations(out), reference)


def test_torchrun_shards_equal_one_process_run(work, capsys):
    args = ["--teacher", SPEC, "--weights", str(work / "toy.pth"), "--image-size", "32", "--layer", "layer3,fc",
            "--images", str(work / "images"), "--batch-size", str(BATCH)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "surrogate", "extract", *args, "--out", str(work / "act2")],
                          env=env, capture_output=True, text=True, timeout=180, cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == ""
    assert main(["extract", *args, "--out", str(work / "act1"), "--quiet"]) == 0
    one, two = load_activations(work / "act1"), load_activations(work / "act2")
    m1 = json.loads((work / "act1" / "manifest.json").read_text())
    m2 = json.loads((work / "act2" / "manifest.json").read_text())
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    assert {k: v for k, v in m1.items() if k != "world_size"} == {k: v for k, v in m2.items() if k != "world_size"}
    for name in LAYERS:
        np.testing.assert_allclose(two.layers[name], one.layers[name], rtol=0, atol=1e-6)
    np.testing.assert_allclose(two.logits, one.logits, rtol=0, atol=1e-6)
    assert not partial_dir(work / "act2").exists()
