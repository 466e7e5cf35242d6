"""Loading a teacher from a specification string, and running it with layer taps.

Specifications (DESIGN.md, "Teacher spec"):

- ``path/model.pt2``: a ``torch.export`` program, loaded with ``torch.export.load`` and
  ``torch.export.unflatten`` so submodules keep their dotted names and forward hooks work;
- ``path/model.pt``: a TorchScript file. Hooks do not work on it, so layers are tapped by running the
  module's named children in order, after checking on the first batch that this chain reproduces the
  module's own output;
- ``torchvision:NAME`` with optional weights (a state_dict, ``weights_only=True``);
- ``package.module:factory``: a callable returning an ``nn.Module``, with optional weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .errors import LayerNotFoundError, TeacherError, did_you_mean
from .images import IMAGENET_MEAN, IMAGENET_STD, Preprocess

META_FILE = "concept_surrogate.json"


def sha256_file(path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_state(module: nn.Module) -> str:
    """SHA-256 over a module's state_dict (names, shapes and bytes), for teachers without a file."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def stdout_to_stderr():
    """Send anything printed (e.g. by a teacher's forward) to stderr: stdout is for machine output."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Put ``module`` in eval mode and restore each submodule's training flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def record(model: nn.Module, layers: Sequence[str], *, grad_layer: str | None = None):
    """Record the outputs of ``layers`` of ``model`` during the forward passes inside the block.

    Hooks are always removed, even on error. A requested layer that never ran raises
    :class:`TeacherError` when the block exits. A module that runs twice keeps its first output.

    Parameters
    ----------
    grad_layer : str, optional
        One of ``layers`` whose output is replaced by a detached copy that requires grad, so the logits
        can be differentiated with respect to it.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    >>> with record(net, ["0"]) as acts:
    ...     _ = net(torch.zeros(1, 2))
    >>> acts["0"].shape
    torch.Size([1, 3])
    """
    modules = dict(model.named_modules())
    for name in layers:
        if not name or name not in modules:
            raise LayerNotFoundError(f"Layer '{name}' not found in {type(model).__name__}."
                                     f"{did_you_mean(name, [n for n in modules if n])}")
    acts: dict[str, torch.Tensor] = {}

    def make_hook(name):
        def hook(_mod, _inp, out):
            if not isinstance(out, torch.Tensor):
                raise TeacherError(f"Layer '{name}' returns {type(out).__name__}, not a tensor; choose another layer")
            if name == grad_layer:
                out = out.detach().requires_grad_(True)
                acts[name] = out
                return out
            acts.setdefault(name, out)
            return None
        return hook

    handles = []
    try:
        for name in layers:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        yield acts
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in acts]
    if missing:
        raise TeacherError(f"Layer(s) {', '.join(missing)} never ran in the teacher's forward pass; choose another layer")


class Teacher:
    """A teacher network with its specification, weights hash and implied preprocessing.

    Parameters
    ----------
    module : nn.Module
        The network; never modified (hooks are removed and training flags restored after each call).
    spec : str
        The specification it was loaded from (stored with every output).
    weights_sha256 : str
        SHA-256 of the weights file, or of the state_dict when there is no file.
    preprocess : Preprocess, optional
        Preprocessing implied by the specification (e.g. ImageNet normalisation for ``torchvision:``).
    classes : list of str, optional
        Class names carried by the teacher file, if any.
    scripted : bool, default=False
        TorchScript module: layers are tapped by chaining named children instead of hooks.
    """

    def __init__(self, module: nn.Module, spec: str, *, weights_sha256: str, preprocess: Preprocess | None = None,
                 classes: list[str] | None = None, scripted: bool = False, weights_path: str | None = None):
        self.module = module
        self.spec = spec
        self.weights_sha256 = weights_sha256
        self.weights_path = weights_path
        self.preprocess = preprocess
        self.classes = classes
        self.scripted = scripted
        self._chain_checked: set[tuple[str, ...]] = set()

    # ------------------------------------------------------------------ layers
    def layer_names(self) -> list[str]:
        """Dotted names of every submodule, as in ``named_modules()``."""
        return [n for n, _ in self.module.named_modules() if n]

    def resolve_layers(self, layers) -> list[str]:
        """Split ``"a,b"`` or a list into layer names and check each exists.

        Raises
        ------
        LayerNotFoundError
            Naming the closest valid layer names.
        """
        if isinstance(layers, str):
            layers = [s.strip() for s in layers.split(",") if s.strip()]
        layers = list(dict.fromkeys(layers))
        if not layers:
            raise LayerNotFoundError("--layer: no layer given")
        names = self.layer_names()
        known = set(names)
        for layer in layers:
            if layer not in known:
                hint = did_you_mean(layer, names) or (" Valid layers include: " + ", ".join(names[:8]) + ", ...")
                raise LayerNotFoundError(f"Layer '{layer}' not found in {type(self.module).__name__} ({self.spec}).{hint}")
        return layers

    def to_dict(self) -> dict:
        return {"spec": self.spec, "weights_sha256": self.weights_sha256, "weights": self.weights_path}

    # ----------------------------------------------------------------- running
    def forward(self, x: torch.Tensor, layers: Sequence[str] = (), *, grad_layer: str | None = None):
        """Run the teacher on a batch, returning logits and the outputs of ``layers``.

        Parameters
        ----------
        x : Tensor of shape (n, 3, H, W)
        layers : sequence of str
            Layers to tap (already resolved).
        grad_layer : str, optional
            A tapped layer whose output is made a leaf that requires grad, so the caller can
            differentiate the logits with respect to it (TCAV). Run outside ``inference_mode``.

        Returns
        -------
        logits : Tensor of shape (n, n_classes)
        acts : dict of str to Tensor
            Raw layer outputs, keyed by layer name.
        """
        layers = list(layers)
        with eval_mode(self.module), stdout_to_stderr():
            if self.scripted:
                return self._forward_chain(x, layers, grad_layer)
            return self._forward_hooks(x, layers, grad_layer)

    def _forward_hooks(self, x, layers, grad_layer):
        with record(self.module, layers, grad_layer=grad_layer) as acts:
            logits = _as_logits(self.module(x))
        return logits, acts

    def _forward_chain(self, x, layers, grad_layer):
        key = tuple(sorted(layers))
        acts: dict[str, torch.Tensor] = {}
        logits = _as_logits(_run_chain(self.module, x, [n.split(".") for n in layers], "", acts, grad_layer))
        if key not in self._chain_checked:
            with torch.no_grad():
                reference = _as_logits(self.module(x))
            if reference.shape != logits.shape or not torch.allclose(reference, logits.detach(), rtol=1e-4, atol=1e-4):
                raise TeacherError(
                    f"{self.spec}: running the TorchScript module's named children in order does not reproduce its "
                    "output, so layer activations cannot be tapped (hooks do not work on TorchScript). "
                    "Export the model with torch.export (torch.export.save(...) to a .pt2 file) instead")
            self._chain_checked.add(key)
        missing = [n for n in layers if n not in acts]
        if missing:
            raise TeacherError(f"Layer(s) {', '.join(missing)} never ran when chaining the TorchScript children; "
                               "export the model with torch.export (.pt2) to probe this layer")
        return logits, acts

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch (no layer taps)."""
        return self.forward(x)[0]

    def n_outputs(self, image_size: int) -> int:
        """Number of classes the teacher outputs (one forward pass on a blank image)."""
        with torch.inference_mode():
            return int(self.logits(torch.zeros(1, 3, image_size, image_size)).shape[1])


