"""Extraction + scoring throughput against a bare ``teacher(x)`` loop.

Ours: ``concepts.activations.extract`` (forward hooks on two layers, mean pooling, copies into the
output arrays) followed by ``ConceptProbes.transform`` (concept scores). Baseline: ``teacher.module(x)``
on the same batches, nothing else. Both under ``torch.inference_mode``, same batch size, same threads.

Two variants, each measured side by side in this run:

- ``disk``: both sides read and decode the same PNG files (``concepts.images.iter_batches``, no worker
  processes), so the ratio includes the shared decoding cost;
- ``preloaded``: both sides get the same preprocessed batches from memory (``extract`` is fed them by
  substituting its batch iterator), so the ratio isolates the probing overhead.

Run: ``.venv/bin/python benchmarks/bench_extract.py``
"""

from __future__ import annotations

import sys
from pathlib import Path

import _common
import numpy as np
import pandas as pd
import torch

import concepts.activations as activations
from concepts import datasets as zoo
from concepts.images import iter_batches, load_images
from concepts.probes import ConceptProbes
from concepts.teacher import load_teacher

LAYERS = ["layer3", "layer4"]
CONCEPTS = ["fur", "stripes", "whiskers", "horns"]


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--n-images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    root = _common.setup(args)
    teacher = load_teacher(str(_common.teacher_file(root)))
    folder = _common.image_folder(root, args.n_images)
    images = load_images(folder)
    pre = teacher.preprocess
    # probes fitted on the same images' true concept labels (the scoring cost does not depend on their quality)
    truth = {f"{s.label}/{s.label}_{s.index:05d}.png": s.concepts for s in zoo.make_samples(args.n_images, seed=1)}
    labels = pd.DataFrame([{c: float(truth[p][c]) for c in CONCEPTS} for p in images.table["path"]])
    acts = activations.extract(teacher, images, LAYERS, pre, batch_size=args.batch_size, num_workers=0,
                               progress=False)
    probes = ConceptProbes(random_runs=0).fit(acts.layers, labels)

    def ours():
        a = activations.extract(teacher, images, LAYERS, pre, batch_size=args.batch_size, num_workers=0,
                                progress=False)
        for layer in LAYERS:
            probes.transform(a.layers[layer], layer)

    def bare_disk():
        with torch.inference_mode():
            for batch in iter_batches(images.paths, pre, batch_size=args.batch_size, num_workers=0):
                teacher.module(batch)

    batches = list(iter_batches(images.paths, pre, batch_size=args.batch_size, num_workers=0))
    real_iter = activations.iter_batches

    def ours_preloaded():
        activations.iter_batches = lambda *a, **k: iter(batches)
        try:
            ours()
        finally:
            activations.iter_batches = real_iter

    def bare_preloaded():
        with torch.inference_mode():
            for batch in batches:
                teacher.module(batch)

    # warm-up (first calls allocate and load code paths)
    ours_preloaded()
    bare_preloaded()
    n = len(images)
    rows = []
    for variant, a, b in (("disk", ours, bare_disk), ("preloaded", ours_preloaded, bare_preloaded)):
        ta, tb = [], []
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both sides alike
            ta.append(_common.median_time(a, 1))
            tb.append(_common.median_time(b, 1))
        ta, tb = float(np.median(ta)), float(np.median(tb))
        rows.append((variant, n / ta, n / tb, tb / ta))
    print(f"# bench_extract: {n} images at {pre.image_size} px, batch {args.batch_size}, layers "
          f"{','.join(LAYERS)} (mean pooling) + {len(CONCEPTS)} concept probes per layer; teacher "
          f"{Path(teacher.spec).name}; {_common.machine()}; median of {args.repeats}")
    print(f"{'variant':<10} {'ours img/s':>11} {'bare img/s':>11} {'ratio':>7}  (target >= 0.9)")
    for variant, a, b, r in rows:
        print(f"{variant:<10} {a:>11.1f} {b:>11.1f} {r:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
