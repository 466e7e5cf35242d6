"""Layer activations: forward hooks, spatial pooling and batched, streamed extraction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import InputError
from .images import ImageSet, Preprocess, default_workers, iter_batches
from .teacher import Teacher, record  # noqa: F401  (record is part of this module's API)

POOLINGS = ("mean", "max", "flatten")


def pool(t: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """Pool a layer output to one vector per image.

    Parameters
    ----------
    t : Tensor of shape (n, c, h, w), (n, c, l) or (n, d)
    how : {"mean", "max", "flatten"}
        ``mean``/``max`` pool over the spatial positions; ``flatten`` keeps every value (small maps).

    Returns
    -------
    Tensor of shape (n, d)
    """
    if how not in POOLINGS:
        raise InputError(f"--pooling {how!r}: expected one of {', '.join(POOLINGS)}")
    if t.dim() <= 2 or how == "flatten":
        return t.reshape(t.shape[0], -1)
    flat = t.reshape(t.shape[0], t.shape[1], -1)
    return flat.mean(-1) if how == "mean" else flat.amax(-1)


@dataclass
class Activations:
    """Pooled activations per layer plus the teacher's logits, rows in image order.

    Attributes
    ----------
    layers : dict of str to ndarray of shape (n_images, d_layer), float32
    logits : ndarray of shape (n_images, n_classes), float32
    """

    layers: dict[str, np.ndarray]
    logits: np.ndarray


def resolve_preprocess(teacher: Teacher, image_size=None, mean=None, std=None) -> Preprocess:
    """Combine explicit options with the preprocessing the teacher implies.

    Explicit values win. Without ``image_size`` the teacher must imply one.
    """
    implied = teacher.preprocess
    if image_size is None:
        if implied is None:
            raise InputError(f"--image-size: required for teacher {teacher.spec} (it does not imply an input size)")
        image_size = implied.image_size
    if mean is None and std is None and implied is not None:
        mean, std = implied.mean, implied.std
    return Preprocess(int(image_size), mean, std)


def extract(teacher: Teacher, images: ImageSet, layers: Sequence[str], preprocess: Preprocess, *,
            batch_size: int = 64, pooling: str = "mean", num_workers: int | None = None,
            progress: bool = True, desc: str = "extract", cache_dir=None) -> Activations:
    """Run the teacher over ``images`` once, returning pooled activations of ``layers`` and logits.

    Memory holds one batch of raw activations at a time; pooled rows go into preallocated arrays.

    Parameters
    ----------
    teacher : Teacher
    images : ImageSet
    layers : sequence of str
        Dotted layer names (resolved against the teacher; an unknown name raises with suggestions).
    preprocess : Preprocess
    batch_size : int, default=64
    pooling : {"mean", "max", "flatten"}, default="mean"
    num_workers : int, optional
        Image-loading worker processes. Default: :func:`concepts.images.default_workers` for large
        sets, 0 for fewer than 512 images.
    progress : bool, default=True
        Show a progress bar on stderr.
    cache_dir : str or Path, optional
        An ``ACT_DIR`` to reuse or fill (:func:`concepts.store.cached_extract`): the arrays are then
        read-only memory maps, reused while the teacher, layers, preprocessing, pooling and images are
        unchanged, and an interrupted run resumes.

    Returns
    -------
    Activations
    """
    if cache_dir is not None:
        from .store import cached_extract
        return cached_extract(teacher, images, layers, preprocess, cache_dir, batch_size=batch_size,
                              pooling=pooling, progress=progress, num_workers=num_workers, desc=desc)
    layers = teacher.resolve_layers(layers)
    if pooling not in POOLINGS:
        raise InputError(f"--pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
    n = len(images)
    if num_workers is None:
        num_workers = default_workers() if n >= 512 else 0
    out: dict[str, np.ndarray] = {}
    logits = None
    row = 0
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            for batch in iter_batches(images.paths, preprocess, batch_size=batch_size, num_workers=num_workers):
                z, acts = teacher.forward(batch, layers)
                b = batch.shape[0]
                if logits is None:
                    logits = np.empty((n, z.shape[1]), dtype=np.float32)
                logits[row:row + b] = z.float().numpy()
                for name in layers:
                    pooled = pool(acts[name], pooling).float().numpy()
                    if name not in out:
                        out[name] = np.empty((n, pooled.shape[1]), dtype=np.float32)
                    out[name][row:row + b] = pooled
                row += b
                bar.update(b)
    finally:
        bar.close()
    return Activations(out, logits)
