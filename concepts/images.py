"""Image sources and preprocessing.

An image source is either a folder (searched recursively for ``*.png|jpg|jpeg|bmp|webp``; the name of
the first sub-folder under the root is the class label when images live in sub-folders) or a table
(``.csv`` or ``.parquet``) with a ``path`` column (relative to the table's folder, or absolute), an
optional ``label`` column and optional 0/1 concept columns (DESIGN.md, "Inputs").
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from .errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TABLE_EXTENSIONS = (".csv", ".parquet")
RESERVED_COLUMNS = ("path", "label")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_triple(text, option: str) -> tuple[float, float, float] | None:
    """Parse ``"a,b,c"`` (or a sequence of three numbers) into a float triple; ``None`` passes through."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise InputError(f"{option} {text!r}: expected three comma-separated numbers, e.g. 0.5,0.5,0.5") from None
    if len(values) != 3:
        raise InputError(f"{option} {text!r}: expected three comma-separated numbers, got {len(values)}")
    return values


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing: square resize, scale to [0, 1], optional per-channel normalisation.

    Parameters
    ----------
    image_size : int
        Side of the square the image is resized to (bilinear).
    mean, std : tuple of 3 floats or None, default=None
        Per-channel normalisation ``(x - mean) / std`` applied after scaling to [0, 1]. ``None`` means
        no normalisation.
    """

    image_size: int
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise InputError(f"--image-size {self.image_size!r}: expected a positive integer")
        if (self.mean is None) != (self.std is None):
            raise InputError("--mean and --std: give both or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise InputError(f"--std {self.std}: every value must be > 0")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Return a float32 tensor of shape (3, image_size, image_size)."""
        image = image.convert("RGB")
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
            x = (x - mean) / std
        return x

    def to_dict(self) -> dict:
        return {"image_size": self.image_size,
                "mean": list(self.mean) if self.mean else None,
                "std": list(self.std) if self.std else None}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(int(d["image_size"]),
                   tuple(d["mean"]) if d.get("mean") else None,
                   tuple(d["std"]) if d.get("std") else None)


@dataclass
class ImageSet:
    """An ordered list of images with optional labels and 0/1 concept annotations.

    Attributes
    ----------
    root : Path
        Folder that relative paths in :attr:`table` refer to.
    table : DataFrame
        ``path`` (as given: relative to ``root`` or absolute), ``label`` (str or missing) and one column
        per concept (float: 1, 0 or NaN when unknown).
    concepts : list of str
        Concept column names.
    """

    root: Path
    table: pd.DataFrame
    concepts: list[str] = field(default_factory=list)
    #: 0 labels come from a random set (TCAV's random/), not verified negatives
    random_negatives: bool = False

    def __len__(self) -> int:
        return len(self.table)

    @property
    def paths(self) -> list[Path]:
        """Absolute paths, in order."""
        return [p if p.is_absolute() else self.root / p for p in map(Path, self.table["path"])]

    @property
    def labels(self) -> list[str] | None:
        if "label" not in self.table or self.table["label"].isna().all():
            return None
        return [None if pd.isna(v) else str(v) for v in self.table["label"]]

    def fingerprint(self) -> str:
        """SHA-256 over the image list with file sizes and modification times."""
        h = hashlib.sha256()
        for p in self.paths:
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def subset(self, index) -> ImageSet:
        return ImageSet(self.root, self.table.iloc[np.asarray(index)].reset_index(drop=True), list(self.concepts),
                        self.random_negatives)


def _list_folder(folder: Path) -> list[Path]:
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _binary_columns(df: pd.DataFrame) -> list[str]:
    cols = []
    for c in df.columns:
        if c in RESERVED_COLUMNS:
            continue
        values = pd.to_numeric(df[c], errors="coerce")
        if values.notna().all() and values.isin([0, 1]).all():
            cols.append(c)
    return cols


