"""CAVs + TCAV scores with significance, end to end: ours against captum's ``TCAV``.

Same teacher, layers, concepts, random images and TCAV inputs on both sides, every class scored:

- ours: ``concepts.probes.fit_probes`` (one extraction pass over the concept folders, logistic probes
  with ``R`` subsample and ``R`` random-vs-random runs per concept and layer) then
  ``concepts.tcav.tcav`` for each layer (one forward and one backward per class per batch; all CAVs at
  once);
- captum: ``captum.concept.TCAV`` with its default classifier (SGD linear model on the layer's
  flattened activations) and default layer attribution (gradients), experimental sets
  ``[concept, random_i]`` for ``i < R`` plus ``R`` random-vs-random sets ``[random_R, random_i]``
  (Kim et al.'s significance design), ``interpret`` once per class; each ``random_i`` is a seeded
  subsample of ``random/`` as large as a concept folder. Then the same Welch t-test per (class, concept).

Run: ``.venv/bin/python benchmarks/bench_tcav.py``
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import _common
import numpy as np
import torch
from scipy import stats
from torch.utils.data import DataLoader, Dataset

from concepts.images import load_concept_source, load_images, open_image
from concepts.probes import fit_probes
from concepts.tcav import tcav
from concepts.teacher import load_teacher

LAYERS = ["layer3", "layer4"]
CONCEPTS = ["fur", "stripes", "horns"]


class _Files(Dataset):
    def __init__(self, paths, pre):
        self.paths, self.pre = list(paths), pre

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.pre(open_image(self.paths[i]))


def run_ours(teacher, concept_dir, inputs, pre, classes, runs):
    concept_set = load_concept_source(concept_dir)
    probes, _ = fit_probes(teacher, concept_set, LAYERS, pre, random_runs=runs, progress=False)
    return [tcav(teacher, inputs, pre, probes, classes, layer=layer, progress=False) for layer in LAYERS]


def run_captum(teacher, concept_dir, inputs, pre, n_classes, runs, n_per_concept, save_path):
    from captum.concept import TCAV, Concept

    rng = np.random.default_rng(0)
    random_files = sorted((concept_dir / "random").glob("*.png"))
    loader = lambda paths: DataLoader(_Files(paths, pre), batch_size=64)  # noqa: E731
    concepts = [Concept(i, c, loader(sorted((concept_dir / c).glob("*.png")))) for i, c in enumerate(CONCEPTS)]
    randoms = [Concept(len(CONCEPTS) + i, f"random_{i}",
                       loader(rng.choice(random_files, size=n_per_concept, replace=False)))
               for i in range(runs + 1)]
    sets = [[c, randoms[i]] for c in concepts for i in range(runs)] + [[randoms[runs], randoms[i]] for i in range(runs)]
    x = torch.cat([b for b in DataLoader(_Files(inputs.paths, pre), batch_size=64)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tc = TCAV(teacher.module, LAYERS, save_path=str(save_path))
        p_values = {}
        for k in range(n_classes):
            out = tc.interpret(x, sets, target=k)
            for layer in LAYERS:
                null = [float(out[f"{randoms[runs].id}-{randoms[i].id}"][layer]["sign_count"][0]) for i in range(runs)]
                for c in concepts:
                    real = [float(out[f"{c.id}-{randoms[i].id}"][layer]["sign_count"][0]) for i in range(runs)]
                    p_values[(k, c.name, layer)] = stats.ttest_ind(real, null, equal_var=False).pvalue
    return p_values


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10, help="R: CAV runs per concept (and random-vs-random runs)")
    p.add_argument("--n-per-concept", type=int, default=30)
    p.add_argument("--n-random", type=int, default=60)
    p.add_argument("--n-inputs", type=int, default=60, help="TCAV input images (all classes)")
    args = p.parse_args(argv)
    args.repeats = min(args.repeats, 1) if "--repeats" not in (argv or sys.argv) else args.repeats
    root = _common.setup(args)
    teacher = load_teacher(str(_common.teacher_file(root)))
    pre = teacher.preprocess
    concept_dir = _common.concept_folders(root, CONCEPTS, args.n_per_concept, args.n_random)
    inputs = load_images(_common.image_folder(root, args.n_inputs, seed=3))
    classes = teacher.classes or [f"class_{k}" for k in range(teacher.forward(torch.zeros(1, 3, _common.SIZE, _common.SIZE))[0].shape[1])]
    run_ours(teacher, concept_dir, inputs.subset([0, 1]), pre, classes, 2)  # warm-up (imports, first calls)
    t_ours, t_captum = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run_ours(teacher, concept_dir, inputs, pre, classes, args.runs)
        t_ours.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as cav_dir:  # fresh: captum would reuse saved CAVs and activations
            t0 = time.perf_counter()
            run_captum(teacher, concept_dir, inputs, pre, len(classes), args.runs, args.n_per_concept, Path(cav_dir))
            t_captum.append(time.perf_counter() - t0)
    a, b = float(np.median(t_ours)), float(np.median(t_captum))
    print(f"# bench_tcav: {len(CONCEPTS)} concepts x {args.n_per_concept} images, {args.n_random} random, "
          f"R={args.runs}, layers {','.join(LAYERS)}, {len(inputs)} inputs x {len(classes)} classes, "
          f"{_common.SIZE} px; teacher {Path(teacher.spec).name}; {_common.machine()}; median of {args.repeats}")
    print(f"{'ours s':>8} {'captum s':>9} {'speed-up':>9}  (target >= 5)")
    print(f"{a:>8.2f} {b:>9.2f} {b / a:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