def _as_logits(out) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = out.get("logits", next(iter(out.values())))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TeacherError(f"the teacher's output is {shape}; expected logits of shape (batch, n_classes)")
    return out


def _run_chain(module, x, targets: list[list[str]], prefix: str, acts: dict, grad_layer):
    """Run ``module``'s children in order, descending into children that contain target layers."""
    children = list(module.named_children())
    if not children:
        raise TeacherError(f"TorchScript module '{prefix or '<root>'}' has no children to chain")
    for name, child in children:
        full = f"{prefix}.{name}" if prefix else name
        exact = any(len(t) == 1 and t[0] == name for t in targets)
        deeper = [t[1:] for t in targets if len(t) > 1 and t[0] == name]
        x = _run_chain(child, x, deeper, full, acts, grad_layer) if deeper else child(x)
        if exact:
            if full == grad_layer:
                x = x.detach().requires_grad_(True)
            acts[full] = x
    return x


# --------------------------------------------------------------------------- loading
def load_teacher(spec: str, weights: str | None = None) -> Teacher:
    """Load a teacher from a specification string (see module docstring).

    Parameters
    ----------
    spec : str
        ``model.pt2``, ``model.pt``, ``torchvision:NAME`` or ``package.module:factory``.
    weights : str, optional
        A state_dict file for ``torchvision:`` and factory specs, loaded with ``weights_only=True``.

    Returns
    -------
    Teacher
    """
    spec = str(spec)
    path = Path(spec)
    if spec.startswith("torchvision:"):
        return _load_torchvision(spec, weights)
    if path.suffix.lower() in (".pt2",):
        _no_weights(spec, weights)
        return _load_export(path, str(path.resolve()))
    if path.suffix.lower() in (".pt", ".pth", ".ts", ".torchscript"):
        _no_weights(spec, weights)
        return _load_script(path, str(path.resolve()))
    if ":" in spec and not path.exists():
        return _load_factory(spec, weights)
    raise TeacherError(f"--teacher {spec!r}: expected a .pt2 (torch.export) or .pt (TorchScript) file, "
                       "torchvision:NAME, or package.module:factory")


