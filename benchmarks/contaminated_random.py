"""Probes learned from TCAV folders whose random/ holds the concepts by chance, measured against truth.

Writes a toy-zoo TCAV layout whose random/ images are plain population draws (so 10-80% of them show each
concept), plus a concept the teacher cannot see (its folder holds ordinary random images). For every
concept it prints the contamination of random/ (true and estimated), the held-out AUC against random/
(raw) and corrected, and the AUC of the probe's scores against the true labels of separate images;
then the fidelity of surrogates built on these folder-trained probes next to the ceiling, and the same
with probes learned from per-image labels.

    .venv/bin/python benchmarks/contaminated_random.py [--demo demo-output] [--n-per-concept 100]

Needs the demo's teacher and images (run `make demo` first).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from concepts import datasets as zoo
from concepts.activations import extract
from concepts.images import load_concept_source, load_images
from concepts.probes import fit_probes
from concepts.teacher import load_teacher
from surrogate.distill import distill


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", default="demo-output")
    ap.add_argument("--n-per-concept", type=int, default=100)
    ap.add_argument("--n-random", type=int, default=200)
    ap.add_argument("--layer", default="layer3")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    demo = Path(args.demo)
    teacher = load_teacher(demo / "teacher.pt2")
    pre = teacher.preprocess
    work = Path(tempfile.mkdtemp())
    try:
        tcav_dir = zoo.write_concept_folders(work / "tcav", n_per_concept=args.n_per_concept, n_random=args.n_random,
                                             seed=args.seed + 7, image_size=pre.image_size,
                                             concepts=zoo.CONCEPTS + zoo.SPURIOUS, random_from="all")
        # a concept the teacher cannot see: its "examples" are ordinary random zoo images
        invisible = tcav_dir / "invisible"
        invisible.mkdir()
        zoo.write_image_folder(zoo.make_samples(args.n_per_concept, seed=args.seed + 99), work / "inv",
                               image_size=pre.image_size)
        for i, f in enumerate(sorted((work / "inv").rglob("*.png"))):
            shutil.move(str(f), invisible / f"invisible_{i:05d}.png")
        truth = pd.read_csv(tcav_dir / "truth.csv")
        rand = truth[truth["path"].str.startswith("random/")]

        folders = load_concept_source(tcav_dir)
        table = load_images(demo / "data" / "concepts" / "images.csv")
        p_fold, _ = fit_probes(teacher, folders, [args.layer], pre, seed=args.seed, progress=False)
        p_tab, _ = fit_probes(teacher, table, [args.layer], pre, seed=args.seed, progress=False)

        # true AUC of each probe's scores on separate labelled images (the demo's audit images + truth)
        audit = load_images(demo / "data" / "concepts" / "images.csv")
        acts = extract(teacher, audit, [args.layer], pre, progress=False).layers[args.layer]
        q = p_fold.quality_.set_index("concept")
        rows = []
        for c in p_fold.concepts_:
            true_auc = (roc_auc_score(audit.table[c], p_fold.transform(acts)[c]) if c in audit.table else float("nan"))
            table_auc = (roc_auc_score(audit.table[c], p_tab.transform(acts)[c]) if c in p_tab.concepts_ else float("nan"))
            rows.append({"concept": c, "contamination_true": rand[c].mean() if c in rand else float("nan"),
                         "contamination_est": q.loc[c, "contamination"], "auc_raw": q.loc[c, "auc_raw"],
                         "auc_corrected": q.loc[c, "auc"], "significant": bool(q.loc[c, "probe_significant"]),
                         "true_auc_folder_probe": true_auc, "true_auc_table_probe": table_auc})
        print(pd.DataFrame(rows).round(3).to_string(index=False))
        print("(true AUCs are computed on the demo's concept table, which the table probe was fitted on: "
              "its column is optimistic; the folder probe never saw those images)")

        images = load_images(demo / "data" / "images")
        print(f"\nsurrogates on {len(images)} images (held-out 30%), layer {args.layer}:")
        print(f"{'probes':<28}{'kind':<8}{'concepts':<10}{'fidelity':>9}{'ceiling':>9}{'gap':>7}  left out")
        for name, probes, use in (("folders, gated", p_fold, "significant"), ("folders, all concepts", p_fold, "all"),
                                  ("per-image labels", p_tab, "significant")):
            for kind in ("linear", "tree"):
                m = distill(teacher, probes, images, pre, kind=kind, classes=teacher.classes, seed=args.seed,
                            concepts=use, progress=False).metrics
                print(f"{name:<28}{kind:<8}{len(m['concepts']):<10}{m['fidelity']:>9.3f}{m['ceiling_fidelity']:>9.3f}"
                      f"{m['ceiling_fidelity'] - m['fidelity']:>7.3f}  {', '.join(m['excluded_concepts']) or '-'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
