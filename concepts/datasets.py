"""Procedural "toy zoo": cartoon animal faces with ground-truth concepts.

Every image is a cartoon face of one of five animal classes (:data:`CLASSES`),
drawn with Pillow from a small, JSON-serialisable parameter dictionary. Each
sample carries the ground truth for a set of human concepts (:data:`CONCEPTS`)
and one spurious concept (:data:`SPURIOUS`, a watermark), so that explanation
methods can be checked against the truth.

Generation is split in two steps:

* :func:`make_samples` draws the labels, the concepts and *all* geometry
  (positions, sizes, colours, per-element seeds), deterministically from a
  seed. Sample ``i`` of seed ``s`` only depends on ``(s, i)`` and the class
  rule arguments; its geometry only depends on ``(s, i)``.
* :func:`render` turns a sample into an RGB image. Geometry for every concept
  is stored even when the concept is absent, so ``render(sample,
  overrides={"stripes": True})`` draws the very same face with stripes added
  and nothing else changed.

Class rules (probability that a concept is present given the class)::

    concept       cat   tiger  leopard  dog   cow   rabbit
    fur           1     1      1        0.7   0.2   0.8
    whiskers      1     1      1        0.15  0     1
    pointy_ears   1     1      1        0     0     0
    floppy_ears   0     0      0        1     0.4   1
    stripes       0     1      0        0     0     0
    spots         0     0      1        0.3   0.7   0.2
    horns         0     0      0        0     1     0
    long_snout    0     0      0        1     0.5   0

A depth-3 decision tree (pointy_ears -> stripes, spots | horns -> long_snout)
recovers the class exactly when ``label_noise=0``. Cat, tiger and leopard differ
only by stripes and spots, so a teacher must see both to tell them apart. Cat, tiger
and leopard are each drawn with probability 0.2, the others with 0.4/3.
"""

from __future__ import annotations

import colorsys
import io
import math
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image, ImageChops, ImageDraw

from .fileio import atomic_write_bytes, atomic_write_text

__all__ = [
    "CLASSES",
    "CONCEPTS",
    "SPURIOUS",
    "ZooSample",
    "make_samples",
    "render",
    "write_image_folder",
    "write_table",
    "write_concept_folders",
]

CLASSES = ("cat", "tiger", "leopard", "dog", "cow", "rabbit")
CONCEPTS = (
    "fur",
    "whiskers",
    "pointy_ears",
    "floppy_ears",
    "stripes",
    "spots",
    "horns",
    "long_snout",
)
SPURIOUS = ("watermark",)
ALL_CONCEPTS = CONCEPTS + SPURIOUS

# P(concept | class), in CONCEPTS order.
_CLASS_RULES: dict[str, dict[str, float]] = {
    "cat": dict(fur=1, whiskers=1, pointy_ears=1, floppy_ears=0, stripes=0, spots=0, horns=0, long_snout=0),
    "tiger": dict(fur=1, whiskers=1, pointy_ears=1, floppy_ears=0, stripes=1, spots=0, horns=0, long_snout=0),
    "leopard": dict(fur=1, whiskers=1, pointy_ears=1, floppy_ears=0, stripes=0, spots=1, horns=0, long_snout=0),
    "dog": dict(
        fur=0.7, whiskers=0.15, pointy_ears=0, floppy_ears=1, stripes=0, spots=0.3, horns=0, long_snout=1
    ),
    "cow": dict(
        fur=0.2, whiskers=0, pointy_ears=0, floppy_ears=0.4, stripes=0, spots=0.7, horns=1, long_snout=0.5
    ),
    "rabbit": dict(
        fur=0.8, whiskers=1, pointy_ears=0, floppy_ears=1, stripes=0, spots=0.2, horns=0, long_snout=0
    ),
}

_DEFAULT_WATERMARK_P = 0.1

# Class prior: the three pointy-eared cats 20% each, the others 40/3% each. Uniform priors would make
# "pointy ears" and "horns" tie as the best first split (both remove 1/6 of the Gini impurity), and greedy
# trees would then depend on tie-breaking; with this prior a depth-3 tree
# (pointy_ears -> stripes/spots, horns -> long_snout) is the greedy one and recovers every class.
_CLASS_PRIOR = (0.2, 0.2, 0.2, 0.4 / 3, 0.4 / 3, 0.4 / 3 + 1e-12)
_CLASS_PRIOR = tuple(np.array(_CLASS_PRIOR) / sum(_CLASS_PRIOR))

# Head palettes: (name, skin RGB, marking RGB). Markings (stripes, spots)
# always contrast strongly with the skin: dark on light heads, light on dark.
_PALETTES = (
    ("orange", (228, 138, 48), (30, 22, 18)),
    ("grey", (150, 150, 156), (38, 38, 44)),
    ("brown", (146, 98, 60), (36, 22, 12)),
    ("beige", (224, 198, 152), (62, 40, 22)),
    ("white", (242, 240, 234), (28, 28, 28)),
    ("black", (46, 43, 41), (238, 232, 220)),
)

