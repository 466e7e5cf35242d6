"""Peak memory of extraction over N and 10N images.

Each size runs in a fresh Python process (``--child``) that loads the teacher, records its resident set
size (RSS) before extracting, runs ``concepts.activations.extract`` (two layers, mean pooling, no
worker processes) and reports its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). The 10N
list is the N rendered images listed ten times (a table of paths), so both runs decode identical
files; extraction holds one batch at a time, so the peak should barely grow with the image count.

Run: ``.venv/bin/python benchmarks/bench_memory.py``
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import _common
import pandas as pd

LAYERS = ["layer3", "layer4"]


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> int:
    _common.setup(args)
    from concepts.activations import extract
    from concepts.images import load_images
    from concepts.teacher import load_teacher
    teacher = load_teacher(args.teacher)
    images = load_images(args.child)
    before = _rss_mib()
    acts = extract(teacher, images, LAYERS, teacher.preprocess, batch_size=args.batch_size, num_workers=0,
                   progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out_mib = sum(a.nbytes for a in acts.layers.values()) / 2**20 + acts.logits.nbytes / 2**20
    print(json.dumps({"n": len(images), "before_mib": before, "peak_mib": peak, "output_mib": out_mib}))
    return 0


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--n-images", type=int, default=200, help="N (the second run uses 10N)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--child", help=argparse_hidden())
    p.add_argument("--teacher", help=argparse_hidden())
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    root = _common.setup(args)
    teacher = _common.teacher_file(root)
    folder = _common.image_folder(root, args.n_images)
    files = sorted(str(f) for f in folder.rglob("*.png"))
    results = []
    for times in (1, 10):
        table = root / f"memory-{times}x{len(files)}.csv"
        pd.DataFrame({"path": files * times}).to_csv(table, index=False)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(table), "--teacher", str(teacher),
               "--threads", str(args.threads), "--batch-size", str(args.batch_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    a, b = results
    print(f"# bench_memory: extract {','.join(LAYERS)} (mean pooling), batch {args.batch_size}, 64 px, "
          f"fresh process per size; teacher {teacher.name}; {_common.machine()}")
    print(f"{'images':>7} {'RSS before MiB':>15} {'peak RSS MiB':>13} {'output MiB':>11}")
    for r in results:
        print(f"{r['n']:>7} {r['before_mib']:>15.1f} {r['peak_mib']:>13.1f} {r['output_mib']:>11.2f}")
    print(f"peak ratio {b['n']}/{a['n']} images: {b['peak_mib'] / a['peak_mib']:.3f}  (target <= 1.25); "
          f"growth during extraction: {a['peak_mib'] - a['before_mib']:.1f} -> {b['peak_mib'] - b['before_mib']:.1f} MiB")
    return 0


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
