"""The demo teacher: a small ResNet-style CNN for the toy zoo, its training and export.

Layer names (dotted, as in ``named_modules()``): ``stem``, ``layer1`` … ``layer4`` (each a Sequential of
residual blocks: ``layer3.0``, ``layer3.0.conv1`` …), ``pool``, ``flatten``, ``fc``. The forward pass is
exactly the named children in order, so the TorchScript chaining of :mod:`concepts.teacher` works too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .fileio import atomic_path
from .teacher import META_FILE


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a (projected) identity shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class ToyResNet(nn.Module):
    """A four-stage ResNet for small images.

    Parameters
    ----------
    n_classes : int, default=5
    width : int, default=16
        Channels of the first stage; each later stage doubles them.
    """

    def __init__(self, n_classes: int = 5, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(w, w, 1))
        self.layer2 = nn.Sequential(BasicBlock(w, 2 * w, 2))
        self.layer3 = nn.Sequential(BasicBlock(2 * w, 4 * w, 2))
        self.layer4 = nn.Sequential(BasicBlock(4 * w, 8 * w, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * w, n_classes)

    def forward(self, x):
        for child in self.children():
            x = child(x)
        return x


def toy_resnet() -> ToyResNet:
    """Factory for ``--teacher concepts.models:toy_resnet`` (untrained; pass ``--weights``)."""
    return ToyResNet()


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 8, batch_size: int = 64,
          lr: float = 3e-3, seed: int = 0, progress: bool = True) -> nn.Module:
    """Train ``model`` on in-memory images with horizontal-flip augmentation (AdamW, one-cycle LR).

    Parameters
    ----------
    x : Tensor of shape (n, 3, H, W), preprocessed images
    y : Tensor of shape (n,), class indices
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = len(x)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    bar = tqdm(total=steps, desc="train teacher", disable=not progress, leave=False)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
            opt.zero_grad()
            loss = loss_fn(model(xb), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return model


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on preprocessed images."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return correct / len(x)


def export_teacher(model: nn.Module, path, *, image_size: int, classes=None, preprocess: dict | None = None) -> Path:
    """Save ``model`` as a ``torch.export`` program (dynamic batch) with preprocessing and class names.

    The file is written to a temporary name and moved into place, so an interrupted export leaves no
    partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    example = torch.zeros(2, 3, image_size, image_size)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))
    meta = {"preprocess": preprocess or {"image_size": image_size, "mean": None, "std": None}}
    if classes is not None:
        meta["classes"] = list(classes)
    with atomic_path(path, suffix=".pt2") as tmp:
        torch.export.save(program, str(tmp), extra_files={META_FILE: json.dumps(meta)})
    return path
