
import pytest
import torch
from torch import nn

from concepts.activations import extract, pool, record, resolve_preprocess
from concepts.datasets import CLASSES
from concepts.errors import InputError, LayerNotFoundError, TeacherError
from concepts.images import load_images
from concepts.teacher import Teacher, load_teacher, sha256_file, sha256_state


def test_pt2_loads_with_dotted_names_and_implied_preprocessing(teacher_files, toy_model):
    t = load_teacher(teacher_files["pt2"])
    assert {"layer3", "layer3.0", "layer3.0.conv1", "fc"} <= set(t.layer_names())
    assert t.preprocess.image_size == 32
    assert t.classes == list(CLASSES)
    assert t.weights_sha256 == sha256_file(teacher_files["pt2"])
    x = torch.rand(3, 3, 32, 32)
    logits, acts = t.forward(x, ["layer3", "layer4.0"])
    with torch.no_grad():
        assert torch.allclose(logits, toy_model(x), atol=1e-5)
    assert acts["layer3"].shape == (3, 16, 8, 8)


def test_torchscript_is_probed_by_chaining_children(teacher_files, teacher_files_pt2_acts=None):
    t = load_teacher(teacher_files["script"])
    assert t.scripted
    ref = load_teacher(teacher_files["pt2"])
    x = torch.rand(4, 3, 32, 32)
    la, aa = t.forward(x, ["layer3", "layer2.0"])
    lb, ab = ref.forward(x, ["layer3", "layer2.0"])
    assert torch.allclose(la, lb, atol=1e-5)
    assert torch.allclose(aa["layer3"], ab["layer3"], atol=1e-5)
    assert torch.allclose(aa["layer2.0"], ab["layer2.0"], atol=1e-5)


class _NotAChain(nn.Module):
    """forward() is not its children in order: chaining must be refused."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) + x)


def test_torchscript_whose_children_do_not_chain_is_refused(tmp_path):
    path = tmp_path / "bad.pt"
    torch.jit.script(_NotAChain()).save(str(path))
    t = load_teacher(path)
    with pytest.raises(TeacherError, match="torch.export"):
        t.forward(torch.rand(2, 4), ["a"])


def test_factory_and_weights(teacher_files, toy_model):
    t = load_teacher("concepts.models:toy_resnet")
    assert isinstance(t.module, nn.Module) and t.preprocess is None
    with pytest.raises(TeacherError, match="does not match"):
        load_teacher("concepts.models:toy_resnet", str(teacher_files["state"]))  # width 16 vs trained width 4
    with pytest.raises(TeacherError, match="no callable 'toy_resnett'.*toy_resnet"):
        load_teacher("concepts.models:toy_resnett")
    with pytest.raises(TeacherError, match="cannot import"):
        load_teacher("no_such_pkg.mod:f")


def test_weights_are_never_unpickled(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"obj": _NotAChain()}, evil)  # a pickled module, not a state_dict
    with pytest.raises(TeacherError, match="weights_only"):
        load_teacher("concepts.models:toy_resnet", str(evil))


def test_unknown_layer_lists_closest_names(teacher_files):
    t = load_teacher(teacher_files["pt2"])
    with pytest.raises(LayerNotFoundError) as e:
        t.resolve_layers("layer3.9")
    msg = str(e.value)
    assert "Layer 'layer3.9' not found" in msg and "Did you mean" in msg and "'layer3.0'" in msg
    assert "\n" not in msg


def test_bad_specs(tmp_path):
    with pytest.raises(TeacherError, match="no such file"):
        load_teacher(tmp_path / "missing.pt2")
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    with pytest.raises(TeacherError, match="torch.export"):
        load_teacher(junk)
    with pytest.raises(TeacherError, match="expected"):
        load_teacher("model.onnx")


class _Chatty(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        print("debug line from forward")
        return self.head(self.body(x))


def test_teacher_is_not_mutated_prints_go_to_stderr_hooks_removed(capsys):
    m = _Chatty().train()
    t = Teacher(m, "chatty", weights_sha256=sha256_state(m))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    logits, acts = t.forward(torch.rand(2, 3, 8, 8), ["body.1"])
    out = capsys.readouterr()
    assert "debug line" not in out.out and "debug line" in out.err
    assert m.training and all(sub.training for sub in m.modules())  # training mode restored
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # BN stats untouched
    assert not m.body[1]._forward_hooks  # hooks removed
    with pytest.raises(TeacherError):
        with record(m, ["body.1"]):
            pass  # never ran
    assert not m.body[1]._forward_hooks


def test_pool_modes():
    t = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert torch.equal(pool(t, "mean"), t.mean((2, 3)))
    assert torch.equal(pool(t, "max"), t.amax((2, 3)))
    assert pool(t, "flatten").shape == (2, 12)
    with pytest.raises(InputError):
        pool(t, "median")


def test_extract_matches_forward(teacher_files, zoo_dir):
    t = load_teacher(teacher_files["pt2"])
    images = load_images(zoo_dir / "images")
    pre = resolve_preprocess(t)
    a = extract(t, images, ["layer3", "layer4"], pre, batch_size=37, progress=False)
    b = extract(t, images, ["layer3", "layer4"], pre, batch_size=200, progress=False)
    assert a.layers["layer3"].shape == (200, 16) and a.logits.shape == (200, len(CLASSES))
    assert abs(a.layers["layer4"] - b.layers["layer4"]).max() < 1e-4  # batching does not change results
    with pytest.raises(InputError, match="--image-size"):
        resolve_preprocess(load_teacher("concepts.models:toy_resnet"))
