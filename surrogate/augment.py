"""Query augmentation: label extra inputs with the teacher to fit the surrogate on more data than the user has.

Each training image yields ``n_per_image`` new teacher queries, each one of: a horizontal flip, a random
crop (75–95% of the side, resized back), or a mixup ``lam * x + (1 - lam) * x'`` with another training
image (``lam ~ U(0.3, 0.7)``). The teacher's outputs on them are soft targets like any other; held-out
metrics never see them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from concepts.activations import Activations, pool
from concepts.images import ImageSet, Preprocess, iter_batches
from concepts.teacher import Teacher

KINDS = ("flip", "crop", "mixup")


def _augment(x: torch.Tensor, rng: np.random.Generator, pool_x: torch.Tensor) -> torch.Tensor:
    kind = KINDS[int(rng.integers(len(KINDS)))]
    if kind == "flip":
        return x.flip(-1)
    if kind == "crop":
        s = x.shape[-1]
        c = int(round(s * rng.uniform(0.75, 0.95)))
        i, j = int(rng.integers(0, s - c + 1)), int(rng.integers(0, s - c + 1))
        return F.interpolate(x[None, :, i:i + c, j:j + c], size=(s, s), mode="bilinear", align_corners=False)[0]
    lam = float(rng.uniform(0.3, 0.7))
    other = pool_x[int(rng.integers(len(pool_x)))]
    return lam * x + (1 - lam) * other


def augmented_queries(teacher: Teacher, images: ImageSet, preprocess: Preprocess, layer: str, *, n_per_image: int,
                      pooling: str = "mean", seed: int = 0, batch_size: int = 64,
                      progress: bool = True) -> tuple[Activations, np.ndarray]:
    """Teacher outputs and pooled ``layer`` activations on ``n_per_image`` augmented copies of each image.

    Mixup partners come from the same batch, so memory holds one batch at a time.

    Returns
    -------
    acts : Activations
        ``layers[layer]`` of shape (n_images * n_per_image, d) and ``logits``.
    source : ndarray of int, shape (n_images * n_per_image,)
        Index (into ``images``) of the image each query was made from.
    """
    rng = np.random.default_rng(seed)
    feats, logits, source = [], [], []
    start = 0
    with torch.inference_mode():
        for batch in tqdm(iter_batches(images.paths, preprocess, batch_size=batch_size), desc="augment",
                          disable=not progress, leave=False):
            queries = torch.stack([_augment(x, rng, batch) for x in batch for _ in range(n_per_image)])
            z, a = teacher.forward(queries, [layer])
            feats.append(pool(a[layer], pooling).float().numpy())
            logits.append(z.float().numpy())
            source.append(np.repeat(np.arange(start, start + len(batch)), n_per_image))
            start += len(batch)
    return Activations({layer: np.concatenate(feats)}, np.concatenate(logits)), np.concatenate(source)
