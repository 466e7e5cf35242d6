"""``ACT_DIR``: a resumable, content-keyed cache of pooled activations (DESIGN.md, "Outputs").

Layout of a finished ``ACT_DIR``::

    manifest.json      teacher, layers, pooling, preprocessing, image list in order, shapes, hash,
                       "complete": true, "rows_done" (= number of images), file names
    <layer>.npy        float32, (n_images, d_layer), one row per image in manifest order
    logits.npy         float32, (n_images, n_classes), the teacher's logits

Work in progress lives beside it in ``ACT_DIR.partial/``: the same files, preallocated at full size, a
``manifest.json`` with ``"complete": false``, and one ``progress-<rank>.json`` per process that records
``rows_done`` and the row ranges already written. Progress is written after each batch has been flushed
to disk, so it never claims rows that are not there. A rerun with the same :func:`cache_key` continues
where the interrupted one stopped; a run with another key discards the work folder. When every row is
written, the work folder replaces ``ACT_DIR`` in one rename (an older ``ACT_DIR`` stays intact until then).

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment) every rank computes a
disjoint, contiguous run of whole batches of the one-process batch grid, writing into the shared files;
the result is therefore identical to a one-process run with the same batch size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .activations import POOLINGS, Activations, pool
from .errors import ConceptSurrogateError, InputError
from .fileio import atomic_write_text, replace_dir, to_json
from .images import ImageSet, Preprocess, default_workers, iter_batches
from .teacher import Teacher

MANIFEST_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"


def cache_key(teacher: Teacher, layers: Sequence[str], preprocess: Preprocess, pooling: str, images: ImageSet) -> str:
    """SHA-256 over the weights hash, layers, preprocessing, pooling and the image list (sizes, mtimes)."""
    h = hashlib.sha256()
    h.update(json.dumps([teacher.weights_sha256, list(layers), preprocess.to_dict(), pooling], sort_keys=True).encode())
    h.update(images.fingerprint().encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- distributed
def dist_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the environment torchrun sets (``0, 1, 0`` without it)."""
    def get(name, default):
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            raise InputError(f"environment variable {name}={os.environ[name]!r}: expected an integer") from None
    return get("RANK", 0), get("WORLD_SIZE", 1), get("LOCAL_RANK", 0)


@contextlib.contextmanager
def distributed() -> Iterator[tuple[int, int]]:
    """Yield ``(rank, world_size)``; initialise a gloo process group when ``WORLD_SIZE`` > 1.

    An already initialised process group is used as it is (and left alone); one created here is
    destroyed on exit.
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    rank, world, _ = dist_env()
    if world <= 1:
        yield 0, 1
        return
    if not dist.is_available():
        raise InputError(f"WORLD_SIZE={world}: this torch build has no torch.distributed support")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield rank, world
    finally:
        dist.destroy_process_group()


class _Group:
    """The few collectives the extraction needs; no-ops in a single process."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


# --------------------------------------------------------------------------- row ranges
def _merge(ranges) -> list[list[int]]:
    """Sorted, coalesced ``[start, stop)`` ranges."""
    out: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in ranges if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _covered(ranges: list[list[int]], a: int, b: int) -> bool:
    return any(s <= a and b <= e for s, e in ranges)


def _count(ranges) -> int:
    return sum(b - a for a, b in ranges)


# --------------------------------------------------------------------------- files
def partial_dir(act_dir) -> Path:
    """The work folder of an unfinished ``act_dir``."""
    act_dir = Path(act_dir)
    return act_dir.parent / (act_dir.name + PARTIAL_SUFFIX)


def _file_names(layers: Sequence[str]) -> tuple[dict[str, str], str]:
    files = {name: name.replace("/", "_").replace("\\", "_") + ".npy" for name in layers}
    logits = "logits.npy"
    while logits in files.values():  # a layer called "logits"
        logits = "_" + logits
    return files, logits


