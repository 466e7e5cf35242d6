"""Shared set-up for the benchmarks: a toy-zoo teacher exported to .pt2 and images rendered at 64 px.

Everything is deterministic (fixed seeds) and written under a fresh temporary folder unless
``--workdir`` is given (then reused between runs).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

SIZE = 64


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workdir", help="folder for the teacher and images (default: a fresh temporary folder)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for both sides (default 1: stable on a shared 2-core machine)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per side (the median is reported)")
    return p


def setup(args) -> Path:
    """Fix the thread counts (torch and BLAS/OpenMP pools, for both sides alike) and make the work folder."""
    from threadpoolctl import threadpool_limits
    torch.set_num_threads(args.threads)
    # kept for the life of the process: an oversubscribed BLAS pool (e.g. scipy's L-BFGS inside
    # scikit-learn) is tens of times slower on a busy machine
    args._pools = threadpool_limits(args.threads)
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cs-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def teacher_file(root: Path) -> Path:
    """The demo's trained teacher if present, else an untrained ToyResNet (seed 0) exported to .pt2."""
    demo = Path(__file__).resolve().parent.parent / "demo-output" / "teacher.pt2"
    if demo.is_file():
        return demo
    path = root / "toy64.pt2"
    if not path.is_file():
        from concepts import datasets as zoo
        from concepts.models import ToyResNet, export_teacher
        torch.manual_seed(0)
        export_teacher(ToyResNet(len(zoo.CLASSES)).eval(), path, image_size=SIZE, classes=zoo.CLASSES)
    return path


def image_folder(root: Path, n: int, seed: int = 1) -> Path:
    """``n`` zoo images (class sub-folders) at 64 px."""
    from concepts import datasets as zoo
    path = root / f"images-{n}-{seed}"
    if not path.is_dir():
        zoo.write_image_folder(zoo.make_samples(n, seed=seed), path, image_size=SIZE)
    return path


def concept_folders(root: Path, concepts, n_per_concept: int, n_random: int, seed: int = 2) -> Path:
    from concepts import datasets as zoo
    path = root / f"tcav-{'-'.join(concepts)}-{n_per_concept}-{n_random}-{seed}"
    if not path.is_dir():
        zoo.write_concept_folders(path, n_per_concept=n_per_concept, n_random=n_random, seed=seed,
                                  image_size=SIZE, concepts=tuple(concepts))
    return path


def machine() -> str:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch/BLAS thread(s), load average {load}")


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