_LETTERS = {
    "Z": [(0.22, 0.22), (0.78, 0.22), (0.22, 0.78), (0.78, 0.78)],
    "N": [(0.25, 0.8), (0.25, 0.2), (0.75, 0.8), (0.75, 0.2)],
    "M": [(0.2, 0.8), (0.2, 0.2), (0.5, 0.58), (0.8, 0.2), (0.8, 0.8)],
    "W": [(0.15, 0.2), (0.33, 0.8), (0.5, 0.42), (0.67, 0.8), (0.85, 0.2)],
    "V": [(0.2, 0.2), (0.5, 0.8), (0.8, 0.2)],
}


@dataclass(frozen=True)
class ZooSample:
    """One toy-zoo image description.

    Attributes
    ----------
    index : int
        Position of the sample in the list returned by :func:`make_samples`.
    label : str
        Class name, one of :data:`CLASSES` (possibly a noisy label).
    concepts : dict
        Concept name -> bool for every name in ``CONCEPTS + SPURIOUS``.
    params : dict
        JSON-serialisable rendering parameters (positions, sizes, colours and
        per-element seeds) for *every* concept, present or not.
    """

    index: int
    label: str
    concepts: dict
    params: dict


# --------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return seed


def _f(x: float) -> float:
    """Plain Python float, rounded for tidy JSON."""
    return round(float(x), 6)


def _rgb(c: Iterable[float]) -> list[int]:
    return [min(255, max(0, int(round(float(v))))) for v in c]


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> list[int]:
    return _rgb(np.asarray(a, float) * (1 - t) + np.asarray(b, float) * t)


def _draw_params(rng: np.random.Generator, seed: int, index: int) -> dict:
    """Draw every geometric / colour parameter of one face.

    The draw order is fixed and independent of the class and concepts, so the
    geometry of sample ``(seed, index)`` never depends on the class rules.
    """
    u = rng.uniform
    p: dict = {"seed": seed, "index": index}

    # background: pale colour, gentle linear gradient, low-frequency noise
    hue = u(0, 1)
    bg1 = colorsys.hsv_to_rgb(hue, u(0.05, 0.22), u(0.88, 0.98))
    bg1 = [c * 255 for c in bg1]
    bg2 = np.clip(np.asarray(bg1) + rng.uniform(-18, 18, 3), 170, 255)
    p["background"] = {
        "color": _rgb(bg1),
        "color2": _rgb(bg2),
        "angle": _f(u(0, 2 * math.pi)),
        "noise_amp": _f(u(2.0, 7.0)),
        "noise_seed": int(rng.integers(2**31)),
    }

    # head
    pal = int(rng.integers(len(_PALETTES)))
    name, skin, marking = _PALETTES[pal]
    skin = _rgb(np.asarray(skin) + rng.uniform(-12, 12, 3))
    dark_skin = name == "black"
    shade = _mix(skin, (255, 255, 255), 0.35) if dark_skin else _mix(skin, (0, 0, 0), 0.5)
    rx = u(0.27, 0.35)
    p["head"] = {
        "cx": _f(0.5 + u(-0.1, 0.1)),
        "cy": _f(0.55 + u(-0.07, 0.07)),
        "rx": _f(rx),
        "ry": _f(rx * u(0.85, 1.0)),
        "palette": name,
        "skin": skin,
        "shade": shade,
        "marking": _rgb(np.asarray(marking) + rng.uniform(-8, 8, 3)),
        "outline_width": _f(u(0.009, 0.014)),
    }

    p["eyes"] = {
        "dx": _f(u(0.3, 0.42)),  # x rx
        "dy": _f(u(-0.32, -0.18)),  # x ry
        "r": _f(u(0.11, 0.15)),  # x rx
        "iris": _rgb([(70, 140, 60), (60, 100, 170), (150, 110, 40), (60, 40, 30)][int(rng.integers(4))]),
        "pupil": _f(u(0.45, 0.65)),
    }
    p["nose"] = {
        "color": _rgb([(40, 30, 30), (225, 130, 140), (90, 55, 50)][int(rng.integers(3))]),
        "w": _f(u(0.1, 0.14)),  # x rx
        "face_dy": _f(u(0.18, 0.28)),  # x ry, nose position without a snout
    }
    p["mouth"] = {"w": _f(u(0.1, 0.16)), "drop": _f(u(0.08, 0.13))}

    p["fur"] = {
        "seed": int(rng.integers(2**31)),
        "n_tufts": int(rng.integers(44, 64)),
        "tuft_len": _f(u(0.07, 0.12)),  # x radius
        "n_strokes": int(rng.integers(90, 150)),
        "stroke_len": _f(u(0.025, 0.04)),  # x image size
        "stroke_width": _f(u(0.008, 0.011)),
    }
    p["whiskers"] = {
        "n_per_side": int(rng.integers(2, 4)),
        "anchor_dx": _f(u(0.14, 0.2)),  # x rx
        "anchor_dy": _f(u(0.28, 0.38)),  # x ry
        "length": _f(u(1.05, 1.3)),  # x rx
        "spread": _f(u(10, 18)),  # degrees between whiskers
        "tilt": _f(u(-6, 6)),  # degrees
        "width": _f(u(0.008, 0.011)),
        "color": [235, 235, 235] if dark_skin else [35, 35, 35],
    }
    p["pointy_ears"] = {
        "angle": _f(u(32, 45)),  # degrees from vertical
        "half_width": _f(u(17, 24)),  # degrees along the head outline
        "height": _f(u(0.5, 0.7)),  # x ry, beyond the head outline
        "inner": _rgb([(236, 160, 170), (220, 140, 150)][int(rng.integers(2))]),
    }
    p["floppy_ears"] = {
        "angle": _f(u(48, 60)),  # attach point, degrees from vertical
        "length": _f(u(1.15, 1.4)),  # x ry (full length)
        "width": _f(u(0.2, 0.26)),  # x rx (semi-axis)
        "tilt": _f(u(6, 18)),  # degrees outward
        "color": _mix(skin, marking, u(0.35, 0.55)),
    }
    n_stripes = int(rng.integers(3, 7))
    base = u(-25, 25)
    bands = []
    for k in range(n_stripes):
        bands.append(
            {
                "offset": _f(-0.78 + 1.56 * (k + 0.5) / n_stripes + u(-0.06, 0.06)),
                "angle": _f(base + u(-14, 14)),
                "thickness": _f(u(0.09, 0.16)),  # x rx
                "curve": _f(u(-0.18, 0.18)),  # x rx
            }
        )
    p["stripes"] = {"bands": bands}
    spots = []
    for _ in range(int(rng.integers(4, 8))):
        # upper two thirds of the face: the snout and floppy ears would hide spots lower down
        rad = math.sqrt(u(0, 1)) * 0.72
        th = u(math.pi * 0.95, math.pi * 2.05)
        spots.append(
            {
                "x": _f(rad * math.cos(th)),  # head-normalised coords
                "y": _f(rad * math.sin(th) * 0.9 - 0.05),
                "r": _f(u(0.15, 0.24)),  # x rx
                "rot": _f(u(0, 2 * math.pi)),
                "wobble": [_f(v) for v in rng.uniform(0.7, 1.3, 9)],
            }
        )
    p["spots"] = {"blobs": spots}
    p["horns"] = {
        "angle": _f(u(30, 40)),  # attach point, degrees from vertical
        "length": _f(u(0.7, 0.9)),  # x ry
        "base_width": _f(u(0.24, 0.3)),  # x rx
        "curl": _f(u(0.5, 0.9)),
        "color": _rgb([(238, 228, 196), (200, 194, 182), (226, 214, 170)][int(rng.integers(3))]),
    }
    p["long_snout"] = {
        "w": _f(u(0.34, 0.44)),  # x rx (semi-axis)
        "h": _f(u(0.5, 0.6)),  # x ry (semi-axis)
        "dy": _f(u(0.45, 0.55)),  # x ry (centre below head centre)
        "color": _mix(skin, (255, 240, 225), u(0.45, 0.65))
        if not dark_skin
        else _mix(skin, (200, 190, 180), u(0.55, 0.7)),
    }
    p["watermark"] = {
        "corner": int(rng.integers(4)),
        "kind": ["copyright", "logo"][int(rng.integers(2))],
        "letter": sorted(_LETTERS)[int(rng.integers(len(_LETTERS)))],
        "size": _f(u(0.17, 0.22)),
        "alpha": _f(u(0.75, 0.95)),
        "margin": _f(u(0.025, 0.05)),
    }
    return p


