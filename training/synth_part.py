"""The defect-free scene of a synthetic gasket image: the part and its texture.

`render_part` places a machined ring (annulus, sometimes with bolt holes) slightly off-centre on
a dark fixture and renders it as three float32 layers that `synth_image.generate_image` composes:
the illumination gain (grey levels), the metal's reflectance (lathe marks, anisotropic grain,
side-lit bevels, the specular "bow tie" of a turned surface) and its anti-aliased coverage, plus
the background with the part's soft shadow. `Part` is the ring's geometry, which scratches and
look-alikes use to stay on the metal. Every random draw comes from the one generator passed in,
in a fixed order, so the scene is the same for a defective image and its defect-free twin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["Part", "render_part"]

_F32 = np.float32


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
class Part:
    """The ring's geometry, image px: centre ``(cx, cy)``, inner and outer radius, and the bolt
    holes as ``(x, y, radius)``."""

    cx: float
    cy: float
    r_in: float
    r_out: float
    holes: list[tuple[float, float, float]]  # (x, y, radius)

    def on_metal(self, x: np.ndarray, y: np.ndarray, margin: float) -> np.ndarray:
        """Whether each point ``(x, y)`` (image px, same shape) lies on the metal, at least
        ``margin`` px inside its edges and away from every hole: a boolean array."""
        r = np.hypot(x - self.cx, y - self.cy)
        ok = (r >= self.r_in + margin) & (r <= self.r_out - margin)
        for hx, hy, hr in self.holes:
            ok &= np.hypot(x - hx, y - hy) >= hr + margin
        return ok


def render_part(
    rng: np.random.Generator, size: tuple[int, int], s: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int, int], Part, np.ndarray]:
    """Render the defect-free scene. Returns (gain image, reflectance, coverage, window, part,
    background) where the final grey image is ``bg*(1-cov) + cov*gain*refl`` inside the window.

    ``size``: (width, height) px; ``s``: the image's scale against the camera's (2448x2048).
    ``window``: the part's bounding box ``(x0, y0, x1, y1)``, px. Gain and background: float32
    ``(height, width)``, grey levels; reflectance and coverage: float32 over the window,
    ``(y1 - y0, x1 - x0)``, coverage in [0, 1]."""
    part = _place_part(rng, size)
    r_in, r_out = part.r_in, part.r_out
    window, xs, ys, r = _window_coordinates(part, size)

    # Coverage: anti-aliased annulus minus holes.
    cov = np.clip(r - _F32(r_in - 0.5), 0, 1) * np.clip(_F32(r_out + 0.5) - r, 0, 1)

    # Radial profile (lathe marks + bevels), sampled at 4 per pixel and looked up by radius.
    per_px = 4
    prof, bevel, bev = _radial_profile(rng, r_in, r_out, s, per_px)
    n = len(prof)
    # Linear interpolation in r: a nearest lookup quantises r, and since every column shares
    # the same fractional x offset, the steps line up into visible seams near the axes.
    r_lut = np.minimum(r, _F32(r_out + 1.5))  # outside the part the texture is not seen
    pos = r_lut * _F32(per_px)
    idx = np.minimum(pos.astype(np.int32), n - 2)
    pos -= idx  # now the fraction
    base = rng.uniform(0.52, 0.62)
    refl = _lerp(prof.astype(_F32) + _F32(base), idx, pos)

    _add_grain(rng, refl, xs, ys, r_lut, r_out)
    _light_bevels(rng, refl, xs, ys, r, bevel, idx, pos)
    _add_specular(rng, refl, xs, ys, r)
    _cut_holes(cov, refl, part.holes, window, bev)
    gain_full = _illumination(rng, size)
    bg = _background(rng, part, size, s)
    return gain_full, refl, cov, window, part, bg


def _place_part(rng: np.random.Generator, size: tuple[int, int]) -> Part:
    """The ring's size, position and bolt holes for an image of ``size`` (width, height) px."""
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
    return Part(cx, cy, r_in, r_out, holes)


def _window_coordinates(
    part: Part, size: tuple[int, int]
) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray, np.ndarray]:
    """The part's window ``(x0, y0, x1, y1)`` (its bounding box, px: texture work happens only
    there) and, over it, the pixel centres' offsets from the part's centre, px: ``xs`` float32
    ``(1, x1 - x0)``, ``ys`` ``(y1 - y0, 1)``, and their radius ``r`` ``(y1 - y0, x1 - x0)``."""
    width, height = size
    cx, cy, r_out = part.cx, part.cy, part.r_out
    x0, x1 = max(int(cx - r_out) - 2, 0), min(int(cx + r_out) + 3, width)
    y0, y1 = max(int(cy - r_out) - 2, 0), min(int(cy + r_out) + 3, height)
    xs = (np.arange(x0, x1, dtype=_F32) + _F32(0.5 - cx))[None, :]
    ys = (np.arange(y0, y1, dtype=_F32) + _F32(0.5 - cy))[:, None]
    r = np.sqrt(xs * xs + ys * ys)
    return (x0, y0, x1, y1), xs, ys, r