def _read_manifest(folder: Path) -> dict | None:
    try:
        m = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def _open_arrays(folder: Path, manifest: dict, mode: str) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
    """Memory-map the arrays a manifest names, or ``None`` when one is missing or has the wrong shape."""
    try:
        layers = {}
        for name, fname in manifest["files"].items():
            arr = np.load(folder / fname, mmap_mode=mode, allow_pickle=False)
            if list(arr.shape) != list(manifest["shapes"][name]) or arr.dtype != np.float32:
                return None
            layers[name] = arr
        logits = np.load(folder / manifest["logits_file"], mmap_mode=mode, allow_pickle=False)
        if list(logits.shape) != list(manifest["logits_shape"]) or logits.dtype != np.float32:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return layers, logits


def load_activations(act_dir) -> Activations:
    """Open a finished ``ACT_DIR`` read-only (memory-mapped, ``allow_pickle=False``).

    Raises
    ------
    InputError
        When the folder is not a complete activation cache.
    """
    act_dir = Path(act_dir)
    manifest = _read_manifest(act_dir)
    if manifest is None or not manifest.get("complete"):
        raise InputError(f"{act_dir}: not a complete activation folder (no finished {MANIFEST}); run surrogate extract")
    opened = _open_arrays(act_dir, manifest, "r")
    if opened is None:
        raise InputError(f"{act_dir}: an array named in {MANIFEST} is missing or has the wrong shape; rerun surrogate extract")
    return Activations(*opened)


def _cache_hit(act_dir: Path, key: str) -> bool:
    manifest = _read_manifest(act_dir)
    return (manifest is not None and manifest.get("complete") is True and manifest.get("hash") == key
            and _open_arrays(act_dir, manifest, "r") is not None)


def _check_out(act_dir: Path) -> None:
    """Refuse to replace something that is not an activation folder."""
    if act_dir.exists() or act_dir.is_symlink():
        if not act_dir.is_dir():
            raise InputError(f"--out {act_dir}: exists and is not a folder")
        manifest = _read_manifest(act_dir)
        if not (manifest and "hash" in manifest and "layers" in manifest) and any(act_dir.iterdir()):
            raise InputError(f"--out {act_dir}: exists, is not empty and holds no {MANIFEST}; "
                             "choose a new folder (an existing activation folder is replaced)")


def _check_images(images: ImageSet) -> None:
    for p in images.paths:
        if not p.is_file():
            raise InputError(f"image {p}: no such file")


def _prepare_work(work: Path, manifest: dict) -> None:
    """Keep a work folder with the same key (to resume), otherwise start a fresh one."""
    existing = _read_manifest(work)
    if existing is not None and existing.get("hash") == manifest["hash"] and existing.get("complete") is False:
        if "shapes" not in existing or _open_arrays(work, existing, "r") is not None:
            return
    if work.exists() or work.is_symlink():
        if work.is_dir() and not work.is_symlink():
            shutil.rmtree(work)
        else:
            work.unlink()
    work.mkdir(parents=True)
    atomic_write_text(work / MANIFEST, to_json(manifest) + "\n")


def _read_progress(work: Path, key: str) -> list[list[int]]:
    ranges = []
    for f in sorted(work.glob("progress-*.json")):
        try:
            p = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(p, dict) and p.get("hash") == key:
            ranges.extend(p.get("done", []))
    return _merge(ranges)


