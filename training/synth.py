"""Synthetic titanium-gasket inspection images with scratches, and VOC datasets of them.

The paper's images (2448x2048, PASCAL VOC) are private; this module renders look-alikes
procedurally, with numpy and Pillow only, deterministically from a seed.

What an image holds
-------------------
- A machined ring (annulus, sometimes with bolt holes) on a dark fixture, slightly off-centre and
  of slightly varying size. The metal has concentric lathe marks (a random radial profile with a
  fine ripple), anisotropic grain (noise streaked along the turning direction), bevels at the
  edges lit from one side, the "bow-tie" specular lobe of a turned surface, slow illumination
  drift, and signal-dependent sensor noise.
- Scratches (class ``scratch``), on defective images only: thin straight or curved (quadratic
  Bezier) strokes, 1-6 px wide, 30 px to ~1400 px long at 2448x2048, bright or dark, strong to
  faint (5-16 times the local clutter: texture detail and sensor noise), with intermittent
  strength and tapered ends. They are rasterised here (distance to a polyline, anti-aliased),
  clipped to the metal, so every scratch pixel is known: its box is the bounding box of the
  pixels it changes by at least one unit of that clutter, so a box never claims an invisible
  tail. Scratches whose visible part is too short are re-drawn.
- Sizes. The part, its texture and every length scale with the image; stroke and speck *widths*
  stay in output pixels (1-6 px at any size). A smaller image is a faster stand-in for the
  camera's, in which a scratch looks to a detector as it would at full resolution; scaled, most
  scratches would be sub-pixel at 612x512 (version 1 did that, with a 1 px floor). A scratch
  stays a stroke at every size: at 2448x2048 the shortest (30 px) is five times the widest
  (6 px), and smaller images keep that ratio as a floor on the length (version 2 scaled the
  length alone, so at 612x512 a 6 px wide scratch could be 8 px long: a dot like a dust speck).
  The shortest scratch (30 px) and the shortest tool mark (25 px) keep their camera lengths at
  every size, as widths and dust specks do; the longest scale with the part. (Version 3 scaled
  the floor too: at 612x512 a scratch could be 10 px long beside dust specks of up to 7 px, a
  ratio the camera's images never show; 9% of its test scratches were under 20 px.)
- Look-alikes that are *not* scratches, on every image: dust specks, soft stains, and short low-
  contrast tool marks that follow the lathe direction (concentric arcs). A gate has to learn the
  difference, not just "anything on the metal".

Colour. Industrial cameras for this are usually monochrome; the images are saved as 3-channel
RGB JPEG (quality 90-95, chosen per image) so any VOC tool and any ImageNet-style model reads them.
The three channels are the same mono rendering times a slight per-image white-balance tint (a
warm titanium grey), so they differ by a few grey levels at most.

Determinism. Image ``index`` of stream ``stream`` under ``seed`` is drawn from
``numpy.random.SeedSequence([seed, stream, index])``: it does not depend on which process renders
it or in what order, so parallel generation writes the same bytes as serial generation.
`generate_dataset` uses stream 0 for train/val and stream 1 for the held-out test split.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from splitdet.shared.atomic_file import replacing
from splitdet.training import voc

__all__ = [
    "CLASS_NAME",
    "FULL_SIZE",
    "GENERATOR_VERSION",
    "DatasetSummary",
    "StrokeMask",
    "SynthImage",
    "SyntheticDatasetExists",
    "generate_dataset",
    "generate_image",
    "parse_size",
    "save_jpeg",
]

#: The one object class the generator annotates.
CLASS_NAME = "scratch"
#: The paper's camera resolution, (width, height).
FULL_SIZE: tuple[int, int] = (2448, 2048)
#: Bumped whenever the rendering changes, so a dataset records which images it holds.
GENERATOR_VERSION = 4
#: Streams of per-image seeds: train/val and the held-out test split never share an image.
STREAM_TRAINVAL = 0
STREAM_TEST = 1
#: Scratch contrast in units of the local clutter (texture detail and sensor noise, in grey
#: levels, see `_clutter_levels`): log-uniform from faint to strong.
_CONTRAST_RANGE = (5.0, 16.0)
#: A scratch pixel is one the scratch changes by at least this many clutter units: fainter
#: parts (tapered ends, dips) are drawn but not labelled, so no box claims an invisible stroke.
_VISIBLE_CLUTTER = 1.0
#: Sensor noise assumed when judging visibility, grey levels (the drawn noise is 1.4-2.2).
_NOISE_LEVELS = 2.0
_F32 = np.float32


@dataclass(frozen=True)
class StrokeMask:
    """The coverage of one scratch: ``alpha`` (float32, in (0, 1]) over the window whose top-left
    pixel is ``(x0, y0)``. Pixels outside the window, and zeros inside it, are not the scratch.
    The window is exactly the scratch's box: ``box == (x0, y0, x0 + w, y0 + h)``."""

    x0: int
    y0: int
    alpha: np.ndarray

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The scratch's box ``(x1, y1, x2, y2)``, image px: its window."""
        h, w = self.alpha.shape
        return (float(self.x0), float(self.y0), float(self.x0 + w), float(self.y0 + h))

    def full(self, height: int, width: int) -> np.ndarray:
        """The mask as a boolean ``(height, width)`` array."""
        out = np.zeros((height, width), dtype=bool)
        h, w = self.alpha.shape
        out[self.y0 : self.y0 + h, self.x0 : self.x0 + w] = self.alpha > 0
        return out


