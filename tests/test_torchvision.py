"""The torchvision:NAME teacher path. torchvision does not import beside the CPU torch wheel of the main
environment, so `make test-torchvision` runs this file in its own environment (torch 2.14.1 +
torchvision 0.29.1); elsewhere it is skipped."""

import json

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from concepts.errors import LayerNotFoundError, TeacherError  # noqa: E402
from concepts.teacher import load_teacher  # noqa: E402
from surrogate.cli import main  # noqa: E402

pytestmark = pytest.mark.torchvision


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=6).state_dict(), path)
    return path


def test_torchvision_spec_with_weights(weights):
    t = load_teacher("torchvision:resnet18", None)
    assert t.preprocess.image_size == 224 and t.preprocess.mean == (0.485, 0.456, 0.406)
    tuned = load_teacher("torchvision:resnet18", str(weights))  # a fine-tuned head: 6 classes, not 1000
    assert tuned.module.fc.out_features == 6
    bad = weights.parent / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(TeacherError, match="does not match"):
        load_teacher("torchvision:resnet18", str(bad))
    with pytest.raises(TeacherError, match="Did you mean 'resnet18'"):
        load_teacher("torchvision:resnet81")


def test_torchvision_hooks_and_layer_names(weights):
    t = load_teacher("torchvision:resnet18", str(weights))
    logits, acts = t.forward(torch.rand(2, 3, 64, 64), ["layer3.1", "layer4"])
    assert logits.shape == (2, 6) and acts["layer3.1"].shape[:2] == (2, 256)
    with pytest.raises(LayerNotFoundError, match="'layer3.1'"):
        t.resolve_layers("layer3.9")


def test_probe_and_distill_from_the_command_line(weights, zoo_dir, tmp_path):
    common = ["--teacher", "torchvision:resnet18", "--weights", str(weights), "--image-size", "64", "--quiet"]
    assert main(["probe", *common, "--layer", "layer3", "--concepts", str(zoo_dir / "concepts" / "images.csv"),
                 "--random-runs", "3", "--out", str(tmp_path / "p")]) == 0
    assert main(["distill", *common, "--probes", str(tmp_path / "p"), "--images", str(zoo_dir / "images"),
                 "--use-concepts", "all", "--out", str(tmp_path / "m")]) == 0
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["teacher"]["spec"] == "torchvision:resnet18" and meta["preprocess"]["image_size"] == 64
    assert meta["preprocess"]["mean"] == [0.485, 0.456, 0.406]  # the spec's ImageNet normalisation is kept