def make_samples(
    n: int,
    *,
    seed: int = 0,
    watermark_class: str | None = None,
    watermark_corr: float = 0.0,
    label_noise: float = 0.0,
) -> list[ZooSample]:
    """Draw ``n`` toy-zoo samples (labels, concepts and rendering parameters).

    Parameters
    ----------
    n : int
        Number of samples.
    seed : int, default 0
        Non-negative seed. Sample ``i`` is derived from ``(seed, i)`` only, so
        ``make_samples(10, seed=s)[:5] == make_samples(5, seed=s)``.
    watermark_class : str or None, default None
        If given, the spurious watermark is correlated with this class:
        ``P(watermark | class) = watermark_corr`` and
        ``P(watermark | other class) = (1 - watermark_corr) * 0.25``.
        If None, every sample has a watermark with probability 0.1.
    watermark_corr : float, default 0.0
        See ``watermark_class``; must lie in [0, 1].
    label_noise : float, default 0.0
        Probability that, after the concepts were drawn, the label is replaced
        by a uniformly chosen *other* class.

    Returns
    -------
    list of ZooSample
        Samples with ``index`` 0..n-1. The class is drawn from
        :data:`CLASSES` with the prior in the module docstring; concepts follow the class rules in the module
        docstring. Geometry in ``params`` depends only on ``(seed, i)``, not
        on the class or on the other arguments.
    """
    n = int(n)
    if n < 0:
        raise ValueError("n must be >= 0")
    seed = _check_seed(seed)
    if watermark_class is not None and watermark_class not in CLASSES:
        raise ValueError(f"unknown watermark_class {watermark_class!r}; expected one of {CLASSES}")
    if not 0.0 <= watermark_corr <= 1.0:
        raise ValueError("watermark_corr must be in [0, 1]")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError("label_noise must be in [0, 1]")

    return [_make_one(seed, i, watermark_class, watermark_corr, label_noise) for i in range(n)]