@dataclass
class SynthImage:
    """One rendered image and its ground truth.

    ``image``: uint8 ``(H, W, 3)``. ``boxes``: float32 ``(N, 4)`` scratch boxes ``[x1, y1, x2, y2]``
    in 0-based continuous pixel coordinates (pixel ``i`` spans ``[i, i+1)``), empty for a
    defect-free image. ``masks``: one `StrokeMask` per box. ``lookalikes``: ``(kind, box)`` of each
    non-scratch distractor drawn (dust, stain, toolmark), for inspection and tests only.
    ``jpeg_quality``: the quality this image is saved with.
    """

    image: np.ndarray
    boxes: np.ndarray
    masks: list[StrokeMask]
    lookalikes: list[tuple[str, tuple[float, float, float, float]]] = field(default_factory=list)
    jpeg_quality: int = 92

    @property
    def labels(self) -> list[str]:
        """The class name of each box (every box is a scratch)."""
        return [CLASS_NAME] * len(self.boxes)


def parse_size(text: str) -> tuple[int, int]:
    """``"2448x2048"`` -> ``(2448, 2048)`` (width, height); raises ValueError."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2:
        raise ValueError(f"size must be WIDTHxHEIGHT, e.g. 2448x2048, got {text!r}")
    try:
        w, h = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"size must be WIDTHxHEIGHT in integers, got {text!r}") from None
    _check_size((w, h))
    return w, h


def _check_size(size: tuple[int, int]) -> None:
    w, h = size
    if not (256 <= w <= 16384 and 256 <= h <= 16384):
        raise ValueError(f"image size must be between 256 and 16384 px per side, got {w}x{h}")


# ------------------------------------------------------------------------------------ helpers


def _rngs(seed: int, stream: int, index: int) -> list[np.random.Generator]:
    """Independent generators for the part, the look-alikes, the scratches and the noise.

    Separate streams make an image's defective and defect-free renderings identical except
    for the scratch pixels (the tests rely on it)."""
    children = np.random.SeedSequence([seed, stream, index]).spawn(4)
    return [np.random.Generator(np.random.PCG64(c)) for c in children]


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], size: tuple[int, int]
) -> np.ndarray:
    """Low-frequency noise: a small random grid, bicubically upsampled to ``size`` (w, h)."""
    grid = rng.standard_normal(shape).astype(_F32)
    return np.asarray(Image.fromarray(grid, mode="F").resize(size, Image.BICUBIC), dtype=_F32)


def _circular_box_blur(a: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Box filter of width ``k`` along ``axis`` with wrap-around (for the angular axis)."""
    if k <= 1:
        return a
    n = a.shape[axis]
    pad = np.concatenate([np.take(a, range(n - k, n), axis=axis), a], axis=axis)
    c = np.cumsum(pad, axis=axis, dtype=np.float64)
    hi = np.take(c, range(k, n + k), axis=axis)
    lo = np.take(c, range(0, n), axis=axis)
    return ((hi - lo) / k).astype(_F32)


def _blur1d(a: np.ndarray, k: int) -> np.ndarray:
    if k <= 1:
        return a
    kernel = np.ones(k, dtype=np.float64) / k
    return np.convolve(a, kernel, mode="same").astype(_F32)