def _no_weights(spec, weights):
    if weights:
        raise TeacherError(f"--weights {weights}: only for torchvision: and package.module:factory teachers; "
                           f"{spec} already contains its weights")


def _read_meta(text: str, spec: str) -> dict:
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise TeacherError(f"--teacher {spec}: its {META_FILE} entry is not valid JSON") from None


def _meta_preprocess(meta: dict) -> Preprocess | None:
    return Preprocess.from_dict(meta["preprocess"]) if "preprocess" in meta else None


def _load_export(path: Path, spec: str) -> Teacher:
    if not path.is_file():
        raise TeacherError(f"--teacher {path}: no such file")
    extra = {META_FILE: ""}
    try:
        with stdout_to_stderr(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecation notices while unpickling specs
            program = torch.export.load(str(path), extra_files=extra)
            module = torch.export.unflatten(program)
    except Exception as e:
        raise TeacherError(f"--teacher {path}: not a loadable torch.export program ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
    meta = _read_meta(extra.get(META_FILE, ""), spec)
    preprocess = _meta_preprocess(meta)
    if preprocess is None:
        size = _exported_image_size(program)
        preprocess = Preprocess(size) if size else None
    return Teacher(module, spec, weights_sha256=sha256_file(path), preprocess=preprocess,
                   classes=meta.get("classes"))


def _exported_image_size(program) -> int | None:
    """The square input size fixed in an exported program's signature, if any."""
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            shape = getattr(val, "shape", None)
            if shape is not None and len(shape) == 4:
                h, w = shape[2], shape[3]
                if isinstance(h, int) and isinstance(w, int) and h == w:
                    return h
            return None
    return None


def _load_script(path: Path, spec: str) -> Teacher:
    if not path.is_file():
        raise TeacherError(f"--teacher {path}: no such file")
    extra = {META_FILE: ""}
    try:
        with stdout_to_stderr():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as e:
        raise TeacherError(f"--teacher {path}: not a TorchScript file ({type(e).__name__}). A state_dict needs "
                           "torchvision:NAME or package.module:factory with --weights") from None
    meta = _read_meta(extra.get(META_FILE, ""), spec)
    return Teacher(module, spec, weights_sha256=sha256_file(path), preprocess=_meta_preprocess(meta),
                   classes=meta.get("classes"), scripted=True)


def _head_outputs(module: nn.Module, state: dict) -> int | None:
    """Outputs of the state_dict's last linear layer when they differ from ``module``'s, else ``None``."""
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    name, last = linears[-1]
    w = state.get(f"{name}.weight")
    if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == last.in_features and w.shape[0] != last.out_features:
        return int(w.shape[0])
    return None


def _read_state(weights: str) -> dict:
    """Read a state_dict with ``weights_only=True`` (one-line errors; never unpickles arbitrary objects)."""
    wpath = Path(weights)
    if not wpath.is_file():
        raise TeacherError(f"--weights {weights}: no such file")
    try:
        state = torch.load(str(wpath), map_location="cpu", weights_only=True)
    except Exception as e:
        raise TeacherError(f"--weights {weights}: not a state_dict loadable with weights_only=True "
                           f"({type(e).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TeacherError(f"--weights {weights}: expected a state_dict (a dict of tensors)")
    return state


def _load_state(module: nn.Module, weights: str, spec: str, state: dict | None = None) -> None:
    state = _read_state(weights) if state is None else state
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise TeacherError(f"--weights {weights}: does not match {spec}: {str(e).splitlines()[0]}") from None


def _load_torchvision(spec: str, weights: str | None) -> Teacher:
    name = spec.split(":", 1)[1]
    try:
        import torchvision
    except Exception as e:  # ImportError, or an operator registration error with a mismatched torch
        raise TeacherError(f"--teacher {spec}: torchvision is not importable ({type(e).__name__}: {e})".replace("\n", " ")) from None
    available = torchvision.models.list_models()
    if name not in available:
        raise TeacherError(f"--teacher {spec}: no torchvision model '{name}'.{did_you_mean(name, available)}")
    with stdout_to_stderr():
        torch.manual_seed(0)  # deterministic initialisation when no weights are given
        module = torchvision.models.get_model(name, weights=None)
    if weights:
        state = _read_state(weights)
        n_out = _head_outputs(module, state)
        if n_out is not None:  # a fine-tuned model: rebuild its head with the weights' number of classes
            with stdout_to_stderr():
                module = torchvision.models.get_model(name, weights=None, num_classes=n_out)
        _load_state(module, weights, spec, state)
    module.eval()
    sha = sha256_file(weights) if weights else sha256_state(module)
    return Teacher(module, spec, weights_sha256=sha, preprocess=Preprocess(224, IMAGENET_MEAN, IMAGENET_STD),
                   weights_path=weights)


def _load_factory(spec: str, weights: str | None) -> Teacher:
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:
        raise TeacherError(f"--teacher {spec}: cannot import module '{mod_name}' ({type(e).__name__}: {e})") from None
    factory = getattr(mod, attr, None)
    if factory is None or not callable(factory):
        names = [n for n in dir(mod) if not n.startswith("_")]
        raise TeacherError(f"--teacher {spec}: '{mod_name}' has no callable '{attr}'.{did_you_mean(attr, names)}")
    with stdout_to_stderr():
        torch.manual_seed(0)
        module = factory()
    if not isinstance(module, nn.Module):
        raise TeacherError(f"--teacher {spec}: the factory returned {type(module).__name__}, expected a torch.nn.Module")
    if weights:
        _load_state(module, weights, spec)
    module.eval()
    sha = sha256_file(weights) if weights else sha256_state(module)
    return Teacher(module, spec, weights_sha256=sha, weights_path=weights)
