"""A distilled surrogate with everything needed to use it again: the saved-model format (DESIGN.md).

``MODEL_DIR`` holds ``model.json`` (format version, kind, teacher spec and weights SHA-256, layer,
pooling, preprocessing, concept and class names, temperature, estimator parameters, probe metadata),
``arrays.npz`` (probe and estimator arrays, loaded with ``allow_pickle=False``), ``metrics.json``,
``importance.csv`` and, for linear surrogates, ``coefficients.csv``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from concepts.errors import InputError, TeacherError
from concepts.fileio import atomic_dir, load_arrays, read_json, to_json, write_csv
from concepts.images import Preprocess
from concepts.probes import ConceptProbes
from concepts.teacher import Teacher, load_teacher

from .estimators import SURROGATES, LinearSurrogate, TreeSurrogate
from .treeview import TreeArrays

FORMAT_VERSION = 1
MODEL_FILE = "model.json"
ARRAYS_FILE = "arrays.npz"


@dataclass
class SurrogateModel:
    """A fitted surrogate plus the teacher, layer, preprocessing and probes it was distilled with.

    Attributes
    ----------
    kind : {"tree", "linear"}
    estimator : TreeSurrogate or LinearSurrogate
    probes : ConceptProbes
    classes : list of str
        The teacher's output names, in order.
    teacher : dict
        ``spec``, ``weights_sha256`` and ``weights`` (path of the weights file, if any).
    layer, pooling : str
    preprocess : Preprocess
    temperature : float
    metrics : dict
        The content of ``metrics.json``.
    """

    kind: str
    estimator: TreeSurrogate | LinearSurrogate
    probes: ConceptProbes
    classes: list[str]
    teacher: dict
    layer: str
    pooling: str
    preprocess: Preprocess
    temperature: float
    metrics: dict = field(default_factory=dict)
    #: leaf index -> path of the distillation image most typical of that leaf (tree thumbnails)
    examples: dict = field(default_factory=dict)
    #: what distillation saw (scores, teacher probabilities, split); not saved
    fit_data: dict | None = field(default=None, repr=False, compare=False)

    @property
    def concepts(self) -> list[str]:
        return list(self.probes.concepts_)

    def concept_scores(self, acts) -> pd.DataFrame:
        """Concept scores (columns named by concept) from pooled activations at :attr:`layer`."""
        return self.probes.transform(acts, self.layer)

    def importance(self) -> pd.DataFrame:
        """``concept, importance``: global reliance of the surrogate on each concept (sums to 1)."""
        return pd.DataFrame({"concept": self.concepts, "importance": self.estimator.feature_importances()})

    def coefficients(self) -> pd.DataFrame:
        """``class, concept, weight`` rows (linear only), with ``concept = (intercept)`` rows."""
        if self.kind != "linear":
            raise InputError("coefficients exist only for linear surrogates")
        est = self.estimator
        rows = []
        for k, cls in enumerate(self.classes):
            rows += [{"class": cls, "concept": c, "weight": float(est.coef_[k, j])} for j, c in enumerate(self.concepts)]
            rows.append({"class": cls, "concept": "(intercept)", "weight": float(est.intercept_[k])})
        return pd.DataFrame(rows)

    def load_teacher(self, *, check_hash: bool = True) -> Teacher:
        """Load the teacher this surrogate was distilled from; refuse a changed weights file."""
        t = self.teacher
        teacher = load_teacher(t["spec"], t.get("weights"))
        if check_hash and teacher.weights_sha256 != t["weights_sha256"]:
            raise TeacherError(f"teacher {t['spec']}: its weights changed since this surrogate was distilled "
                               "(SHA-256 differs); distill again")
        return teacher

    # --------------------------------------------------------------------- saving
    def save(self, path) -> Path:
        """Write ``MODEL_DIR`` atomically (a complete new folder replaces any old one)."""
        est = self.estimator
        probe_meta, arrays = self.probes.to_state()
        arrays = {f"probe_{k}": v for k, v in arrays.items()}
        if self.kind == "tree":
            arrays.update(est.tree_.to_arrays())
        else:
            for k in ("coef_", "intercept_", "mean_", "scale_"):
                arrays[f"linear_{k}"] = getattr(est, k)
        meta = {
            "format_version": FORMAT_VERSION, "kind": self.kind, "teacher": self.teacher, "layer": self.layer,
            "pooling": self.pooling, "preprocess": self.preprocess.to_dict(), "concepts": self.concepts,
            "classes": self.classes, "temperature": self.temperature, "probes": probe_meta,
            "examples": {str(k): v for k, v in self.examples.items()},
            "estimator": {"params": est.get_params(), **({"transform": est.transform_} if self.kind == "linear" else {})},
        }
        with atomic_dir(path) as tmp:
            (tmp / MODEL_FILE).write_text(to_json(meta) + "\n")
            np.savez(tmp / ARRAYS_FILE, **arrays)
            (tmp / "metrics.json").write_text(to_json(self.metrics) + "\n")
            write_csv(tmp / "importance.csv", self.importance())
            if self.kind == "linear":
                write_csv(tmp / "coefficients.csv", self.coefficients())
        return Path(path)

    @classmethod
    def load(cls, path) -> SurrogateModel:
        """Read a ``MODEL_DIR`` written by :meth:`save` (never unpickles)."""
        path = Path(path)
        mfile = path / MODEL_FILE
        meta = read_json(mfile, what=f"MODEL_DIR {path} (expected a folder written by 'surrogate distill')")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise InputError(f"{mfile}: format version {version!r} is not supported (this toolkit reads version "
                             f"{FORMAT_VERSION}); distill again with this version")
        arrays = load_arrays(path / ARRAYS_FILE)
        kind = meta["kind"]
        if kind not in SURROGATES:
            raise InputError(f"{mfile}: unknown kind {kind!r}")
        probes = ConceptProbes.from_state(meta["probes"], {k[6:]: v for k, v in arrays.items() if k.startswith("probe_")})
        est = SURROGATES[kind](**meta["estimator"]["params"])
        concepts = meta["concepts"]
        est.classes_ = np.array(meta["classes"], dtype=object)
        est.n_features_in_ = len(concepts)
        est.feature_names_in_ = np.array(concepts, dtype=object)
        if kind == "tree":
            est.tree_ = TreeArrays.from_arrays(arrays)
        else:
            for k in ("coef_", "intercept_", "mean_", "scale_"):
                setattr(est, k, arrays[f"linear_{k}"])
            est.transform_ = meta["estimator"]["transform"]
        metrics = {}
        if (path / "metrics.json").is_file():
            metrics = json.loads((path / "metrics.json").read_text())
        return cls(kind=kind, estimator=est, probes=probes, classes=list(meta["classes"]), teacher=meta["teacher"],
                   layer=meta["layer"], pooling=meta["pooling"], preprocess=Preprocess.from_dict(meta["preprocess"]),
                   temperature=float(meta["temperature"]), metrics=metrics,
                   examples={int(k): v for k, v in meta.get("examples", {}).items()})