def _lerp(lut: np.ndarray, idx: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """``lut`` linearly interpolated at ``idx + frac`` (``idx <= len(lut) - 2``)."""
    lo = lut[idx]
    lo += frac * (lut[idx + 1] - lo)
    return lo


@dataclass
class _Part:
    cx: float
    cy: float
    r_in: float
    r_out: float
    holes: list[tuple[float, float, float]]  # (x, y, radius)

    def on_metal(self, x: np.ndarray, y: np.ndarray, margin: float) -> np.ndarray:
        r = np.hypot(x - self.cx, y - self.cy)
        ok = (r >= self.r_in + margin) & (r <= self.r_out - margin)
        for hx, hy, hr in self.holes:
            ok &= np.hypot(x - hx, y - hy) >= hr + margin
        return ok


# ---------------------------------------------------------------------------- the part itself


def _render_part(
    rng: np.random.Generator, size: tuple[int, int], s: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int, int], _Part, np.ndarray]:
    """Render the defect-free scene. Returns (gain image, reflectance, coverage, window, part,
    background) where the final grey image is ``bg*(1-cov) + cov*gain*refl`` inside the window."""
    width, height = size
    short = min(width, height)
    r_out = 0.445 * short * rng.uniform(0.93, 1.03)
    r_in = r_out * rng.uniform(0.52, 0.66)
    cx = width / 2 + rng.uniform(-0.04, 0.04) * short
    cy = height / 2 + rng.uniform(-0.04, 0.04) * short
    r_out = min(r_out, cx - 2, width - cx - 2, cy - 2, height - cy - 2)

    n_holes = int(rng.choice([0, 0, 0, 4, 6, 8]))
    holes: list[tuple[float, float, float]] = []
    if n_holes:
        band = r_out - r_in
        hr = band * rng.uniform(0.12, 0.2)
        rm = (r_in + r_out) / 2
        phase = rng.uniform(0, 2 * math.pi)
        for k in range(n_holes):
            a = phase + 2 * math.pi * k / n_holes
            holes.append((cx + rm * math.cos(a), cy + rm * math.sin(a), hr))
    part = _Part(cx, cy, r_in, r_out, holes)

    # Window: the part's bounding box (texture work happens only there).
    x0, x1 = max(int(cx - r_out) - 2, 0), min(int(cx + r_out) + 3, width)
    y0, y1 = max(int(cy - r_out) - 2, 0), min(int(cy + r_out) + 3, height)
    xs = (np.arange(x0, x1, dtype=_F32) + _F32(0.5 - cx))[None, :]
    ys = (np.arange(y0, y1, dtype=_F32) + _F32(0.5 - cy))[:, None]
    r = np.sqrt(xs * xs + ys * ys)

    # Coverage: anti-aliased annulus minus holes.
    cov = np.clip(r - _F32(r_in - 0.5), 0, 1) * np.clip(_F32(r_out + 0.5) - r, 0, 1)

    # Radial profile (lathe marks + bevels), sampled at 4 per pixel and looked up by radius.
    per_px = 4
    n = int((r_out + 3) * per_px)
    rr = np.arange(n, dtype=np.float64) / per_px
    prof = np.zeros(n, dtype=np.float64)
    p1 = max(rng.uniform(3.0, 6.0) * s, 2.3)  # fine ripple period, px
    p2 = max(rng.uniform(9.0, 22.0) * s, 4.0)
    prof += rng.uniform(0.012, 0.03) * np.sin(2 * math.pi * rr / p1 + rng.uniform(0, 6.3))
    prof += rng.uniform(0.005, 0.015) * np.sin(2 * math.pi * rr / p2 + rng.uniform(0, 6.3))
    # Random groove depths: noise along r, smoothed to ~1 px, with rougher and smoother bands.
    rough = 0.6 + 0.8 * _blur1d(rng.random(n), max(int(60 * s * per_px), 3)) ** 2
    prof += 0.022 * rough * _blur1d(rng.standard_normal(n), max(int(0.8 * per_px), 2))
    prof += 0.03 * _blur1d(rng.standard_normal(n), max(int(40 * s * per_px), 3)) * 4
    # Bevels: a bright chamfer at the outer edge, a darker one at the inner edge.
    bev = max(7.0 * s, 1.5)
    outer = np.exp(-((((r_out - bev * 0.8) - rr) / (bev * 0.6)) ** 2))
    inner = np.exp(-(((rr - (r_in + bev * 0.7)) / (bev * 0.6)) ** 2))
    bevel = (rng.uniform(0.15, 0.35) * outer - rng.uniform(0.1, 0.25) * inner).astype(_F32)
    # Linear interpolation in r: a nearest lookup quantises r, and since every column shares
    # the same fractional x offset, the steps line up into visible seams near the axes.
    r_lut = np.minimum(r, _F32(r_out + 1.5))  # outside the part the texture is not seen
    pos = r_lut * _F32(per_px)
    idx = np.minimum(pos.astype(np.int32), n - 2)
    pos -= idx  # now the fraction
    base = rng.uniform(0.52, 0.62)
    refl = _lerp(prof.astype(_F32) + _F32(base), idx, pos)

    # Anisotropic grain: noise on a polar grid, smoothed along the angle, looked up by (r, theta).
    n_t = 2048
    n_r = int(r_out) + 3
    grain = rng.standard_normal((n_r, n_t)).astype(_F32)
    grain = _circular_box_blur(grain, int(rng.integers(8, 24)), axis=1)
    grain = _circular_box_blur(grain, int(rng.integers(8, 24)), axis=1)
    # Bilinear lookup (nearest-bin lookups leave seams along radii and around the axes).
    grain = np.concatenate([grain, grain[:, :1]], axis=1).ravel()
    tf = (np.arctan2(ys, xs) + _F32(math.pi)) * _F32(n_t / (2 * math.pi))
    ti = np.minimum(tf.astype(np.int32), n_t - 1)
    tf -= ti
    rf = r_lut
    ri = np.minimum(rf.astype(np.int32), n_r - 2)
    rf -= ri
    flat = ri * (n_t + 1) + ti
    del ri, ti
    g0 = grain[flat]
    g0 += tf * (grain[flat + 1] - g0)
    flat += n_t + 1
    g1 = grain[flat]
    g1 += tf * (grain[flat + 1] - g1)
    g0 += rf * (g1 - g0)
    refl += _F32(rng.uniform(0.05, 0.09)) * g0
    del tf, rf, flat, g0, g1

    # Bevel lit from one side.
    light = rng.uniform(0, 2 * math.pi)
    cos_l = (xs * _F32(math.cos(light)) + ys * _F32(math.sin(light))) / np.maximum(r, 1)
    refl += _lerp(bevel, idx, pos) * (_F32(0.55) + _F32(0.45) * cos_l)

    # Specular "bow tie" of a turned surface: bright along one diameter direction.
    phi = rng.uniform(0, math.pi)
    r2 = np.maximum(r * r, 1)
    cos2 = (xs * xs - ys * ys) * _F32(math.cos(2 * phi)) + (2 * xs * ys) * _F32(math.sin(2 * phi))
    cos2 /= r2
    k = rng.uniform(2.0, 6.0)
    spec = np.exp(_F32(k) * (cos2 - 1)) * _F32(rng.uniform(0.12, 0.4))
    refl += spec

    for hx, hy, hr in holes:
        hx0, hx1 = max(int(hx - hr) - 4, x0), min(int(hx + hr) + 5, x1)
        hy0, hy1 = max(int(hy - hr) - 4, y0), min(int(hy + hr) + 5, y1)
        d = np.hypot(
            (np.arange(hx0, hx1, dtype=_F32) + _F32(0.5 - hx))[None, :],
            (np.arange(hy0, hy1, dtype=_F32) + _F32(0.5 - hy))[:, None],
        )
        sl = np.s_[hy0 - y0 : hy1 - y0, hx0 - x0 : hx1 - x0]
        cov[sl] *= np.clip(d - _F32(hr - 0.5), 0, 1)
        refl[sl] -= _F32(0.18) * np.exp(-(((d - _F32(hr + bev * 0.5)) / _F32(bev * 0.6)) ** 2))

    # Illumination: gain in grey levels, slow drift across the part, a linear gradient.
    gx, gy = rng.uniform(-0.12, 0.12, size=2)
    drift = _smooth_noise(rng, (4, 5), (width, height))
    gain_full = _F32(rng.uniform(175, 215)) * (1 + _F32(0.06) * drift)
    gain_full *= (
        1
        + _F32(gx) * (np.arange(width, dtype=_F32) / _F32(width) - _F32(0.5))[None, :]
        + _F32(gy) * (np.arange(height, dtype=_F32) / _F32(height) - _F32(0.5))[:, None]
    )

    # Background: a dark fixture with slow variation and the part's soft shadow.
    bg = _F32(rng.uniform(14, 30)) + _F32(4.0) * _smooth_noise(rng, (3, 4), (width, height))
    bg_xs = (np.arange(width, dtype=_F32) + _F32(0.5 - cx))[None, :]
    bg_ys = (np.arange(height, dtype=_F32) + _F32(0.5 - cy))[:, None]
    r_full = np.sqrt(bg_xs * bg_xs + bg_ys * bg_ys)
    gap = np.maximum(np.maximum(r_full - _F32(r_out), _F32(r_in) - r_full), 0)
    shadow = np.exp(-gap / _F32(max(25 * s, 3)))
    bg *= 1 - _F32(0.5) * shadow
    window = (x0, y0, x1, y1)
    return gain_full, refl, cov, window, part, bg