# --------------------------------------------------------------------------- extraction
def cached_extract(teacher: Teacher, images: ImageSet, layers: Sequence[str], preprocess: Preprocess, cache_dir, *,
                   batch_size: int = 64, pooling: str = "mean", progress: bool = True,
                   num_workers: int | None = None, desc: str = "extract") -> Activations:
    """Pooled activations of ``layers`` and the logits for ``images``, cached in ``cache_dir`` (``ACT_DIR``).

    A complete ``cache_dir`` whose manifest hash equals :func:`cache_key` is reused without running the
    teacher; otherwise the activations are streamed batch by batch into memory-mapped files (memory
    holds one batch), resuming an interrupted run with the same key, and the finished folder replaces
    ``cache_dir`` atomically. Runs sharded under ``torchrun`` (see the module docstring).

    Parameters
    ----------
    teacher : Teacher
    images : ImageSet
    layers : sequence of str or str
        Dotted layer names (``"a,b"`` is split).
    preprocess : Preprocess
    cache_dir : str or Path
        The ``ACT_DIR``; its work folder is ``<cache_dir>.partial`` beside it.
    batch_size : int, default=64
        Also fixes the batch boundaries, so a run with the same batch size gives identical numbers
        whether it was resumed or sharded.
    pooling : {"mean", "max", "flatten"}, default="mean"
    progress : bool, default=True
        Progress bar on stderr (rank 0 only).
    num_workers : int, optional
        Image-loading worker processes (default: several for 512 images or more, else 0).

    Returns
    -------
    Activations
        ``layers`` and ``logits`` are read-only memory maps of the files in ``cache_dir``.

    Raises
    ------
    InputError
        A missing or unreadable image (named); the work folder is then removed and ``cache_dir`` is
        left as it was.
    """
    layers = teacher.resolve_layers(layers)
    if pooling not in POOLINGS:
        raise InputError(f"--pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: expected a positive integer")
    n = len(images)
    if n == 0:
        raise InputError("--images: no images")
    _check_images(images)
    key = cache_key(teacher, layers, preprocess, pooling, images)
    act_dir = Path(cache_dir)
    with distributed() as (rank, world):
        group = _Group(rank, world)
        hit = None
        if rank == 0:
            hit = _cache_hit(act_dir, key)
            if not hit:
                _check_out(act_dir)
        if not group.broadcast(hit):
            _extract_sharded(teacher, images, layers, preprocess, act_dir, key, group, batch_size=batch_size,
                             pooling=pooling, progress=progress and rank == 0, num_workers=num_workers, desc=desc)
        return load_activations(act_dir)


def _extract_sharded(teacher: Teacher, images: ImageSet, layers: list[str], preprocess: Preprocess, act_dir: Path,
                     key: str, group: _Group, *, batch_size: int, pooling: str, progress: bool,
                     num_workers: int | None, desc: str) -> None:
    n = len(images)
    work = partial_dir(act_dir)
    files, logits_file = _file_names(layers)
    if group.rank == 0:
        _prepare_work(work, {
            "version": MANIFEST_VERSION, "complete": False, "hash": key, "teacher": teacher.to_dict(),
            "layers": layers, "pooling": pooling, "preprocess": preprocess.to_dict(),
            "root": str(images.root.resolve()), "images": [str(p) for p in images.table["path"]],
            "n_images": n, "batch_size": batch_size, "files": files, "logits_file": logits_file})
    group.barrier()

    try:
        _compute_rows(teacher, images, layers, preprocess, work, key, group, batch_size=batch_size,
                      pooling=pooling, progress=progress, num_workers=num_workers, desc=desc)
    except ConceptSurrogateError:
        shutil.rmtree(work, ignore_errors=True)  # the key changes once the input is fixed: nothing to resume
        raise

    group.barrier()
    if group.rank == 0:
        done = _read_progress(work, key)
        if not _covered(done, 0, n):
            raise InputError(f"{work}: rows {_missing(done, n)} were not written by any rank; rerun to complete them")
        manifest = _read_manifest(work)
        manifest.update(complete=True, rows_done=n, batch_size=batch_size, world_size=group.world)
        atomic_write_text(work / MANIFEST, to_json(manifest) + "\n")
        for f in work.glob("progress-*.json"):
            f.unlink()
        replace_dir(work, act_dir)
    group.barrier()


def _missing(done: list[list[int]], n: int) -> str:
    gaps, pos = [], 0
    for a, b in done + [[n, n]]:
        if a > pos:
            gaps.append(f"{pos}-{a - 1}")
        pos = max(pos, b)
    return ", ".join(gaps[:3]) + (" ..." if len(gaps) > 3 else "")


def extract_to_dir(teacher: Teacher, images: ImageSet, layers: Sequence[str], preprocess: Preprocess, out_dir, *,
                   batch_size: int = 64, pooling: str = "mean", progress: bool = True) -> Path:
    """Stream pooled activations of ``layers`` into ``out_dir/<layer>.npy`` (float32, one row per image in
    manifest order) without holding them in memory; the folder appears only when complete.

    A thin wrapper of :func:`cached_extract` (same cache, resume and ``torchrun`` behaviour).
    """
    cached_extract(teacher, images, layers, preprocess, out_dir, batch_size=batch_size, pooling=pooling,
                   progress=progress)
    return Path(out_dir)


