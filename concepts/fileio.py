"""Atomic file and folder writes: a reader never sees a half-written output, an error loses nothing."""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def atomic_path(path, *, suffix: str = ".tmp"):
    """Yield a temporary path beside ``path`` for a writer that takes a file name; on success it is moved
    onto ``path``, on any error it is removed and an existing ``path`` is left as it was.

    ``suffix`` ends the temporary name (for writers that check the extension, e.g. ``".pt2"``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and move it into place (see :func:`atomic_path`).

    The file gets ordinary permissions (``0o666`` less the umask, unlike ``mkstemp``'s ``0o600``).
    """
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _clean(o):
    """Make ``o`` strict-JSON serialisable (NaN/inf -> null, numpy scalars -> Python)."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    if isinstance(o, (np.bool_, bool)):
        return bool(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating, float)):
        return None if not math.isfinite(float(o)) else float(o)
    return o


def to_json(obj, indent: int | None = 2) -> str:
    """Strict JSON (no NaN) of nested dicts/lists with numpy values."""
    return json.dumps(_clean(obj), indent=indent, allow_nan=False)


def write_json(path, obj) -> Path:
    return atomic_write_text(path, to_json(obj) + "\n")


def write_csv(path, df) -> Path:
    return atomic_write_text(path, df.to_csv(index=False))


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary folder; on success it replaces ``path`` (an existing folder is swapped out
    only after the new one is complete); on error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        from .errors import InputError
        raise InputError(f"--out {path}: exists and is not a folder")
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)


def replace_dir(src, dst) -> None:
    """Move the finished folder ``src`` onto ``dst``; an existing ``dst`` (folder, file or link) is moved
    aside first and deleted only after ``src`` is in place."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def read_json(path, *, what: str) -> dict:
    """Read a JSON file; a one-line :class:`InputError` naming ``what`` when it is missing or malformed."""
    from .errors import InputError
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what}: no {path.name} in {path.parent}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def load_arrays(path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file, read with ``allow_pickle=False`` (a pickled array is refused)."""
    import zipfile

    from .errors import InputError
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: cannot read arrays without unpickling ({e})") from None