# --------------------------------------------------------------------------------- scratches


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


#: The shortest scratch's centre line, output px at any size (the camera's shortest, 2448x2048):
#: five times the widest scratch (6 px), so every scratch is a stroke, never a dot.
_MIN_SCRATCH_LENGTH = 30.0
#: The shortest tool mark's arc, output px at any size (the camera's shortest, 2448x2048).
_MIN_TOOLMARK_LENGTH = 25.0


def _scratch_path(
    rng: np.random.Generator, part: _Part, s: float, width_px: float
) -> np.ndarray | None:
    """A scratch centre-line as dense points (~1 px apart), trimmed to its run on the metal."""
    max_len = max(1400.0 * s, 2 * _MIN_SCRATCH_LENGTH)
    length = math.exp(rng.uniform(math.log(_MIN_SCRATCH_LENGTH), math.log(max_len)))
    # Centre: uniform over the annulus area, away from holes.
    for _ in range(50):
        rad = math.sqrt(rng.uniform(part.r_in**2, part.r_out**2))
        ang = rng.uniform(0, 2 * math.pi)
        c = np.array([part.cx + rad * math.cos(ang), part.cy + rad * math.sin(ang)])
        if part.on_metal(c[:1], c[1:], width_px + 2)[0]:
            break
    direction = rng.uniform(0, math.pi)
    u = np.array([math.cos(direction), math.sin(direction)])
    p0, p2 = c - u * length / 2, c + u * length / 2
    if rng.random() < 0.5:  # straight
        p1 = (p0 + p2) / 2
    else:  # curved: bend the middle sideways
        normal = np.array([-u[1], u[0]])
        p1 = (p0 + p2) / 2 + normal * length * rng.uniform(-0.3, 0.3)
    n = max(int(length * 1.2), 8)
    pts = _bezier(p0, p1, p2, n)
    ok = part.on_metal(pts[:, 0], pts[:, 1], width_px / 2 + 1.5)
    mid = n // 2
    if not ok[mid]:
        return None
    lo = mid
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    hi = mid
    while hi < n - 1 and ok[hi + 1]:
        hi += 1
    pts = pts[lo : hi + 1]
    seg = np.hypot(*np.diff(pts, axis=0).T)
    if seg.sum() < _MIN_SCRATCH_LENGTH:
        return None
    return pts


def _rasterise_stroke(
    pts: np.ndarray, half_width: float, rng: np.random.Generator, shape: tuple[int, int]
) -> tuple[int, int, np.ndarray] | None:
    """Anti-aliased coverage of a polyline stroke with intermittent strength and tapered ends.

    Returns ``(x0, y0, alpha)`` for the window holding the stroke, or None if off-image."""
    height, width = shape
    seg_len = np.hypot(*np.diff(pts, axis=0).T)
    arc = np.concatenate([[0.0], np.cumsum(seg_len)])
    total = float(arc[-1])
    # Decimate to segments of <= ~12 px (curvature error << 0.1 px for these bends).
    keep = np.unique([*np.searchsorted(arc, np.arange(0.0, total, 12.0)).tolist(), len(pts) - 1])
    verts, varc = pts[keep], arc[keep]

    # Strength along the length: knots every ~40 px, some dips, tapered ends.
    n_knots = max(int(total / 40.0), 2) + 1
    ks = np.linspace(0.0, total, n_knots)
    kv = rng.uniform(0.55, 1.0, n_knots)
    dips = rng.random(n_knots) < 0.15
    kv[dips] *= rng.uniform(0.1, 0.5, int(dips.sum()))
    taper = min(0.2 * total, 25.0)
    ramp = np.clip(np.minimum(ks, total - ks) / max(taper, 1e-6), 0.0, 1.0)
    kv = kv * (0.25 + 0.75 * ramp)

    pad = half_width + 2.0
    bx0 = max(math.floor(verts[:, 0].min() - pad), 0)
    by0 = max(math.floor(verts[:, 1].min() - pad), 0)
    bx1 = min(math.ceil(verts[:, 0].max() + pad) + 1, width)
    by1 = min(math.ceil(verts[:, 1].max() + pad) + 1, height)
    if bx1 <= bx0 or by1 <= by0:
        return None
    alpha = np.zeros((by1 - by0, bx1 - bx0), dtype=_F32)
    for a, b, sa, sb in zip(verts[:-1], verts[1:], varc[:-1], varc[1:], strict=True):
        sx0 = max(math.floor(min(a[0], b[0]) - pad), bx0)
        sy0 = max(math.floor(min(a[1], b[1]) - pad), by0)
        sx1 = min(math.ceil(max(a[0], b[0]) + pad) + 1, bx1)
        sy1 = min(math.ceil(max(a[1], b[1]) + pad) + 1, by1)
        if sx1 <= sx0 or sy1 <= sy0:
            continue
        px = (np.arange(sx0, sx1, dtype=_F32) + _F32(0.5 - a[0]))[None, :]
        py = (np.arange(sy0, sy1, dtype=_F32) + _F32(0.5 - a[1]))[:, None]
        dx, dy = float(b[0] - a[0]), float(b[1] - a[1])
        ll = dx * dx + dy * dy
        t = np.clip((px * _F32(dx) + py * _F32(dy)) * _F32(1.0 / max(ll, 1e-9)), 0, 1)
        ex = px - t * _F32(dx)
        ey = py - t * _F32(dy)
        d = np.sqrt(ex * ex + ey * ey)
        strength = np.interp(sa + t * (sb - sa), ks, kv).astype(_F32)
        hw = _F32(half_width) * (_F32(0.6) + _F32(0.4) * strength)
        cov = np.clip(hw + _F32(0.5) - d, 0, 1) * strength
        win = alpha[sy0 - by0 : sy1 - by0, sx0 - bx0 : sx1 - bx0]
        np.maximum(win, cov, out=win)
    return bx0, by0, alpha