def read_table(path: Path, option: str = "--images") -> pd.DataFrame:
    """Read a ``.csv`` or ``.parquet`` table, with one-line errors for unreadable files."""
    try:
        if path.suffix.lower() == ".parquet":
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path)
    except ImportError as e:
        raise InputError(f"{option} {path}: reading parquet needs pyarrow ({e})") from None
    except Exception as e:  # pandas raises many types for a malformed table
        raise InputError(f"{option} {path}: cannot read table: {e}".replace("\n", " ")) from None
    if "path" not in df.columns:
        raise InputError(f"{option} {path}: the table has no 'path' column (columns: {', '.join(map(str, df.columns))})")
    if df.empty:
        raise InputError(f"{option} {path}: the table has no rows")
    return df


def load_images(source, *, concept_columns: Sequence[str] | None = None, option: str = "--images",
                check_exists: bool = True, skip_bad: bool = False) -> ImageSet:
    """Load an image source: a folder or a ``.csv``/``.parquet`` table.

    Parameters
    ----------
    source : str or Path
        Folder of images (sub-folder names become labels) or table with a ``path`` column.
    concept_columns : sequence of str, optional
        Concept columns to keep from a table. Default: every 0/1 column other than ``path``/``label``.
    option : str, default="--images"
        Option name used in error messages.
    check_exists : bool, default=True
        Raise :class:`InputError` naming the first missing file.
    skip_bad : bool, default=False
        Decode every image now and leave out missing, unreadable or truncated ones, with one warning that
        counts them and names the first. Without it such an image is an error naming the file.

    Returns
    -------
    ImageSet
    """
    src = Path(source)
    if not src.exists():
        raise InputError(f"{option} {src}: no such file or folder")
    if src.is_dir():
        files = _list_folder(src)
        if not files:
            raise InputError(f"{option} {src}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in the folder")
        rel = [f.relative_to(src) for f in files]
        labels = [r.parts[0] if len(r.parts) > 1 else None for r in rel]
        table = pd.DataFrame({"path": [r.as_posix() for r in rel], "label": labels})
        image_set = ImageSet(src, table, [])
        return drop_unreadable(image_set, option) if skip_bad else image_set
    if src.suffix.lower() not in TABLE_EXTENSIONS:
        raise InputError(f"{option} {src}: expected a folder of images or a .csv/.parquet table")
    df = read_table(src, option)
    available = _binary_columns(df)
    if concept_columns is None:
        concepts = available
    else:
        concepts = list(concept_columns)
        for c in concepts:
            if c not in df.columns:
                raise InputError(f"--concept-columns: '{c}' is not a column of {src}.{_hint(c, available)}")
            if c not in available:
                raise InputError(f"--concept-columns: column '{c}' of {src} is not 0/1")
    table = pd.DataFrame({"path": df["path"].astype(str)})
    table["label"] = df["label"].astype("string") if "label" in df.columns else pd.NA
    for c in concepts:
        table[c] = pd.to_numeric(df[c]).astype(float)
    image_set = ImageSet(src.parent, table, concepts)
    if skip_bad:
        return drop_unreadable(image_set, option)
    if check_exists:
        for p in image_set.paths:
            if not p.is_file():
                raise InputError(f"{option} {src}: image '{p}' listed in the table does not exist")
    return image_set


def drop_unreadable(image_set: ImageSet, option: str = "--images") -> ImageSet:
    """``image_set`` without the images that are missing or do not decode, with one counted warning."""
    bad, first = [], None
    for i, p in enumerate(image_set.paths):
        try:
            open_image(p)
        except InputError as e:
            bad.append(i)
            first = first or str(e)
    if not bad:
        return image_set
    keep = np.setdiff1d(np.arange(len(image_set)), bad)
    if len(keep) == 0:
        raise InputError(f"{option}: none of the {len(image_set)} images could be read (first: {first})")
    warnings.warn(f"{option}: skipped {len(bad)} of {len(image_set)} images that could not be read (first: {first})",
                  stacklevel=2)
    return image_set.subset(keep)


def _hint(name, candidates):
    from .errors import did_you_mean
    return did_you_mean(name, candidates)


