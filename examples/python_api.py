"""The pipeline from Python, on the toy zoo that `make demo` wrote to demo-output/.

Run after `make demo`:  .venv/bin/python examples/python_api.py [demo-output]
"""

import sys
from pathlib import Path

from concepts.images import load_images
from concepts.probes import fit_probes
from concepts.teacher import load_teacher
from surrogate.distill import distill
from surrogate.explain import explain, format_explanation
from surrogate.export import export_text, render

demo = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-output")
out = demo / "python-api"

# 1. the teacher: a torch.export program (torchvision:NAME, model.pt and package.module:factory work too)
teacher = load_teacher(demo / "teacher.pt2")
preprocess = teacher.preprocess  # implied by the file: 64x64, no normalisation

# 2. concept probes from a table with 0/1 concept columns (or a TCAV folder layout)
concepts = load_images(demo / "data" / "concepts" / "images.csv")
probes, _ = fit_probes(teacher, concepts, ["layer3", "layer4"], preprocess, seed=0)
print(probes.quality_.query("layer == @probes.layer_")[["concept", "auc", "significant"]].to_string(index=False))

# 3. distil a depth-3 tree from the teacher's soft outputs at temperature 2
images = load_images(demo / "data" / "images")
model = distill(teacher, probes, images, preprocess, kind="tree", max_depth=3, temperature=2.0,
                classes=teacher.classes, seed=0)
m = model.metrics
print(f"fidelity {m['fidelity']:.3f} (95% CI {m['fidelity_ci'][0]:.3f}-{m['fidelity_ci'][1]:.3f}), "
      f"hard-label {m['hard_label_fidelity']:.3f}, ceiling {m['ceiling_fidelity']:.3f}")
print(export_text(model.estimator))

# 4. save, render, explain
model.save(out / "model")
render(model.estimator, out / "tree.svg", title="depth-3 surrogate")
image = sorted((demo / "data" / "audit" / "leopard").glob("*.png"))[0]
print(format_explanation(explain(model, image, teacher=teacher)))