def _clutter_levels(refl: np.ndarray, alpha: np.ndarray, gain_level: float) -> float:
    """The clutter a scratch must stand out from, in grey levels: the RMS of the reflectance's
    pixel-to-pixel detail (lathe marks, grain, look-alikes) where the stroke lies, times the
    illumination gain, combined with sensor noise. ``refl`` and ``alpha``: the stroke's window."""
    on = alpha[:, :-1] > 0
    detail = np.diff(refl, axis=1)[on]
    on = alpha[:-1, :] > 0
    detail = np.concatenate([detail, np.diff(refl, axis=0)[on]])
    texture = float(np.sqrt(np.mean(detail.astype(np.float64) ** 2) / 2)) if detail.size else 0.0
    return math.hypot(texture * gain_level, _NOISE_LEVELS)


def _add_scratches(
    rng: np.random.Generator,
    part: _Part,
    s: float,
    refl: np.ndarray,
    cov: np.ndarray,
    window: tuple[int, int, int, int],
    gain_level: float,
) -> list[StrokeMask]:
    x0w, y0w, x1w, y1w = window
    shape = (y1w - y0w, x1w - x0w)
    n_target = int(rng.choice([1, 1, 1, 2, 2, 3, 4, 5, 6]))
    masks: list[StrokeMask] = []
    attempts = 0
    # A defective image always gets at least one scratch (tiny images may need more tries).
    while (len(masks) < n_target and attempts < 20 * n_target) or (not masks and attempts < 400):
        attempts += 1
        width_px = rng.uniform(1.0, 6.0)  # output px at any size (module docstring)
        if rng.random() < 0.6:  # thin scratches are the common ones
            width_px = rng.uniform(1.0, 2.5)
        pts = _scratch_path(rng, part, s, width_px)
        if pts is None:
            continue
        local = pts - np.array([x0w, y0w])
        ras = _rasterise_stroke(local, width_px / 2, rng, shape)
        if ras is None:
            continue
        bx, by, alpha = ras
        h, w = alpha.shape
        alpha *= cov[by : by + h, bx : bx + w]
        # Contrast against what surrounds the stroke, so "faint" means faint on this texture.
        clutter = _clutter_levels(refl[by : by + h, bx : bx + w], alpha, gain_level)
        contrast = math.exp(rng.uniform(*np.log(_CONTRAST_RANGE))) * clutter  # grey levels
        amp = contrast / gain_level  # reflectance units
        sign = 1.0 if rng.random() < 0.55 else -1.0
        alpha[alpha * contrast < _VISIBLE_CLUTTER * clutter] = 0
        nz_rows = np.flatnonzero(alpha.any(axis=1))
        nz_cols = np.flatnonzero(alpha.any(axis=0))
        if len(nz_rows) == 0:
            continue
        ry0, ry1 = int(nz_rows[0]), int(nz_rows[-1]) + 1
        rx0, rx1 = int(nz_cols[0]), int(nz_cols[-1]) + 1
        if max(ry1 - ry0, rx1 - rx0) < _MIN_SCRATCH_LENGTH * 2 / 3 or (alpha >= 0.5).sum() < 8:
            continue  # the visible part (< 20 px) is too small to be a meaningful scratch
        alpha = np.ascontiguousarray(alpha[ry0:ry1, rx0:rx1])
        refl[by + ry0 : by + ry1, bx + rx0 : bx + rx1] += _F32(sign * amp) * alpha
        masks.append(StrokeMask(x0=x0w + bx + rx0, y0=y0w + by + ry0, alpha=alpha))
    return masks


# ------------------------------------------------------------------------------- look-alikes


def _blob(
    refl: np.ndarray,
    window: tuple[int, int, int, int],
    cx: float,
    cy: float,
    radius: float,
    amp: float,
    sharp: bool,
) -> tuple[float, float, float, float] | None:
    """Add a round spot; returns its box in image coordinates (or None if off the window)."""
    x0w, y0w, x1w, y1w = window
    ext = radius * (1.5 if sharp else 2.5) + 1
    bx0, bx1 = max(int(cx - ext), x0w), min(int(cx + ext) + 1, x1w)
    by0, by1 = max(int(cy - ext), y0w), min(int(cy + ext) + 1, y1w)
    if bx1 <= bx0 or by1 <= by0:
        return None
    px = (np.arange(bx0, bx1, dtype=_F32) + _F32(0.5 - cx))[None, :]
    py = (np.arange(by0, by1, dtype=_F32) + _F32(0.5 - cy))[:, None]
    d = np.sqrt(px * px + py * py)
    if sharp:  # noqa: SIM108
        shape = np.clip(_F32(radius + 0.5) - d, 0, 1)
    else:
        shape = np.exp(-((d / _F32(radius)) ** 2))
    refl[by0 - y0w : by1 - y0w, bx0 - x0w : bx1 - x0w] += _F32(amp) * shape
    return (float(bx0), float(by0), float(bx1), float(by1))