def _radial_profile(
    rng: np.random.Generator, r_in: float, r_out: float, s: float, per_px: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """The reflectance along the radius, sampled ``per_px`` times a px from 0 to ``r_out + 3``:
    lathe marks (float64) and bevels (float32), both ``(n,)`` in reflectance units, and the
    bevel width, px."""
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
    return prof, bevel, bev


def _add_grain(
    rng: np.random.Generator,
    refl: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    r_lut: np.ndarray,
    r_out: float,
) -> None:
    """Add anisotropic grain to ``refl`` in place: noise on a polar grid, smoothed along the
    angle, looked up by (r, theta). ``r_lut``: the window's radii, px, which this overwrites."""
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


def _light_bevels(
    rng: np.random.Generator,
    refl: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    r: np.ndarray,
    bevel: np.ndarray,
    idx: np.ndarray,
    pos: np.ndarray,
) -> None:
    """Add the bevels to ``refl`` in place, lit from one side: ``bevel`` is the radial bevel
    profile, looked up at sample ``idx + pos`` for each window pixel."""
    light = rng.uniform(0, 2 * math.pi)
    cos_l = (xs * _F32(math.cos(light)) + ys * _F32(math.sin(light))) / np.maximum(r, 1)
    refl += _lerp(bevel, idx, pos) * (_F32(0.55) + _F32(0.45) * cos_l)


def _add_specular(
    rng: np.random.Generator, refl: np.ndarray, xs: np.ndarray, ys: np.ndarray, r: np.ndarray
) -> None:
    """Add the specular "bow tie" of a turned surface to ``refl`` in place: bright along one
    diameter direction."""
    phi = rng.uniform(0, math.pi)
    r2 = np.maximum(r * r, 1)
    cos2 = (xs * xs - ys * ys) * _F32(math.cos(2 * phi)) + (2 * xs * ys) * _F32(math.sin(2 * phi))
    cos2 /= r2
    k = rng.uniform(2.0, 6.0)
    spec = np.exp(_F32(k) * (cos2 - 1)) * _F32(rng.uniform(0.12, 0.4))
    refl += spec


def _cut_holes(
    cov: np.ndarray,
    refl: np.ndarray,
    holes: list[tuple[float, float, float]],
    window: tuple[int, int, int, int],
    bev: float,
) -> None:
    """Cut the bolt holes out of ``cov`` and darken their chamfers in ``refl``, in place
    (no random draws). ``bev``: the bevel width, px."""
    x0, y0, x1, y1 = window
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


def _illumination(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """The illumination gain, float32 ``(height, width)``, grey levels: slow drift across the
    part and a linear gradient."""
    width, height = size
    gx, gy = rng.uniform(-0.12, 0.12, size=2)
    drift = _smooth_noise(rng, (4, 5), (width, height))
    gain_full = _F32(rng.uniform(175, 215)) * (1 + _F32(0.06) * drift)
    gain_full *= (
        1
        + _F32(gx) * (np.arange(width, dtype=_F32) / _F32(width) - _F32(0.5))[None, :]
        + _F32(gy) * (np.arange(height, dtype=_F32) / _F32(height) - _F32(0.5))[:, None]
    )
    return gain_full


def _background(
    rng: np.random.Generator, part: Part, size: tuple[int, int], s: float
) -> np.ndarray:
    """The background, float32 ``(height, width)``, grey levels: a dark fixture with slow
    variation and the part's soft shadow."""
    width, height = size
    cx, cy, r_in, r_out = part.cx, part.cy, part.r_in, part.r_out
    bg = _F32(rng.uniform(14, 30)) + _F32(4.0) * _smooth_noise(rng, (3, 4), (width, height))
    bg_xs = (np.arange(width, dtype=_F32) + _F32(0.5 - cx))[None, :]
    bg_ys = (np.arange(height, dtype=_F32) + _F32(0.5 - cy))[:, None]
    r_full = np.sqrt(bg_xs * bg_xs + bg_ys * bg_ys)
    gap = np.maximum(np.maximum(r_full - _F32(r_out), _F32(r_in) - r_full), 0)
    shadow = np.exp(-gap / _F32(max(25 * s, 3)))
    bg *= 1 - _F32(0.5) * shadow
    return bg