def _make_one(seed: int, i: int, watermark_class=None, watermark_corr=0.0, label_noise=0.0) -> ZooSample:
    """Sample ``i`` of ``make_samples(..., seed=seed)`` (arguments already validated)."""
    crng = np.random.default_rng([seed, i, 0])  # labels / concepts
    prng = np.random.default_rng([seed, i, 1])  # geometry
    cls = CLASSES[int(crng.choice(len(CLASSES), p=_CLASS_PRIOR))]
    draws = crng.uniform(size=len(CONCEPTS) + 2)
    concepts = {c: bool(draws[k] < _CLASS_RULES[cls][c]) for k, c in enumerate(CONCEPTS)}
    if watermark_class is None:
        p_wm = _DEFAULT_WATERMARK_P
    elif cls == watermark_class:
        p_wm = watermark_corr
    else:
        p_wm = (1.0 - watermark_corr) * 0.25
    concepts["watermark"] = bool(draws[-2] < p_wm)
    other = int(crng.integers(len(CLASSES) - 1))
    label = cls
    if draws[-1] < label_noise:
        label = [c for c in CLASSES if c != cls][other]
    return ZooSample(index=i, label=label, concepts=concepts, params=_draw_params(prng, seed, i))


# --------------------------------------------------------------------------
# rendering helpers (all coordinates are in units of the image side, then
# multiplied by the supersampled side S)
# --------------------------------------------------------------------------


def _ellipse_points(cx, cy, rx, ry, rot=0.0, n=72, radii=None):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n) if radii is None else np.asarray(radii)
    x = rx * r * np.cos(t)
    y = ry * r * np.sin(t)
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + c * a - s * b, cy + s * a + c * b) for a, b in zip(x, y, strict=True)]


def _on_head(h, deg_from_top, scale=1.0):
    """Point on the head ellipse at an angle measured clockwise from the top."""
    a = math.radians(deg_from_top)
    return (h["cx"] + scale * h["rx"] * math.sin(a), h["cy"] - scale * h["ry"] * math.cos(a))


def _scale(pts, S):
    return [(x * S, y * S) for x, y in pts]


def _width(w, S):
    return max(1, int(round(w * S)))


def _outline(draw, pts, color, width):
    pts = list(pts)
    draw.line(pts + [pts[0], pts[1]], fill=tuple(color), width=width, joint="curve")