def _add_lookalikes(
    rng: np.random.Generator,
    part: _Part,
    s: float,
    refl: np.ndarray,
    window: tuple[int, int, int, int],
) -> list[tuple[str, tuple[float, float, float, float]]]:
    """Dust, stains and tool marks; drawn the same way on defective and defect-free images,
    so their number says nothing about the label. Every image gets at least one."""
    out: list[tuple[str, tuple[float, float, float, float]]] = []

    def point_on_metal(margin: float) -> tuple[float, float, float, float] | None:
        for _ in range(30):
            rad = math.sqrt(rng.uniform(part.r_in**2, part.r_out**2))
            ang = rng.uniform(0, 2 * math.pi)
            x, y = part.cx + rad * math.cos(ang), part.cy + rad * math.sin(ang)
            if part.on_metal(np.array([x]), np.array([y]), margin)[0]:
                return x, y, rad, ang
        return None

    # Dust specks: small sharp dots, bright or dark, sometimes a few together.
    n_dust = int(rng.poisson(8)) + 1
    for _ in range(n_dust):
        p = point_on_metal(3)
        if p is None:
            continue
        radius = rng.uniform(0.6, 3.5)
        amp = rng.uniform(0.06, 0.3) * (1 if rng.random() < 0.6 else -1)
        box = _blob(refl, window, p[0], p[1], radius, amp, sharp=True)
        if box:
            out.append(("dust", box))

    # Stains: soft, low-contrast, irregular (a few overlapping Gaussians).
    n_stain = int(rng.poisson(1.0))
    for _ in range(n_stain):
        p = point_on_metal(0)
        if p is None:
            continue
        radius = rng.uniform(15, 110) * s
        amp = -rng.uniform(0.02, 0.07) * (1 if rng.random() < 0.8 else -1)
        boxes = []
        for _k in range(int(rng.integers(1, 4))):
            ox, oy = rng.normal(0, radius * 0.6, 2)
            box = _blob(
                refl, window, p[0] + ox, p[1] + oy, radius * rng.uniform(0.5, 1), amp, sharp=False
            )
            if box:
                boxes.append(box)
        if boxes:
            b = np.array(boxes)
            out.append(("stain", (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max())))

    # Tool marks: short concentric arcs along the turning direction, low contrast.
    n_tool = int(rng.poisson(2.5)) + 1
    x0w, y0w, x1w, y1w = window
    for _ in range(n_tool):
        p = point_on_metal(4)
        if p is None:
            continue
        _, _, rad, ang = p
        arc_len = rng.uniform(_MIN_TOOLMARK_LENGTH, max(220 * s, _MIN_TOOLMARK_LENGTH))
        half_ang = arc_len / 2 / rad
        hw = rng.uniform(0.5, 1.3)
        amp = rng.uniform(0.02, 0.06) * (1 if rng.random() < 0.5 else -1)
        angs = np.linspace(ang - half_ang, ang + half_ang, 16)
        xs_, ys_ = part.cx + rad * np.cos(angs), part.cy + rad * np.sin(angs)
        bx0, bx1 = max(int(xs_.min() - hw - 2), x0w), min(int(xs_.max() + hw + 3), x1w)
        by0, by1 = max(int(ys_.min() - hw - 2), y0w), min(int(ys_.max() + hw + 3), y1w)
        if bx1 <= bx0 or by1 <= by0:
            continue
        px = (np.arange(bx0, bx1, dtype=_F32) + _F32(0.5 - part.cx))[None, :]
        py = (np.arange(by0, by1, dtype=_F32) + _F32(0.5 - part.cy))[:, None]
        rr = np.sqrt(px * px + py * py)
        da = np.angle(np.exp(1j * (np.arctan2(py, px) - ang))).astype(_F32)
        along = np.clip(1 - (da / _F32(half_ang)) ** 2, 0, 1)
        cov = np.clip(_F32(hw + 0.5) - np.abs(rr - _F32(rad)), 0, 1) * along
        refl[by0 - y0w : by1 - y0w, bx0 - x0w : bx1 - x0w] += _F32(amp) * cov
        out.append(("toolmark", (float(bx0), float(by0), float(bx1), float(by1))))
    return out


# ----------------------------------------------------------------------------------- the image