def _compute_rows(teacher: Teacher, images: ImageSet, layers: list[str], preprocess: Preprocess, work: Path, key: str,
                  group: _Group, *, batch_size: int, pooling: str, progress: bool, num_workers: int | None,
                  desc: str) -> None:
    """This rank's share of the rows into the work folder's preallocated files, with progress after each batch."""
    n = len(images)
    files, logits_file = _file_names(layers)
    manifest = _read_manifest(work)
    if manifest is None or manifest.get("hash") != key:
        raise InputError(f"{work}: the work folder changed while extracting (another run writing to it?)")
    done = _read_progress(work, key)
    group.barrier()  # every rank has read the progress before any rank rewrites its own file

    # this rank's contiguous run of whole batches of the one-process batch grid
    n_batches = -(-n // batch_size)
    first, stop = group.rank * n_batches // group.world, (group.rank + 1) * n_batches // group.world
    shard = (first * batch_size, min(stop * batch_size, n))
    pending = [j for j in range(first, stop) if not _covered(done, j * batch_size, min((j + 1) * batch_size, n))]
    mine = _merge([[max(a, shard[0]), min(b, shard[1])] for a, b in done])
    paths = images.paths
    todo = [p for j in pending for p in paths[j * batch_size:min((j + 1) * batch_size, n)]]
    if num_workers is None:
        num_workers = default_workers() if len(todo) >= 512 else 0
    # only the grid's last batch can be short, so re-batching the pending images yields the pending batches
    batches = zip(pending, iter_batches(todo, preprocess, batch_size=batch_size, num_workers=num_workers))

    def run(batch):
        with torch.inference_mode():
            z, acts = teacher.forward(batch, layers)
            return z.float().numpy(), {name: pool(acts[name], pooling).float().numpy() for name in layers}

    held = None
    arrays = _open_arrays(work, manifest, "r+") if "shapes" in manifest else None
    if arrays is None:
        # a fresh work folder: learn the row widths from a real batch, then rank 0 preallocates the files
        first_batch = next(batches, None)
        if first_batch is not None:
            held = (first_batch[0], run(first_batch[1]))
        widths = None if held is None else (held[1][0].shape[1], {k: v.shape[1] for k, v in held[1][1].items()})
        widths = next((w for w in group.gather(widths) if w is not None), None)
        if widths is None:
            raise InputError(f"{work}: no rows left to compute but no arrays were written; delete it and rerun")
        if group.rank == 0:
            manifest["shapes"] = {name: [n, int(widths[1][name])] for name in layers}
            manifest["logits_shape"] = [n, int(widths[0])]
            for fname, shape in [(files[name], manifest["shapes"][name]) for name in layers] + \
                                [(logits_file, manifest["logits_shape"])]:
                np.lib.format.open_memmap(work / fname, mode="w+", dtype=np.float32, shape=tuple(shape)).flush()
            atomic_write_text(work / MANIFEST, to_json(manifest) + "\n")
        group.barrier()
        manifest = _read_manifest(work)
        arrays = _open_arrays(work, manifest, "r+") if manifest else None
        if arrays is None:
            raise InputError(f"{work}: cannot open the preallocated arrays; delete it and rerun")
    layer_arrays, logits_array = arrays
    progress_file = work / f"progress-{group.rank}.json"

    with tqdm(total=shard[1] - shard[0], initial=_count(mine), desc=desc, unit="img", disable=not progress,
              leave=False) as bar:
        def store(j, out):
            a, b = j * batch_size, min((j + 1) * batch_size, n)
            z, pooled = out
            logits_array[a:b] = z
            for name in layers:
                layer_arrays[name][a:b] = pooled[name]
            for arr in (logits_array, *layer_arrays.values()):
                arr.flush()
            # progress only after the rows are on disk, so it never claims rows that are not there
            mine.append([a, b])
            mine[:] = _merge(mine)
            atomic_write_text(progress_file, to_json({"hash": key, "rank": group.rank, "rows_done": _count(mine),
                                                      "done": mine}, indent=None) + "\n")
            bar.update(b - a)

        if held is not None:
            store(*held)
            held = None
        for j, batch in batches:
            store(j, run(batch))
