"""Scratches on a synthetic gasket image: their strokes, widths, contrast and tight boxes.

`add_scratches` draws 1-6 scratches onto the part's reflectance (in place): each along a
straight or curved (quadratic Bezier) centre line on the metal, 30 px to ~1400 px long at
2448x2048, 1-6 px wide in output px at any size, rasterised as an anti-aliased stroke with
intermittent strength and tapered ends, bright or dark, 5-16 times the local clutter (texture
detail and sensor noise). Only the pixels it changes by at least one unit of that clutter are
drawn. Each comes back as a `StrokeMask`, the stroke's coverage over exactly its box: those
pixels, so a box never claims an invisible tail, and is shorter than the centre line when the
tapered ends fade out: at least 20 px on its longer side (a shorter visible part is re-drawn).
All draws come from the scratch generator alone, so the rest of the image does not depend on
them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from splitdet.training.synth_part import Part

__all__ = ["StrokeMask", "add_scratches"]

#: Scratch contrast in units of the local clutter (texture detail and sensor noise, in grey
#: levels, see `_clutter_levels`): log-uniform from faint to strong.
_CONTRAST_RANGE = (5.0, 16.0)
#: A scratch pixel is one the scratch changes by at least this many clutter units: fainter
#: parts (tapered ends, dips) are cut from the stroke before it is drawn (neither drawn nor
#: labelled), so no box claims an invisible stroke and no unlabelled trace is left.
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


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


#: The shortest scratch's centre line, output px at any size (the camera's shortest, 2448x2048):
#: five times the widest scratch (6 px), so every scratch is a stroke, never a dot. Its box (the
#: visible part: faded ends are not drawn) may be shorter, down to 20 px on its longer side.
_MIN_SCRATCH_LENGTH = 30.0


def _scratch_path(
    rng: np.random.Generator, part: Part, s: float, width_px: float
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


def add_scratches(
    rng: np.random.Generator,
    part: Part,
    s: float,
    refl: np.ndarray,
    cov: np.ndarray,
    window: tuple[int, int, int, int],
    gain_level: float,
) -> list[StrokeMask]:
    """Draw a defective image's scratches onto ``refl`` (in place) and return their masks.

    ``refl`` and ``cov``: the part's reflectance and coverage, float32 over ``window``
    ``(x0, y0, x1, y1)`` (image px); ``s``: the image's scale against the camera's;
    ``gain_level``: the mean illumination gain over the window, grey levels. At least one
    scratch unless none fits in 400 tries."""
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
