"""Look-alikes on a synthetic gasket image: marks on the metal that are not scratches.

`add_lookalikes` draws, on every image whether defective or not, dust specks (small sharp dots,
bright or dark), soft low-contrast stains (a few overlapping Gaussians) and short low-contrast
tool marks that follow the lathe direction (concentric arcs, at least 25 px long at any size),
onto the part's reflectance in place. A detector's gate has to learn the difference from a
scratch, not just "anything on the metal". Their boxes come back for inspection and tests only;
they are never annotated. All draws come from the look-alike generator alone.
"""

from __future__ import annotations

import math

import numpy as np

from splitdet.training.synth_part import Part

__all__ = ["add_lookalikes"]

#: The shortest tool mark's arc, output px at any size (the camera's shortest, 2448x2048).
_MIN_TOOLMARK_LENGTH = 25.0
_F32 = np.float32


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


def add_lookalikes(
    rng: np.random.Generator,
    part: Part,
    s: float,
    refl: np.ndarray,
    window: tuple[int, int, int, int],
) -> list[tuple[str, tuple[float, float, float, float]]]:
    """Dust, stains and tool marks; drawn the same way on defective and defect-free images,
    so their number says nothing about the label. Every image gets at least one.

    ``refl``: the part's reflectance, float32 over ``window`` ``(x0, y0, x1, y1)`` (image px),
    changed in place; ``s``: the image's scale against the camera's. Returns ``(kind, box)``
    for each one drawn, ``box`` ``(x1, y1, x2, y2)`` in image px."""
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