def generate_image(
    seed: int,
    index: int,
    size: tuple[int, int] = FULL_SIZE,
    defective: bool = True,
    *,
    stream: int = STREAM_TRAINVAL,
) -> SynthImage:
    """Render image ``index`` of ``stream`` under ``seed``; ``size`` is (width, height).

    Deterministic: the same arguments give the same pixels and boxes in any process.
    ``defective=False`` draws no scratches (``boxes`` is empty) but still draws look-alikes.
    """
    width, height = int(size[0]), int(size[1])
    _check_size((width, height))
    rng, rng_looks, rng_scratch, rng_noise = _rngs(int(seed), int(stream), int(index))
    s = min(width / FULL_SIZE[0], height / FULL_SIZE[1])

    gain, refl, cov, window, part, bg = _render_part(rng, (width, height), s)
    x0, y0, x1, y1 = window
    gain_level = float(gain[y0:y1, x0:x1].mean())

    lookalikes = _add_lookalikes(rng_looks, part, s, refl, window)
    masks = _add_scratches(rng_scratch, part, s, refl, cov, window, gain_level) if defective else []
    if defective and not masks:  # never silently mislabel: the size check makes this unreachable
        raise RuntimeError(f"could not place a scratch on image {index} at {width}x{height}")

    # Compose: metal inside the window over the dark background.
    grey = bg
    gw = gain[y0:y1, x0:x1]
    win = grey[y0:y1, x0:x1]
    win += cov * (gw * refl - win)

    # Sensor noise (signal-dependent), then a slight white-balance tint on three channels.
    noise = rng_noise.standard_normal((height, width), dtype=_F32)
    noise *= np.sqrt(_F32(rng.uniform(1.0, 2.5)) + _F32(0.02) * np.maximum(grey, 0))
    grey += noise
    tint = np.array([1.0 + rng.uniform(0.0, 0.03), 1.0, 1.0 - rng.uniform(0.0, 0.05)], _F32)
    image = np.empty((height, width, 3), dtype=np.uint8)
    for c in range(3):
        np.clip(grey * tint[c] + _F32(0.5), 0, 255, out=image[..., c], casting="unsafe")
    quality = int(rng.integers(90, 96))

    boxes = np.array([m.box for m in masks], dtype=_F32).reshape(-1, 4)
    return SynthImage(
        image=image, boxes=boxes, masks=masks, lookalikes=lookalikes, jpeg_quality=quality
    )


def save_jpeg(image: np.ndarray, path: Path, quality: int = 92) -> None:
    """Save an (H, W, 3) uint8 image as a baseline JPEG (written atomically)."""
    with replacing(path) as tmp:
        Image.fromarray(image).save(tmp, format="JPEG", quality=int(quality))


# --------------------------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class DatasetSummary:
    """What `generate_dataset` wrote."""

    root: Path
    counts: dict[str, dict[str, int]]  # split -> {"defective": n, "free": n, "boxes": n}
    seconds: float
    seconds_per_image: float  # summed over workers: the per-core cost

    def to_json(self) -> dict:
        """The summary as a JSON-able dict (times in seconds, rounded)."""
        return {
            "root": str(self.root),
            "counts": self.counts,
            "seconds": round(self.seconds, 3),
            "seconds_per_image": round(self.seconds_per_image, 4),
        }


@dataclass(frozen=True)
class _Task:
    root: str
    image_id: str
    seed: int
    stream: int
    index: int
    size: tuple[int, int]
    defective: bool


def _ignore_interrupts() -> None:
    """A render worker's start: SIGINT ignored (see `generate_dataset`)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _render_task(task: _Task) -> tuple[str, int, float]:
    t0 = time.perf_counter()
    img = generate_image(task.seed, task.index, task.size, task.defective, stream=task.stream)
    root = Path(task.root)
    image_path = root / "JPEGImages" / f"{task.image_id}.jpg"
    save_jpeg(img.image, image_path, img.jpeg_quality)
    sample = voc.VocSample(
        image_id=task.image_id,
        image_path=image_path,
        width=task.size[0],
        height=task.size[1],
        objects=tuple(voc.VocObject(CLASS_NAME, tuple(map(float, b)), False) for b in img.boxes),
    )
    voc.write_annotation(root / "Annotations" / f"{task.image_id}.xml", sample)
    return task.image_id, len(img.boxes), time.perf_counter() - t0


_MARKER = "splitdet.training.synth"


class SyntheticDatasetExists(FileExistsError):
    """``out`` holds an earlier synthetic dataset, which ``overwrite`` would replace (any other
    `FileExistsError` of `generate_dataset` is a folder it never writes into)."""


def _prepare_root(out: Path, overwrite: bool) -> None:
    """Make ``out``'s VOC folders, emptying those of an earlier synthetic dataset when
    ``overwrite``; `FileExistsError` for anything else there."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        meta = out / "dataset.json"
        ours = False
        if meta.is_file():
            try:
                ours = json.loads(meta.read_text()).get("generator") == _MARKER
            except (OSError, ValueError):
                ours = False
        if not ours:
            raise FileExistsError(
                f"{out} is not empty and is not a splitdet synthetic dataset, so it is never "
                "overwritten"
            )
        if not overwrite:
            raise SyntheticDatasetExists(f"{out} already holds a synthetic dataset")
        for sub in ("JPEGImages", "Annotations", "ImageSets"):
            shutil.rmtree(out / sub, ignore_errors=True)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)


