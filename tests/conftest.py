"""Shared fixtures: a small toy zoo on disk and a small trained teacher in every supported file format."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from concepts import datasets as zoo
from concepts.images import Preprocess
from concepts.models import ToyResNet, export_teacher, train

# CI replays the same examples every run (a property test must not pass or fail by the draw)
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

SIZE = 32


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    """Concept table (160 images), an image folder with class sub-folders (200), TCAV folders."""
    root = tmp_path_factory.mktemp("zoo")
    zoo.write_table(zoo.make_samples(160, seed=11), root / "concepts", image_size=SIZE)
    zoo.write_image_folder(zoo.make_samples(200, seed=12), root / "images", image_size=SIZE)
    zoo.write_concept_folders(root / "tcav", n_per_concept=12, n_random=24, seed=13, image_size=SIZE,
                              concepts=("fur", "stripes", "horns"))
    return root


@pytest.fixture(scope="session")
def toy_model():
    """A ToyResNet (width 4) trained briefly on 32-pixel zoo images: mechanics, not accuracy."""
    torch.manual_seed(0)
    pre = Preprocess(SIZE)
    samples = zoo.make_samples(300, seed=10)
    x = torch.stack([pre(zoo.render(s, image_size=SIZE)) for s in samples])
    y = torch.tensor([zoo.CLASSES.index(s.label) for s in samples])
    return train(ToyResNet(len(zoo.CLASSES), width=4), x, y, epochs=2, seed=0, progress=False).eval()


@pytest.fixture(scope="session")
def teacher_files(toy_model, tmp_path_factory):
    """The same teacher as .pt2 (with metadata), TorchScript .pt, and a state_dict .pth."""
    root = tmp_path_factory.mktemp("teacher")
    pt2 = export_teacher(toy_model, root / "toy.pt2", image_size=SIZE, classes=zoo.CLASSES)
    script = root / "toy.pt"
    torch.jit.script(toy_model).save(str(script))
    state = root / "toy_state.pth"
    torch.save(toy_model.state_dict(), state)
    return {"pt2": pt2, "script": script, "state": state}