def _background(p, S):
    b = p["background"]
    yy, xx = np.mgrid[0:S, 0:S] / max(S - 1, 1)
    a = b["angle"]
    t = (xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    c1 = np.asarray(b["color"], float)
    c2 = np.asarray(b["color2"], float)
    img = c1[None, None, :] * (1 - t[..., None]) + c2[None, None, :] * t[..., None]
    nrng = np.random.default_rng(b["noise_seed"])
    grid = nrng.standard_normal((16, 16)).astype(np.float32)
    noise = Image.fromarray(grid, mode="F").resize((S, S), Image.BILINEAR)
    img = img + b["noise_amp"] * np.asarray(noise)[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _head_mask(h, S):
    m = Image.new("L", (S, S), 0)
    ImageDraw.Draw(m).ellipse(
        [(h["cx"] - h["rx"]) * S, (h["cy"] - h["ry"]) * S, (h["cx"] + h["rx"]) * S, (h["cy"] + h["ry"]) * S],
        fill=255,
    )
    return m


def _paste_masked(img, color, shape_mask, clip=None):
    if clip is not None:
        shape_mask = ImageChops.multiply(shape_mask, clip)
    img.paste(tuple(color), (0, 0), shape_mask)


def _draw_pointy_ears(img, p, S):
    h, e = p["head"], p["pointy_ears"]
    d = ImageDraw.Draw(img)
    ow = _width(h["outline_width"], S)
    for side in (-1, 1):
        a = side * e["angle"]
        b1 = _on_head(h, a - e["half_width"], 0.92)
        b2 = _on_head(h, a + e["half_width"], 0.92)
        apex = _on_head(h, a, 1.0 + e["height"])
        tri = _scale([b1, apex, b2], S)
        d.polygon(tri, fill=tuple(h["skin"]))
        _outline(d, tri, h["shade"], ow)
        # inner ear
        mid = ((b1[0] + b2[0]) / 2, (b1[1] + b2[1]) / 2)
        inner = [(mid[0] + 0.62 * (q[0] - mid[0]), mid[1] + 0.62 * (q[1] - mid[1])) for q in (b1, apex, b2)]
        d.polygon(_scale(inner, S), fill=tuple(e["inner"]))


def _bezier(p0, p1, p2, n=24):
    t = np.linspace(0, 1, n)[:, None]
    p0, p1, p2 = (np.asarray(q, float) for q in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _draw_horns(img, p, S):
    h, e = p["head"], p["horns"]
    d = ImageDraw.Draw(img)
    L = e["length"] * h["ry"]
    bw = e["base_width"] * h["rx"]
    ow = _width(h["outline_width"], S)
    for side in (-1, 1):
        p0 = np.asarray(_on_head(h, side * e["angle"], 0.85))
        p1 = p0 + np.array([side * L * e["curl"], -L * 0.15])
        p2 = p0 + np.array([side * L * (e["curl"] + 0.15), -L * 0.95])
        c = _bezier(p0, p1, p2)
        tang = np.gradient(c, axis=0)
        tang /= np.linalg.norm(tang, axis=1, keepdims=True)
        nrm = np.stack([-tang[:, 1], tang[:, 0]], axis=1)
        w = bw * (1 - 0.88 * np.linspace(0, 1, len(c)))[:, None] / 2
        poly = np.concatenate([c + nrm * w, (c - nrm * w)[::-1]])
        pts = _scale([tuple(q) for q in poly], S)
        d.polygon(pts, fill=tuple(e["color"]))
        _outline(d, pts, (90, 80, 70), ow)


def _draw_head(img, p, S, fur):
    h = p["head"]
    d = ImageDraw.Draw(img)
    ow = _width(h["outline_width"], S)
    if fur:
        f = p["fur"]
        frng = np.random.default_rng(f["seed"])
        m = 2 * f["n_tufts"]
        radii = np.where(
            np.arange(m) % 2 == 0,
            1.0 - 0.02 * frng.uniform(0, 1, m),
            1.0 + f["tuft_len"] * frng.uniform(0.6, 1.25, m),
        )
        pts = _scale(_ellipse_points(h["cx"], h["cy"], h["rx"], h["ry"], n=m, radii=radii), S)
    else:
        pts = _scale(_ellipse_points(h["cx"], h["cy"], h["rx"], h["ry"], n=120), S)
    d.polygon(pts, fill=tuple(h["skin"]))
    _outline(d, pts, h["shade"], ow)


def _draw_fur_texture(img, p, S, clip):
    h, f = p["head"], p["fur"]
    frng = np.random.default_rng([f["seed"], 1])
    layer = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(layer)
    w = _width(f["stroke_width"], S)
    for _ in range(f["n_strokes"]):
        rad = math.sqrt(frng.uniform(0.02, 1)) * 0.95
        th = frng.uniform(0, 2 * math.pi)
        x = h["cx"] + rad * h["rx"] * math.cos(th)
        y = h["cy"] + rad * h["ry"] * math.sin(th)
        ang = th + frng.uniform(-0.5, 0.5)
        ln = f["stroke_len"] * frng.uniform(0.7, 1.3)
        # a "V"-ish tuft: two short strands from a common root
        for da in (-0.25, 0.25):
            d.line(
                [(x * S, y * S), ((x + ln * math.cos(ang + da)) * S, (y + ln * math.sin(ang + da)) * S)],
                fill=200,
                width=w,
            )
    _paste_masked(img, h["shade"], layer, clip)


def _draw_stripes(img, p, S, clip):
    h = p["head"]
    layer = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(layer)
    r = max(h["rx"], h["ry"])
    for b in p["stripes"]["bands"]:
        a = math.radians(b["angle"])
        ux, uy = math.sin(a), -math.cos(a)  # along the band
        nx, ny = math.cos(a), math.sin(a)  # across the band
        ox = h["cx"] + b["offset"] * h["rx"] * nx
        oy = h["cy"] + b["offset"] * h["rx"] * ny
        t = np.linspace(-1.3, 1.3, 30)
        bend = b["curve"] * h["rx"] * (1 - t**2)
        cx = ox + t * r * ux + bend * nx
        cy = oy + t * r * uy + bend * ny
        w = b["thickness"] * h["rx"] * (0.45 + 0.55 * np.cos(t / 1.3 * np.pi / 2)) / 2
        left = np.stack([cx + w * nx, cy + w * ny], 1)
        right = np.stack([cx - w * nx, cy - w * ny], 1)
        poly = np.concatenate([left, right[::-1]])
        d.polygon([(x * S, y * S) for x, y in poly], fill=255)
    _paste_masked(img, h["marking"], layer, clip)


def _draw_spots(img, p, S, clip):
    h = p["head"]
    layer = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(layer)
    for s in p["spots"]["blobs"]:
        cx = h["cx"] + s["x"] * h["rx"]
        cy = h["cy"] + s["y"] * h["ry"]
        r = s["r"] * h["rx"]
        wob = np.asarray(s["wobble"])
        # smooth closed radius profile through the wobble control points
        t = np.linspace(0, len(wob), 60, endpoint=False)
        k = np.floor(t).astype(int)
        fr = t - k
        fr = fr * fr * (3 - 2 * fr)
        radii = wob[k % len(wob)] * (1 - fr) + wob[(k + 1) % len(wob)] * fr
        pts = _ellipse_points(cx, cy, r, r * 0.85, rot=s["rot"], n=60, radii=radii)
        d.polygon(_scale(pts, S), fill=255)
    _paste_masked(img, h["marking"], layer, clip)


def _draw_floppy_ears(img, p, S):
    h, e = p["head"], p["floppy_ears"]
    d = ImageDraw.Draw(img)
    ow = _width(h["outline_width"], S)
    L = e["length"] * h["ry"]
    W = e["width"] * h["rx"]
    for side in (-1, 1):
        ax, ay = _on_head(h, side * e["angle"], 1.0)
        tilt = math.radians(side * e["tilt"])
        # ellipse hanging down from the attach point, tilted outward
        cx = ax + side * 0.35 * W + math.sin(tilt) * L * 0.5
        cy = ay - 0.08 * L + math.cos(tilt) * L * 0.5
        pts = _scale(_ellipse_points(cx, cy, W, L * 0.5, rot=-tilt, n=60), S)
        d.polygon(pts, fill=tuple(e["color"]))
        _outline(d, pts, h["shade"], ow)


def _nose_pos(p, snout):
    h = p["head"]
    if snout:
        s = p["long_snout"]
        return h["cx"], h["cy"] + (s["dy"] + s["h"] * 0.55) * h["ry"]
    return h["cx"], h["cy"] + p["nose"]["face_dy"] * h["ry"]


def _draw_snout(img, p, S):
    h, s = p["head"], p["long_snout"]
    d = ImageDraw.Draw(img)
    cx, cy = h["cx"], h["cy"] + s["dy"] * h["ry"]
    pts = _scale(_ellipse_points(cx, cy, s["w"] * h["rx"], s["h"] * h["ry"], n=80), S)
    d.polygon(pts, fill=tuple(s["color"]))
    _outline(d, pts, h["shade"], _width(h["outline_width"] * 0.8, S))


def _draw_eyes(img, p, S):
    h, e = p["head"], p["eyes"]
    d = ImageDraw.Draw(img)
    r = e["r"] * h["rx"]
    for side in (-1, 1):
        x = h["cx"] + side * e["dx"] * h["rx"]
        y = h["cy"] + e["dy"] * h["ry"]
        d.ellipse(
            [(x - r) * S, (y - r) * S, (x + r) * S, (y + r) * S],
            fill=(250, 250, 248),
            outline=(30, 30, 30),
            width=_width(h["outline_width"] * 0.7, S),
        )
        ri = r * 0.7
        d.ellipse([(x - ri) * S, (y - ri) * S, (x + ri) * S, (y + ri) * S], fill=tuple(e["iris"]))
        rp = ri * e["pupil"]
        d.ellipse([(x - rp) * S, (y - rp) * S, (x + rp) * S, (y + rp) * S], fill=(10, 10, 10))
        rh = r * 0.22
        hx, hy = x - r * 0.3, y - r * 0.3
        d.ellipse([(hx - rh) * S, (hy - rh) * S, (hx + rh) * S, (hy + rh) * S], fill=(255, 255, 255))


def _draw_nose_mouth(img, p, S, snout):
    h, n, m = p["head"], p["nose"], p["mouth"]
    d = ImageDraw.Draw(img)
    x, y = _nose_pos(p, snout)
    w = n["w"] * h["rx"] * (1.3 if snout else 1.0)
    tri = [(x - w, y - w * 0.55), (x + w, y - w * 0.55), (x, y + w * 0.6)]
    d.polygon(_scale(tri, S), fill=tuple(n["color"]))
    lw = _width(h["outline_width"] * 0.8, S)
    mc = (235, 235, 235) if h["palette"] == "black" and not snout else (35, 30, 30)
    mw = m["w"] * h["rx"]
    drop = m["drop"] * h["ry"]
    top = (x, y + w * 0.6)
    bottom = (x, y + w * 0.6 + drop * 0.5)
    d.line(_scale([top, bottom], S), fill=mc, width=lw)
    for side in (-1, 1):
        arc = [
            (bottom[0] + side * mw * t, bottom[1] + drop * 0.6 * math.sin(math.pi * t))
            for t in np.linspace(0, 1, 10)
        ]
        d.line(_scale(arc, S), fill=mc, width=lw, joint="curve")


def _draw_whiskers(img, p, S):
    h, e = p["head"], p["whiskers"]
    d = ImageDraw.Draw(img)
    w = _width(e["width"], S)
    L = e["length"] * h["rx"]
    k = e["n_per_side"]
    for side in (-1, 1):
        ax = h["cx"] + side * e["anchor_dx"] * h["rx"]
        ay = h["cy"] + e["anchor_dy"] * h["ry"]
        for j in range(k):
            deg = e["tilt"] + (j - (k - 1) / 2) * e["spread"]
            a = math.radians(deg)
            ex = ax + side * L * math.cos(a)
            ey = ay + L * math.sin(a)
            mx = (ax + ex) / 2
            my = (ay + ey) / 2 - 0.04 * L  # slight upward bow
            pts = [tuple(q) for q in _bezier((ax, ay), (mx, my), (ex, ey), n=12)]
            d.line(_scale(pts, S), fill=tuple(e["color"]), width=w, joint="curve")


def _draw_watermark(img, p, S):
    e = p["watermark"]
    size, m = e["size"], e["margin"]
    x0 = m if e["corner"] in (0, 3) else 1 - m - size
    y0 = m if e["corner"] in (0, 1) else 1 - m - size
    layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    box = [x0 * S, y0 * S, (x0 + size) * S, (y0 + size) * S]
    lw = _width(size * 0.12, S)
    if e["kind"] == "copyright":
        ink = (40, 40, 60, 255)
        d.ellipse(box, outline=ink, width=lw)
        inset = size * 0.28 * S
        d.arc(
            [box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset],
            start=40,
            end=320,
            fill=ink,
            width=lw,
        )
    else:
        d.rounded_rectangle(
            box,
            radius=size * 0.25 * S,
            fill=(255, 255, 255, 255),
            outline=(40, 40, 60, 255),
            width=max(1, lw // 2),
        )
        pts = [((x0 + u * size) * S, (y0 + v * size) * S) for u, v in _LETTERS[e["letter"]]]
        d.line(pts, fill=(40, 40, 60, 255), width=lw, joint="curve")
    alpha = layer.getchannel("A").point(lambda v: int(v * e["alpha"]))
    layer.putalpha(alpha)
    base = img.convert("RGBA")
    base.alpha_composite(layer)
    return base.convert("RGB")


def _supersample(image_size: int) -> int:
    return int(min(4, max(2, math.ceil(128 / image_size))))


def render(
    sample: ZooSample, *, image_size: int = 64, overrides: Mapping[str, bool] | None = None
) -> Image.Image:
    """Render a sample as an RGB image.

    Parameters
    ----------
    sample : ZooSample
        Sample from :func:`make_samples`.
    image_size : int, default 64
        Side of the square output image in pixels (>= 8). The face is drawn
        at 2-4x this size and downsampled with Lanczos filtering.
    overrides : dict, optional
        ``{concept: bool}`` forcing concepts on or off (any name in
        ``CONCEPTS + SPURIOUS``). Everything else (position, colours, the
        geometry of other concepts) stays identical, so toggling a concept
        only changes the pixels where that concept is drawn. Overrides may
        create combinations the class rules never produce (e.g. pointy *and*
        floppy ears); both are then drawn. Turning ``long_snout`` on or off
        also moves the nose and mouth to the snout tip / the face.

    Returns
    -------
    PIL.Image.Image
        RGB image of size ``(image_size, image_size)``. Rendering is
        deterministic: the same sample and arguments give identical pixels.
    """
    image_size = int(image_size)
    if image_size < 8:
        raise ValueError("image_size must be >= 8")
    c = dict(sample.concepts)
    if overrides:
        unknown = set(overrides) - set(ALL_CONCEPTS)
        if unknown:
            raise KeyError(f"unknown concept(s) in overrides: {sorted(unknown)}")
        c.update({k: bool(v) for k, v in overrides.items()})
    p = sample.params
    S = image_size * _supersample(image_size)

    img = _background(p, S)
    if c.get("horns"):
        _draw_horns(img, p, S)
    if c.get("pointy_ears"):
        _draw_pointy_ears(img, p, S)
    _draw_head(img, p, S, bool(c.get("fur")))
    clip = _head_mask(p["head"], S)
    if c.get("stripes"):
        _draw_stripes(img, p, S, clip)
    if c.get("fur"):
        _draw_fur_texture(img, p, S, clip)
    if c.get("spots"):  # on top of the fur, so fur never hides them
        _draw_spots(img, p, S, clip)
    if c.get("floppy_ears"):
        _draw_floppy_ears(img, p, S)
    if c.get("long_snout"):
        _draw_snout(img, p, S)
    _draw_eyes(img, p, S)
    _draw_nose_mouth(img, p, S, bool(c.get("long_snout")))
    if c.get("whiskers"):
        _draw_whiskers(img, p, S)
    if c.get("watermark"):
        img = _draw_watermark(img, p, S)
    return img.resize((image_size, image_size), Image.LANCZOS)


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------


def _atomic_save_png(img: Image.Image, path: pathlib.Path) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _atomic_write_csv(df: pd.DataFrame, path: pathlib.Path) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def write_image_folder(samples: Sequence[ZooSample], out_dir, *, image_size: int = 64) -> pd.DataFrame:
    """Render samples into an ImageFolder-style tree.

    Parameters
    ----------
    samples : sequence of ZooSample
        Samples to render.
    out_dir : str or os.PathLike
        Root folder (created if needed). Images go to
        ``out_dir/<label>/<label>_<index:05d>.png``.
    image_size : int, default 64
        Image side in pixels.

    Returns
    -------
    pandas.DataFrame
        One row per sample with columns ``path`` (POSIX path relative to
        ``out_dir``), ``label``, then one 0/1 ``int`` column per name in
        ``CONCEPTS + SPURIOUS``.
    """
    root = pathlib.Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in samples:
        rel = pathlib.PurePosixPath(s.label) / f"{s.label}_{s.index:05d}.png"
        (root / s.label).mkdir(exist_ok=True)
        _atomic_save_png(render(s, image_size=image_size), root / rel)
        row = {"path": str(rel), "label": s.label}
        row.update({c: int(bool(s.concepts[c])) for c in ALL_CONCEPTS})
        rows.append(row)
    df = pd.DataFrame(rows, columns=["path", "label", *ALL_CONCEPTS])
    for c in ALL_CONCEPTS:
        df[c] = df[c].astype(int)
    return df


def write_table(
    samples: Sequence[ZooSample], out_dir, *, image_size: int = 64, name: str = "images.csv"
) -> pathlib.Path:
    """Render samples and write a CSV table describing them.

    Parameters
    ----------
    samples : sequence of ZooSample
        Samples to render.
    out_dir : str or os.PathLike
        Root folder; images use the :func:`write_image_folder` layout.
    image_size : int, default 64
        Image side in pixels.
    name : str, default "images.csv"
        File name of the CSV inside ``out_dir``.

    Returns
    -------
    pathlib.Path
        Path of the CSV, with columns ``path`` (relative to ``out_dir``),
        ``label`` and 0/1 concept columns. The CSV is written to a temporary
        file in ``out_dir`` and moved into place with :func:`os.replace`, so
        an interrupted run never leaves a partial CSV.
    """
    root = pathlib.Path(out_dir)
    df = write_image_folder(samples, root, image_size=image_size)
    path = root / name
    _atomic_write_csv(df, path)
    return path


def write_concept_folders(
    out_dir,
    *,
    n_per_concept: int = 60,
    n_random: int = 120,
    seed: int = 0,
    image_size: int = 64,
    concepts: Sequence[str] = CONCEPTS,
    random_from: str = "negatives",
) -> pathlib.Path:
    """Write a TCAV-style concept dataset.

    The ground-truth concepts of every image written go to ``out_dir/truth.csv`` (``path`` relative to
    ``out_dir``, ``label``, 0/1 concept columns), so probes learned from the folders can be checked.

    Layout: ``out_dir/<concept>/<concept>_<j:05d>.png`` holds
    ``n_per_concept`` positive examples of each concept, and
    ``out_dir/random/random_<j:05d>.png`` holds ``n_random`` random images.

    Positives are zoo faces of any class drawn from the population
    distribution (:func:`make_samples`) and kept when they show the concept,
    so the other concepts co-vary as they do in the zoo.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Root folder (created if needed).
    n_per_concept : int, default 60
        Positive images per concept.
    n_random : int, default 120
        Images in ``random/``.
    seed : int, default 0
        Non-negative seed; output is deterministic given all arguments.
    image_size : int, default 64
        Image side in pixels.
    concepts : sequence of str, default CONCEPTS
        Concepts to write folders for (names from ``CONCEPTS + SPURIOUS``).
    random_from : {"negatives", "all"}, default "negatives"
        ``"all"``: random images are plain population draws (any concept can
        appear, at its population rate). ``"negatives"``: random images are
        population faces on which every listed concept is switched off except
        at most one: a uniformly chosen member of ``[None, *concepts]`` keeps
        its drawn value. Background, head, eyes, nose and mouth still vary
        freely, and each listed concept appears in at most about
        ``1 / (len(concepts) + 1)`` of the random images.

    Returns
    -------
    pathlib.Path
        ``out_dir``.
    """
    concepts = tuple(concepts)
    unknown = [c for c in concepts if c not in ALL_CONCEPTS]
    if unknown:
        raise ValueError(f"unknown concept(s): {unknown}")
    if "random" in concepts:
        raise ValueError("'random' is reserved for the random folder")
    if random_from not in ("negatives", "all"):
        raise ValueError("random_from must be 'negatives' or 'all'")
    seed = _check_seed(seed)
    root = pathlib.Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    base = np.random.SeedSequence(seed)

    def pool(stream: int):
        """Endless population samples for one stream."""
        s = int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])
        i = 0
        while True:
            yield _make_one(s, i)
            i += 1

    truth = []

    def record(rel: str, s: ZooSample, overrides=None):
        shown = {**s.concepts, **(overrides or {})}
        truth.append({"path": rel, "label": s.label, **{c: int(shown[c]) for c in ALL_CONCEPTS}})

    for k, c in enumerate(concepts):
        folder = root / c
        folder.mkdir(exist_ok=True)
        j = 0
        for s in pool(k + 1):
            if j >= n_per_concept:
                break
            if s.concepts[c]:
                _atomic_save_png(render(s, image_size=image_size), folder / f"{c}_{j:05d}.png")
                record(f"{c}/{c}_{j:05d}.png", s)
                j += 1

    folder = root / "random"
    folder.mkdir(exist_ok=True)
    rrng = np.random.default_rng(base.spawn(1)[0])
    gen = pool(0)
    for j in range(n_random):
        s = next(gen)
        overrides = None
        if random_from == "negatives":
            keep = int(rrng.integers(len(concepts) + 1)) - 1  # -1: keep none
            overrides = {c: False for i, c in enumerate(concepts) if i != keep}
        _atomic_save_png(
            render(s, image_size=image_size, overrides=overrides), folder / f"random_{j:05d}.png"
        )
        record(f"random/random_{j:05d}.png", s, overrides)
    # ground truth of every image written (a table beside the folders; TCAV loaders only read sub-folders)
    _atomic_write_csv(pd.DataFrame(truth), root / "truth.csv")
    return root
