"""``ACT_DIR``: pooled activations streamed to one ``.npy`` per layer plus ``manifest.json`` (DESIGN.md)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .activations import pool
from .fileio import atomic_dir, to_json
from .images import ImageSet, Preprocess, default_workers, iter_batches
from .teacher import Teacher

MANIFEST_VERSION = 1


def cache_key(teacher: Teacher, layers: Sequence[str], preprocess: Preprocess, pooling: str, images: ImageSet) -> str:
    """SHA-256 over the weights hash, layers, preprocessing, pooling and the image list (sizes, mtimes)."""
    h = hashlib.sha256()
    h.update(json.dumps([teacher.weights_sha256, list(layers), preprocess.to_dict(), pooling], sort_keys=True).encode())
    h.update(images.fingerprint().encode())
    return h.hexdigest()


def extract_to_dir(teacher: Teacher, images: ImageSet, layers: Sequence[str], preprocess: Preprocess, out_dir, *,
                   batch_size: int = 64, pooling: str = "mean", progress: bool = True) -> Path:
    """Stream pooled activations of ``layers`` into ``out_dir/<layer>.npy`` (float32, one row per image in
    manifest order) without holding them in memory; the folder appears only when complete."""
    layers = teacher.resolve_layers(layers)
    n = len(images)
    workers = default_workers() if n >= 512 else 0
    with atomic_dir(out_dir) as tmp:
        arrays: dict[str, np.ndarray] = {}
        row = 0
        with torch.inference_mode(), tqdm(total=n, desc="extract", unit="img", disable=not progress, leave=False) as bar:
            for batch in iter_batches(images.paths, preprocess, batch_size=batch_size, num_workers=workers):
                _, acts = teacher.forward(batch, layers)
                b = batch.shape[0]
                for name in layers:
                    pooled = pool(acts[name], pooling).float().numpy()
                    if name not in arrays:
                        arrays[name] = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np.float32,
                                                                 shape=(n, pooled.shape[1]))
                    arrays[name][row:row + b] = pooled
                row += b
                bar.update(b)
        shapes = {}
        for name, arr in arrays.items():
            arr.flush()
            shapes[name] = list(arr.shape)
        del arrays
        manifest = {"version": MANIFEST_VERSION, "teacher": teacher.to_dict(), "layers": layers, "pooling": pooling,
                    "preprocess": preprocess.to_dict(), "root": str(images.root.resolve()),
                    "images": [str(p) for p in images.table["path"]], "shapes": shapes,
                    "hash": cache_key(teacher, layers, preprocess, pooling, images)}
        (tmp / "manifest.json").write_text(to_json(manifest) + "\n")
    return Path(out_dir)
