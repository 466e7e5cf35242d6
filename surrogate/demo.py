"""``surrogate demo``: the whole pipeline on the built-in toy zoo, from a fresh machine to an audit page.

1. draws the toy zoo (concept table, "your images", audit images, TCAV concept folders);
2. trains the demo teacher (a small ResNet) once and saves it as a ``torch.export`` program; later demos
   reuse it while the data configuration is unchanged;
3. probes the teacher for concepts, distils a depth-4 tree and a sparse linear surrogate, renders the tree,
   explains example images and audits the teacher for the spurious watermark.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from concepts import datasets as zoo
from concepts.activations import extract
from concepts.fileio import atomic_dir, to_json, write_json
from concepts.images import Preprocess, load_images
from concepts.models import ToyResNet, accuracy, export_teacher, train
from concepts.probes import fit_probes, save_probes
from concepts.teacher import load_teacher, sha256_file

from .audit import audit, write_report
from .distill import distill
from .explain import explain_scores, plot_explanation
from .render import render_model

IMAGE_SIZE = 64
# Probe both late stages; the surrogate uses the one whose probes rank best. layer4 feeds global average pooling
# and a linear head, so a class logit is linear in it and TCAV there can only say 0 or 1: the audit then
# computes TCAV at layer3.
LAYERS = ["layer3", "layer4"]
WATERMARK_CLASS = "cow"
WATERMARK_CORR = 0.8
DATA_VERSION = 3


def demo_config(quick: bool, seed: int) -> dict:
    """Sizes and seeds of a demo run (a change retrains the teacher and redraws the data)."""
    n = (dict(train=1200, test=300, concepts=400, images=500, audit=200, tcav=30, epochs=5) if quick else
         dict(train=2400, test=500, concepts=800, images=1200, audit=400, tcav=60, epochs=6))
    return {"version": DATA_VERSION, "seed": seed, "image_size": IMAGE_SIZE, "width": 8,
            "watermark": [WATERMARK_CLASS, WATERMARK_CORR], **n}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _prepare_data(data: Path, cfg: dict) -> None:
    stamp = data / "dataset.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == cfg:
        _log(f"reusing toy-zoo images in {data}")
        return
    s = cfg["seed"] * 1000
    wm = dict(watermark_class=WATERMARK_CLASS, watermark_corr=WATERMARK_CORR)
    with atomic_dir(data) as tmp:
        zoo.write_table(zoo.make_samples(cfg["concepts"], seed=s + 1, **wm), tmp / "concepts", image_size=IMAGE_SIZE)
        zoo.write_image_folder(zoo.make_samples(cfg["images"], seed=s + 2, **wm), tmp / "images", image_size=IMAGE_SIZE)
        zoo.write_image_folder(zoo.make_samples(cfg["audit"], seed=s + 3, **wm), tmp / "audit", image_size=IMAGE_SIZE)
        zoo.write_concept_folders(tmp / "tcav", n_per_concept=cfg["tcav"], n_random=2 * cfg["tcav"], seed=s + 4,
                                  image_size=IMAGE_SIZE, concepts=zoo.CONCEPTS + zoo.SPURIOUS)
        (tmp / "dataset.json").write_text(to_json(cfg))


def _prepare_teacher(path: Path, cfg: dict, progress: bool) -> float:
    """Train (or reuse) the demo teacher; returns its held-out accuracy."""
    stamp = path.with_suffix(".json")
    if path.is_file() and stamp.is_file():
        info = json.loads(stamp.read_text())
        if info.get("config") == cfg and info.get("sha256") == sha256_file(path):
            _log(f"reusing trained teacher {path}")
            return info["accuracy"]
    s = cfg["seed"] * 1000
    pre = Preprocess(IMAGE_SIZE)
    wm = dict(watermark_class=WATERMARK_CLASS, watermark_corr=WATERMARK_CORR)

    def tensors(samples):
        x = torch.stack([pre(zoo.render(z, image_size=IMAGE_SIZE)) for z in samples])
        return x, torch.tensor([zoo.CLASSES.index(z.label) for z in samples])

    t0 = time.time()
    x, y = tensors(zoo.make_samples(cfg["train"], seed=s + 10, **wm))
    xt, yt = tensors(zoo.make_samples(cfg["test"], seed=s + 11, **wm))
    torch.manual_seed(cfg["seed"])
    model = train(ToyResNet(len(zoo.CLASSES), width=cfg["width"]), x, y, epochs=cfg["epochs"], seed=cfg["seed"],
                  progress=progress)
    acc = accuracy(model, xt, yt)
    export_teacher(model, path, image_size=IMAGE_SIZE, classes=zoo.CLASSES, preprocess=pre.to_dict())
    write_json(stamp, {"config": cfg, "sha256": sha256_file(path), "accuracy": acc})
    _log(f"trained the teacher in {time.time() - t0:.0f} s: held-out accuracy {acc:.1%}")
    return acc


def run_demo(out="demo-output", *, quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Run the whole pipeline on the toy zoo and write its outputs under ``out``.

    Returns
    -------
    dict
        The summary (also written to ``out/summary.json`` and printed).
    """
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(quick, seed)
    data = out / "data"
    _log("1/6 drawing the toy zoo")
    _prepare_data(data, cfg)
    _log("2/6 the teacher")
    teacher_acc = _prepare_teacher(out / "teacher.pt2", cfg, progress)
    teacher = load_teacher(out / "teacher.pt2")
    preprocess = teacher.preprocess
    classes = list(teacher.classes)

    _log("3/6 probing the teacher for concepts")
    concepts = load_images(data / "concepts" / "images.csv")
    probes, _ = fit_probes(teacher, concepts, LAYERS, preprocess, seed=seed, progress=progress)
    save_probes(out / "probes", probes, teacher=teacher.to_dict(), preprocess=preprocess.to_dict(), pooling="mean")

    _log("4/6 distilling surrogates")
    images = load_images(data / "images")
    acts = extract(teacher, images, [probes.layer_], preprocess, progress=progress, desc="distill")
    common = dict(classes=classes, seed=seed, progress=progress, activations=acts)
    tree = distill(teacher, probes, images, preprocess, kind="tree", max_depth=4, **common)
    linear = distill(teacher, probes, images, preprocess, kind="linear", **common)
    tree.save(out / "model")
    linear.save(out / "model-linear")

    _log("5/6 rendering and explaining")
    render_model(tree, out / "tree.svg", thumbnails=True)
    render_model(tree, out / "tree.png", thumbnails=True)
    explained = _explain_examples(tree, teacher, data / "audit", out / "explanations")

    _log("6/6 auditing")
    audit_images = load_images(data / "audit")
    report = audit(tree, audit_images, spurious=["watermark"], teacher=teacher, seed=seed, progress=progress)
    write_report(report, out / "audit", model=tree)

    q = probes.quality_[probes.quality_["layer"] == probes.layer_]
    summary = {
        "teacher_accuracy": teacher_acc, "layer": probes.layer_,
        "probe_auc": dict(zip(q["concept"], q["auc"].round(4))),
        "tree": {k: tree.metrics[k] for k in ("fidelity", "fidelity_ci", "hard_label_fidelity", "ceiling_fidelity",
                                              "depth", "n_leaves", "kl")},
        "linear": {k: linear.metrics[k] for k in ("fidelity", "fidelity_ci", "hard_label_fidelity", "ceiling_fidelity",
                                                  "n_nonzero", "kl")},
        "audit": {"fidelity": report["fidelity"], "ceiling_fidelity": report["ceiling_fidelity"],
                  "flagged": report["flagged"]},
        "explained": explained, "seconds": round(time.time() - t0, 1),
    }
    write_json(out / "summary.json", summary)
    text = format_summary(summary, out)
    (out / "summary.txt").write_text(text + "\n")
    print(text, flush=True)
    return summary


