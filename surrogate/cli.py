"""Command line: parses arguments and calls library functions (no pipeline logic lives here)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from concepts.errors import ConceptSurrogateError, InputError

PROG = "surrogate"


def _positive_int(name):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
        return v
    parse.__name__ = name
    return parse


def _fraction(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return v


def _temperature(text):
    if text == "auto":
        return text
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', got {text!r}")
    return v


def _names(text):
    return [s.strip() for s in text.split(",") if s.strip()]


def _add_teacher(p, required=True):
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", required=required, metavar="SPEC",
                   help="model.pt2 (torch.export), model.pt (TorchScript), torchvision:NAME or package.module:factory")
    g.add_argument("--weights", metavar="FILE", help="state_dict for torchvision:/factory teachers (weights_only)")
    g.add_argument("--image-size", type=_positive_int("image_size"), metavar="N", help="square resize (default: implied by the teacher)")
    g.add_argument("--mean", metavar="a,b,c", help="per-channel mean for normalisation")
    g.add_argument("--std", metavar="a,b,c", help="per-channel std for normalisation")


def _add_common(p):
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same result")
    p.add_argument("--batch-size", type=_positive_int("batch_size"), default=64, metavar="N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out unreadable or truncated images (counted in a warning) instead of stopping")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Explain an image classifier in human concepts: probe, "
                                     "distil a surrogate tree or sparse linear model, explain, render, audit.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="the whole pipeline on the built-in toy zoo")
    p.add_argument("--out", default="demo-output", metavar="DIR", help="output folder (default demo-output)")
    p.add_argument("--quick", action="store_true", help="fewer images and epochs (for tests)")
    _add_common(p)

    p = sub.add_parser("extract", help="pooled layer activations of images to ACT_DIR (cached, resumable)",
                       description="Stream pooled layer activations and logits of images into ACT_DIR "
                       "(one memory-mapped .npy per layer, logits.npy, manifest.json). An ACT_DIR made from the "
                       "same teacher weights, layers, preprocessing, pooling and image files is reused; an "
                       "interrupted run resumes from ACT_DIR.partial. Runs sharded under torchrun "
                       "--nproc_per_node N (gloo); the result equals a one-process run.")
    _add_teacher(p)
    p.add_argument("--layer", required=True, metavar="L", help="dotted layer name(s), comma-separated")
    p.add_argument("--images", required=True, metavar="SRC", help="folder of images or .csv/.parquet table")
    p.add_argument("--pooling", default="mean", choices=("mean", "max", "flatten"))
    p.add_argument("--workers", type=int, metavar="N",
                   help="image-loading worker processes (default: several for 512+ images, else 0)")
    p.add_argument("--out", required=True, metavar="ACT_DIR")
    _add_common(p)

    p = sub.add_parser("probe", help="fit linear concept probes (CAVs) with held-out quality")
    _add_teacher(p)
    p.add_argument("--layer", required=True, metavar="L", help="dotted layer name(s), comma-separated")
    p.add_argument("--concepts", required=True, metavar="SRC", help="TCAV folder (one sub-folder per concept + random/) or table")
    p.add_argument("--concept-columns", type=_names, metavar="a,b,c", help="concepts to use (default: all)")
    p.add_argument("--random-runs", type=_positive_int("random_runs"), default=10, metavar="K",
                   help="random-vs-random runs for significance (default 10)")
    p.add_argument("--target", metavar="CLASS", help="class (name or index) for TCAV scores; needs --images")
    p.add_argument("--classes", metavar="NAMES|FILE", help="teacher output names, to resolve --target by name")
    p.add_argument("--images", metavar="SRC", help="images of the target class for TCAV")
    p.add_argument("--pooling", default="mean", choices=("mean", "max", "flatten"))
    p.add_argument("--out", required=True, metavar="PROBES_DIR")
    _add_common(p)

    p = sub.add_parser("score", help="per-image concept scores to a CSV")
    p.add_argument("probes_dir", metavar="PROBES_DIR")
    p.add_argument("--images", required=True, metavar="SRC")
    p.add_argument("--out", required=True, metavar="SCORES.csv", help="output CSV, or - for stdout")
    _add_common(p)

    p = sub.add_parser("distill", help="distil the teacher into a surrogate over concept scores")
    _add_teacher(p)
    p.add_argument("--probes", required=True, metavar="PROBES_DIR")
    p.add_argument("--images", required=True, metavar="SRC")
    p.add_argument("--kind", choices=("tree", "linear"), default="tree")
    p.add_argument("--max-depth", type=_positive_int("max_depth"), default=4, metavar="D")
    p.add_argument("--max-leaves", type=_positive_int("max_leaves"), metavar="N")
    p.add_argument("--temperature", type=_temperature, default=1.0, metavar="T|auto")
    p.add_argument("--test-size", type=_fraction, default=0.3, metavar="F")
    p.add_argument("--classes", metavar="NAMES|FILE", help="comma-separated names or a file with one per line")
    p.add_argument("--augment", type=int, default=0, metavar="N",
                   help="extra teacher queries per training image (flips, crops, mixup); default 0")
    p.add_argument("--use-concepts", default="significant", metavar="significant|all|a,b,c",
                   help="concepts the surrogate may use (default: those whose probe beats random probes)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR")
    _add_common(p)

    p = sub.add_parser("explain", help="explain one image's prediction")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="print the explanation as one JSON object")
    p.add_argument("--out", metavar="PNG", help="also draw the explanation to this PNG")

    p = sub.add_parser("render", help="draw a surrogate tree (svg, png, pdf or dot)")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--highlight", metavar="IMAGE", help="highlight this image's path")
    p.add_argument("--thumbnails", action="store_true", help="show an example image in each leaf")

    p = sub.add_parser("audit", help="audit which concepts the teacher relies on")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--images", required=True, metavar="SRC")
    p.add_argument("--spurious", type=_names, default=[], metavar="c1,c2")
    p.add_argument("--compare", metavar="OTHER_MODEL_DIR")
    p.add_argument("--out", required=True, metavar="REPORT_DIR")
    _add_common(p)
    return parser


def _preprocess(args, teacher):
    from concepts.activations import resolve_preprocess
    from concepts.images import parse_triple
    return resolve_preprocess(teacher, args.image_size, parse_triple(args.mean, "--mean"), parse_triple(args.std, "--std"))


def cmd_demo(args):
    from .demo import run_demo
    run_demo(args.out, quick=args.quick, seed=args.seed, progress=not args.quiet)


def cmd_extract(args):
    from concepts.images import load_images
    from concepts.store import cached_extract, dist_env
    from concepts.teacher import load_teacher
    if args.workers is not None and args.workers < 0:
        raise InputError(f"--workers {args.workers}: expected 0 or more")
    teacher = load_teacher(args.teacher, args.weights)
    layers = teacher.resolve_layers(args.layer)
    images = load_images(args.images, skip_bad=args.skip_bad_images)
    acts = cached_extract(teacher, images, layers, _preprocess(args, teacher), args.out, batch_size=args.batch_size,
                          pooling=args.pooling, progress=not args.quiet, num_workers=args.workers)
    if dist_env()[0] == 0:
        shapes = ", ".join(f"{name} {arr.shape[1]}" for name, arr in acts.layers.items())
        _progress_note(args, f"extract: {len(images)} images ({shapes}; logits {acts.logits.shape[1]}) -> {args.out}")


def cmd_probe(args):
    from concepts.images import load_concept_source, load_images
    from concepts.probes import fit_probes, save_probes
    from concepts.tcav import quality_with_tcav
    from concepts.teacher import load_teacher

    from .distill import parse_classes
    if (args.target is None) != (args.images is None):
        raise InputError("--target and --images: give both (TCAV scores for a class on its images) or neither")
    teacher = load_teacher(args.teacher, args.weights)
    layers = teacher.resolve_layers(args.layer)
    preprocess = _preprocess(args, teacher)
    concepts = load_concept_source(args.concepts, concept_columns=args.concept_columns, skip_bad=args.skip_bad_images)
    target_images = load_images(args.images, skip_bad=args.skip_bad_images) if args.images else None
    probes, _ = fit_probes(teacher, concepts, layers, preprocess, random_runs=args.random_runs, pooling=args.pooling,
                           seed=args.seed, batch_size=args.batch_size, progress=not args.quiet)
    if args.target is not None:
        n_out = teacher.n_outputs(preprocess.image_size)
        classes = parse_classes(args.classes, n_out) or teacher.classes or [f"class_{k}" for k in range(n_out)]
        probes.quality_ = quality_with_tcav(teacher, target_images, preprocess, probes, classes,
                                            _class_index(args.target, classes), pooling=args.pooling,
                                            progress=not args.quiet)
    save_probes(args.out, probes, teacher=teacher.to_dict(), preprocess=preprocess.to_dict(), pooling=args.pooling)
    _progress_note(args, f"wrote {args.out}/quality.csv ({len(probes.quality_)} probes; best layer {probes.layer_})")


def _class_index(target, classes):
    if target in classes:
        return classes.index(target)
    if target.isdigit() and int(target) < len(classes):
        return int(target)
    from concepts.errors import did_you_mean
    raise InputError(f"--target {target!r}: not a class name or index ({', '.join(classes)}).{did_you_mean(target, classes)}")


def _progress_note(args, text):
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr)


def cmd_score(args):
    from concepts.activations import extract
    from concepts.fileio import atomic_write_text
    from concepts.images import Preprocess, load_images
    from concepts.probes import load_probes
    from concepts.teacher import load_teacher
    probes, meta = load_probes(args.probes_dir)
    t = meta["teacher"]
    teacher = load_teacher(t["spec"], t.get("weights"))
    images = load_images(args.images, skip_bad=args.skip_bad_images)
    acts = extract(teacher, images, [probes.layer_], Preprocess.from_dict(meta["preprocess"]), batch_size=args.batch_size,
                   pooling=meta["pooling"], progress=not args.quiet)
    scores = probes.transform(acts.layers[probes.layer_])
    scores.insert(0, "path", images.table["path"].to_numpy())
    text = scores.to_csv(index=False)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        atomic_write_text(args.out, text)


def cmd_distill(args):
    from concepts.errors import TeacherError
    from concepts.images import Preprocess, load_images
    from concepts.probes import load_probes
    from concepts.teacher import load_teacher

    from .distill import distill, parse_classes
    probes, meta = load_probes(args.probes)
    teacher = load_teacher(args.teacher, args.weights)
    if teacher.weights_sha256 != meta["teacher"]["weights_sha256"]:
        raise TeacherError(f"--probes {args.probes}: fitted on a different teacher ({meta['teacher']['spec']}); "
                           "run 'surrogate probe' with this teacher")
    preprocess = Preprocess.from_dict(meta["preprocess"])
    if args.image_size or args.mean or args.std:
        preprocess = _preprocess(args, teacher)
    images = load_images(args.images, skip_bad=args.skip_bad_images)
    classes = parse_classes(args.classes) or teacher.classes
    model = distill(teacher, probes, images, preprocess, kind=args.kind, max_depth=args.max_depth,
                    max_leaves=args.max_leaves, temperature=args.temperature, test_size=args.test_size,
                    classes=classes, pooling=meta["pooling"], seed=args.seed, batch_size=args.batch_size,
                    progress=not args.quiet, augment=args.augment,
                    concepts=args.use_concepts if args.use_concepts in ("significant", "all") else _names(args.use_concepts))
    model.save(args.out)
    m = model.metrics
    _progress_note(args, f"{args.kind} surrogate: fidelity {m['fidelity']:.3f} (hard-label {m['hard_label_fidelity']:.3f}, "
                         f"ceiling {m['ceiling_fidelity']:.3f}) on {m['n_test']} held-out images -> {args.out}")
    if m["excluded_concepts"]:
        print(f"note: left out concepts whose probes do not beat random probes: {', '.join(m['excluded_concepts'])}",
              file=sys.stderr)
    if "warning" in m:
        print(f"warning: {m['warning']}", file=sys.stderr)


def cmd_explain(args):
    from concepts.fileio import to_json

    from .explain import explain, format_explanation, plot_explanation
    from .model import SurrogateModel
    model = SurrogateModel.load(args.model_dir)
    if args.out and Path(args.out).suffix.lower() != ".png":
        raise InputError(f"--out {args.out}: expected a .png file")
    result = explain(model, args.image)
    if args.out:
        plot_explanation(result, args.image, args.out)
    if args.json:
        sys.stdout.write(to_json(result, indent=None) + "\n")
    else:
        sys.stdout.write(format_explanation(result) + "\n")


def cmd_render(args):
    from .render import render_model
    render_model(args.model_dir, args.out, highlight=args.highlight, thumbnails=args.thumbnails)


def cmd_audit(args):
    from concepts.images import load_images

    from .audit import audit, write_report
    from .model import SurrogateModel
    model = SurrogateModel.load(args.model_dir)
    other = SurrogateModel.load(args.compare) if args.compare else None
    images = load_images(args.images, skip_bad=args.skip_bad_images)
    report = audit(model, images, spurious=args.spurious, compare=other, seed=args.seed, batch_size=args.batch_size,
                   progress=not args.quiet)
    write_report(report, args.out, model=model)
    _progress_note(args, f"audit: fidelity {report['fidelity']:.3f}, ceiling {report['ceiling_fidelity']:.3f}; "
                         f"flagged: {', '.join(report['flagged']) or 'none'} -> {args.out}/report.html")


COMMANDS = {"demo": cmd_demo, "extract": cmd_extract, "probe": cmd_probe, "score": cmd_score, "distill": cmd_distill,
            "explain": cmd_explain, "render": cmd_render, "audit": cmd_audit}


def main(argv=None) -> int:
    """Entry point of the ``surrogate`` command. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    old_format = warnings.formatwarning
    warnings.formatwarning = lambda message, *_a, **_k: f"{PROG} {args.command}: warning: {message}\n"
    try:
        import torch
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
        COMMANDS[args.command](args)
    except ConceptSurrogateError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"{PROG} {args.command}: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = old_format
    return 0


if __name__ == "__main__":
    sys.exit(main())