def load_concept_source(source, *, concept_columns: Sequence[str] | None = None,
                        min_examples: int = 2, skip_bad: bool = False) -> ImageSet:
    """Load concept examples: a TCAV folder layout or a table with 0/1 concept columns.

    A folder must hold one sub-folder of positive examples per concept plus ``random/``. Random images
    are negatives for every concept (TCAV's assumption; in real use they contain concepts by chance);
    an image in one concept's folder is unlabelled (NaN) for the other concepts. ``skip_bad`` as in
    :func:`load_images` (the counts of examples are checked after skipping).

    Returns
    -------
    ImageSet
        ``table`` has one float column per concept: 1 positive, 0 negative, NaN unknown.
    """
    src = Path(source)
    if not src.exists():
        raise InputError(f"--concepts {src}: no such file or folder")
    if not src.is_dir():
        image_set = load_images(src, concept_columns=concept_columns, option="--concepts", skip_bad=skip_bad)
        if not image_set.concepts:
            raise InputError(f"--concepts {src}: the table has no 0/1 concept columns")
        _check_counts(image_set, min_examples, str(src))
        return image_set
    subdirs = sorted(d for d in src.iterdir() if d.is_dir())
    names = [d.name for d in subdirs]
    if "random" not in names:
        raise InputError(f"--concepts {src}: no 'random/' sub-folder (TCAV layout: one folder per concept plus random/)")
    concepts = [n for n in names if n != "random"]
    if concept_columns is not None:
        for c in concept_columns:
            if c not in concepts:
                raise InputError(f"--concept-columns: no concept folder '{c}' in {src}.{_hint(c, concepts)}")
        concepts = list(concept_columns)
    if not concepts:
        raise InputError(f"--concepts {src}: no concept sub-folders besides random/")
    rows = []
    for name in concepts + ["random"]:
        files = _list_folder(src / name)
        if not files:
            raise InputError(f"--concepts {src / name}: the concept folder holds no images")
        for f in files:
            row = {"path": f.relative_to(src).as_posix(), "label": pd.NA}
            for c in concepts:
                row[c] = 0.0 if name == "random" else (1.0 if c == name else np.nan)
            rows.append(row)
    image_set = ImageSet(src, pd.DataFrame(rows), concepts, random_negatives=True)
    if skip_bad:
        image_set = drop_unreadable(image_set, "--concepts")
    _check_counts(image_set, min_examples, str(src))
    return image_set


def _check_counts(image_set: ImageSet, min_examples: int, where: str):
    for c in image_set.concepts:
        col = image_set.table[c]
        n_pos, n_neg = int((col == 1).sum()), int((col == 0).sum())
        if n_pos < min_examples:
            raise InputError(f"--concepts {where}: concept '{c}' has {n_pos} positive examples, need at least {min_examples}")
        if n_neg < min_examples:
            raise InputError(f"--concepts {where}: concept '{c}' has {n_neg} negative examples, need at least {min_examples}")


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], preprocess: Preprocess):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.preprocess(open_image(self.paths[i]))


def open_image(path) -> Image.Image:
    """Open and fully decode an image; one-line :class:`InputError` for unreadable or truncated files."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"image {path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"image {path}: cannot read image ({e})") from None


def iter_batches(paths: Sequence[Path], preprocess: Preprocess, *, batch_size: int = 64,
                 num_workers: int = 0) -> Iterator[torch.Tensor]:
    """Yield preprocessed batches of shape (b, 3, S, S) in order, loading with worker processes."""
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: expected a positive integer")
    dataset = _ImageDataset(paths, preprocess)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers,
                                         persistent_workers=False)
    try:
        yield from loader
    except InputError as e:  # re-raised from a worker with its traceback in the message: keep one line
        last = str(e).strip().splitlines()[-1]
        raise InputError(last.split("InputError: ", 1)[-1]) from None


def default_workers() -> int:
    """Worker processes for image loading: ``min(4, cpu_count - 1)``, 0 on a single core."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))