def _explain_examples(model, teacher, folder: Path, dest: Path) -> list[str]:
    """Explain one audit image per class (and the first disagreement) into ``dest``."""
    from .explain import model_inputs
    images = load_images(folder)
    scores, logits = model_inputs(model, teacher, images, progress=False)
    labels = images.labels
    picks = {}
    for i, lbl in enumerate(labels):
        picks.setdefault(lbl, i)
    q = model.estimator.predict(scores)
    t = np.array(model.classes, dtype=object)[logits.argmax(1)]
    wrong = np.nonzero(q != t)[0]
    if len(wrong):
        picks["disagreement"] = int(wrong[0])
    written = []
    with atomic_dir(dest) as tmp:
        for name, i in picks.items():
            e = explain_scores(model, scores.iloc[i].to_numpy(), logits[i])
            e["image"] = str(images.paths[i])
            stem = f"{name}_{Path(images.paths[i]).stem}" if name == "disagreement" else Path(images.paths[i]).stem
            (tmp / f"{stem}.json").write_text(to_json(e) + "\n")
            plot_explanation(e, images.paths[i], tmp / f"{stem}.png")
            written.append(stem)
    return written


def format_summary(s: dict, out: Path) -> str:
    """The terminal summary of a demo run."""
    lines = ["", "concept-surrogate demo — explaining a CNN in concepts", "=" * 54,
             f"teacher (ToyResNet, torch.export) held-out accuracy: {s['teacher_accuracy']:.1%}",
             f"probe layer: {s['layer']}", "", "concept probes (held-out AUC):"]
    for c, auc in s["probe_auc"].items():
        lines.append(f"  {c:<14} {auc:.3f}")
    t, lin = s["tree"], s["linear"]
    lines += ["", "surrogate fidelity on held-out images (agreement with the teacher):",
              f"  {'':<24}{'fidelity':>9}  {'95% CI':>13}  {'hard-label':>10}  {'ceiling':>8}",
              f"  {'tree (depth ' + str(t['depth']) + ', ' + str(t['n_leaves']) + ' leaves)':<24}{t['fidelity']:>9.3f}  "
              f"{t['fidelity_ci'][0]:.3f}–{t['fidelity_ci'][1]:.3f}  {t['hard_label_fidelity']:>10.3f}  {t['ceiling_fidelity']:>8.3f}",
              f"  {'linear (' + str(lin['n_nonzero']) + ' concepts)':<24}{lin['fidelity']:>9.3f}  "
              f"{lin['fidelity_ci'][0]:.3f}–{lin['fidelity_ci'][1]:.3f}  {lin['hard_label_fidelity']:>10.3f}  {lin['ceiling_fidelity']:>8.3f}",
              "", f"audit: fidelity {s['audit']['fidelity']:.3f}, ceiling {s['audit']['ceiling_fidelity']:.3f}, "
              f"spurious concepts flagged: {', '.join(s['audit']['flagged']) or 'none'}",
              "", f"outputs in {out}/:", "  tree.png, tree.svg      the surrogate tree",
              "  model/, model-linear/   saved surrogates (surrogate explain/render/audit MODEL_DIR ...)",
              "  explanations/           explained example images (.png, .json)",
              "  audit/report.html       the audit page", f"done in {s['seconds']:.0f} s"]
    return "\n".join(lines)