def generate_dataset(
    out: Path,
    seed: int = 0,
    size: tuple[int, int] = FULL_SIZE,
    n_defective: int = 540,
    n_free: int = 200,
    val_fraction: float = 0.2,
    n_test_defective: int = 108,
    n_test_free: int = 40,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> DatasetSummary:
    """Write a PASCAL VOC dataset of synthetic gasket images to ``out``.

    Defaults follow the paper: 540 defective + 200 defect-free images, split 80/20 into train
    (432 + 160) and val (108 + 40), plus a held-out ``test`` split (108 + 40) drawn from a
    separate seed stream. Files: ``JPEGImages/*.jpg``, ``Annotations/*.xml``,
    ``ImageSets/Main/{train,val,test}.txt``, ``dataset.json`` (settings) and ``README.md``.
    Image ids (``gasket_00000``...) are shuffled so they reveal neither split nor label.

    ``workers``: processes (default: all cores; 1 renders in this process). The output does not
    depend on it. Workers are started with "spawn", so a script calling this with ``workers > 1``
    needs the usual ``if __name__ == "__main__":`` guard. ``overwrite``: replace a previous
    synthetic dataset at ``out`` (without it: `SyntheticDatasetExists`); anything else in a
    non-empty ``out`` is refused (FileExistsError), and nothing but our own sub-folders is ever
    deleted.
    """
    out = Path(out)
    width, height = int(size[0]), int(size[1])
    _check_size((width, height))
    counts_in = {
        "n_defective": n_defective,
        "n_free": n_free,
        "n_test_defective": n_test_defective,
        "n_test_free": n_test_free,
    }
    for name, value in counts_in.items():
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if n_defective + n_free + n_test_defective + n_test_free == 0:
        raise ValueError("nothing to generate: every count is 0")
    workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))

    n_val_def = round(n_defective * val_fraction)
    n_val_free = round(n_free * val_fraction)
    plan: list[tuple[str, bool, int, int]] = []  # (split, defective, stream, index)
    index = 0
    for split, defective, n in (
        ("train", True, n_defective - n_val_def),
        ("val", True, n_val_def),
        ("train", False, n_free - n_val_free),
        ("val", False, n_val_free),
    ):
        for _ in range(n):
            plan.append((split, defective, STREAM_TRAINVAL, index))
            index += 1
    index = 0
    for defective, n in ((True, n_test_defective), (False, n_test_free)):
        for _ in range(n):
            plan.append(("test", defective, STREAM_TEST, index))
            index += 1
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 99])).permutation(len(plan))
    digits = max(5, len(str(len(plan))))
    tasks: list[_Task] = []
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for k, j in enumerate(order):
        split, defective, stream, idx = plan[j]
        image_id = f"gasket_{k:0{digits}d}"
        splits[split].append(image_id)
        tasks.append(_Task(str(out), image_id, int(seed), stream, idx, (width, height), defective))
    tasks.sort(key=lambda t: t.image_id)
    for ids in splits.values():
        ids.sort()

    _prepare_root(out, overwrite)
    settings = {
        "generator": _MARKER,
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "size": [width, height],
        "class_names": [CLASS_NAME],
        "val_fraction": val_fraction,
        "counts": {
            "train": {"defective": n_defective - n_val_def, "free": n_free - n_val_free},
            "val": {"defective": n_val_def, "free": n_val_free},
            "test": {"defective": n_test_defective, "free": n_test_free},
        },
        "streams": {"train": STREAM_TRAINVAL, "val": STREAM_TRAINVAL, "test": STREAM_TEST},
        "colour": "mono rendering saved as RGB JPEG with a slight per-image tint",
        "jpeg_quality": [90, 95],
        "box_convention": "VOC 1-based inclusive integers (0-based continuous in splitdet)",
        "complete": False,
    }
    meta_path = out / "dataset.json"
    meta_path.write_text(json.dumps(settings, indent=2) + "\n")

    t0 = time.perf_counter()
    n_boxes: dict[str, int] = {}
    busy = 0.0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="synth", unit="img")
    try:
        if workers == 1 or len(tasks) <= 1:
            results = map(_render_task, tasks)
            for image_id, nb, dt in results:
                n_boxes[image_id] = nb
                busy += dt
                if bar is not None:
                    bar.update(1)
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")  # safe with threads in the parent (tqdm, torch)
            n_proc = min(workers, len(tasks))
            chunk = max(1, min(8, len(tasks) // (n_proc * 4)))
            # the workers leave Ctrl-C to this process (which ends them with the pool): each
            # printed its own KeyboardInterrupt traceback when the terminal's group got it
            with ctx.Pool(n_proc, initializer=_ignore_interrupts) as pool:
                for image_id, nb, dt in pool.imap_unordered(_render_task, tasks, chunksize=chunk):
                    n_boxes[image_id] = nb
                    busy += dt
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0

    for split, ids in splits.items():
        voc.write_split(out, split, ids)
    counts = {
        split: {
            "defective": sum(1 for i in ids if n_boxes[i] > 0),
            "free": sum(1 for i in ids if n_boxes[i] == 0),
            "boxes": sum(n_boxes[i] for i in ids),
        }
        for split, ids in splits.items()
    }
    settings["counts"] = counts
    settings["complete"] = True
    meta_path.write_text(json.dumps(settings, indent=2) + "\n")
    (out / "README.md").write_text(_readme(settings))
    return DatasetSummary(
        root=out,
        counts=counts,
        seconds=seconds,
        seconds_per_image=busy / max(len(tasks), 1),
    )


def _readme(settings: dict) -> str:
    w, h = settings["size"]
    lines = [
        "# Synthetic titanium-gasket scratch dataset (PASCAL VOC)",
        "",
        f"Made by `splitdet synth` ({settings['generator']} v{settings['generator_version']}), "
        f"seed {settings['seed']}, {w}x{h} px. Class: `scratch`. Images without objects are "
        "defect-free (they still show dust, stains and tool marks, which are not scratches).",
        "",
        "| split | defective | defect-free | boxes |",
        "| --- | --- | --- | --- |",
    ]
    for split, c in settings["counts"].items():
        lines.append(f"| {split} | {c['defective']} | {c['free']} | {c['boxes']} |")
    lines += [
        "",
        "Images are a mono rendering saved as RGB JPEG (quality 90-95). Boxes are tight around",
        "every pixel a scratch changes; VOC coordinates are 1-based and inclusive.",
        "Regenerate with the same seed and size to get the same images.",
        "",
    ]
    return "\n".join(lines)


def _time_one(size: Sequence[int] = FULL_SIZE, n: int = 3) -> float:  # pragma: no cover
    """Mean seconds to render one defective image (a profiling aid)."""
    t0 = time.perf_counter()
    for i in range(n):
        generate_image(0, i, (int(size[0]), int(size[1])), True)
    return (time.perf_counter() - t0) / n
