"""Vectorised drawing primitives for the procedural toy data set (numpy + PIL, no per-pixel loops).

Everything is a function of continuous coordinates, so one lesion can be photographed several times
(rotated, shifted, rescaled, mirrored) and stay the same lesion, at any resolution. A `Frame` maps the
image's pixel grid (x, y in [-1, 1]) affinely into lesion coordinates; colours are float RGB in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from PIL import Image, ImageDraw


def rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, s], [-s, c]], dtype=np.float64)


@dataclass(frozen=True)
class Frame:
    """Coordinates q = matrix @ p + offset over the size x size pixel grid p in [-1, 1]^2."""

    size: int
    matrix: np.ndarray = field(default_factory=lambda: np.eye(2))
    offset: np.ndarray = field(default_factory=lambda: np.zeros(2))

    @cached_property
    def axis(self) -> np.ndarray:
        """Pixel-centre positions along one image axis, in [-1, 1]."""
        return (np.arange(self.size, dtype=np.float64) + 0.5) / self.size * 2 - 1

    @cached_property
    def coords(self) -> np.ndarray:
        """(2, H, W) float32: x (columns) and y (rows) in this frame."""
        y, x = np.meshgrid(self.axis, self.axis, indexing="ij")
        q = np.einsum("ij,jhw->ihw", self.matrix, np.stack([x, y])) + self.offset[:, None, None]
        return q.astype(np.float32)

    def then(self, matrix: np.ndarray, offset: np.ndarray | float = 0.0) -> Frame:
        """The frame whose coordinates are matrix @ q + offset of this frame's q."""
        matrix = np.asarray(matrix, dtype=np.float64)
        return Frame(self.size, matrix @ self.matrix, matrix @ self.offset + offset)

    def to_pixels(self, points: np.ndarray) -> np.ndarray:
        """Frame coordinates (N, 2) -> pixel coordinates (N, 2) (x right, y down) of the image."""
        p = np.linalg.solve(self.matrix, (np.asarray(points, np.float64) - self.offset).T).T
        return (p + 1) / 2 * self.size


@dataclass(frozen=True)
class FourierField:
    """A smooth random scalar field: K random cosine waves with 1/f amplitudes, about unit variance."""

    freqs: np.ndarray  # (K, 2), radians per unit
    phases: np.ndarray  # (K,)
    amps: np.ndarray  # (K,)

    @classmethod
    def sample(cls, rng: np.random.Generator, k: int, fmin: float, fmax: float) -> FourierField:
        magnitude = fmin * (fmax / fmin) ** rng.random(k)  # log-uniform: every scale is represented
        angle = rng.uniform(0, 2 * np.pi, k)
        amps = 1.0 / magnitude
        return cls(np.stack([magnitude * np.cos(angle), magnitude * np.sin(angle)], axis=1),
                   rng.uniform(0, 2 * np.pi, k), amps / np.sqrt(np.sum(amps**2) / 2))

    def __call__(self, frame: Frame) -> np.ndarray:
        """The field over `frame`, (H, W) float32.

        On an affine frame each wave cos(f.q + phase) is separable in the pixel axes, so the whole sum is
        one small complex matrix product, Re(Ey^T Ex), instead of K cosines per pixel.
        """
        freqs = self.freqs @ frame.matrix  # f . (M p + b) = (M^T f) . p + f . b
        phases = self.phases + self.freqs @ frame.offset
        ey = (self.amps * np.exp(1j * phases))[:, None] * np.exp(1j * freqs[:, 1:2] * frame.axis[None, :])
        ex = np.exp(1j * freqs[:, 0:1] * frame.axis[None, :])
        return (ey.T @ ex).real.astype(np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def blobs(coords: np.ndarray, centres: np.ndarray, sigmas: np.ndarray, colours: np.ndarray,
          sharpness: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Round spots (dots, globules, nests, lacunae): (alpha (H, W), colour (H, W, 3)).

    `sharpness` > 1 makes flat-topped spots with a crisp rim (lacunae) instead of Gaussian dots.
    """
    h, w = coords.shape[1:]
    flat = coords.reshape(2, -1)
    d2 = (flat**2).sum(0)[None] - 2 * centres.astype(np.float32) @ flat + (centres**2).sum(1)[:, None]
    alpha_each = np.exp(-((np.maximum(d2, 0) / (2 * sigmas[:, None] ** 2)) ** sharpness)).astype(np.float32)
    alpha = 1.0 - np.prod(1.0 - alpha_each, axis=0)
    colour = (alpha_each.T @ colours) / np.maximum(alpha_each.sum(0), 1e-6)[:, None]
    return alpha.reshape(h, w), colour.reshape(h, w, 3).astype(np.float32)


def draw_lines(size: int, lines: list[tuple[np.ndarray, float]], supersample: int = 4) -> np.ndarray:
    """Anti-aliased polylines (vessels, hairs) as alpha (H, W) in [0, 1].

    `lines` holds (pixel points (N, 2), width in pixels); drawn by PIL at `supersample` times the size
    and box-filtered down, which is far cheaper than a distance field per segment.
    """
    canvas = Image.new("L", (size * supersample, size * supersample), 0)
    draw = ImageDraw.Draw(canvas)
    for points, width in lines:
        scaled = [tuple(p) for p in (np.asarray(points) * supersample).tolist()]
        draw.line(scaled, fill=255, width=max(1, round(width * supersample)), joint="curve")
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, pieces: int = 12) -> np.ndarray:
    """Points (pieces + 1, 2) along a quadratic Bezier curve."""
    t = np.linspace(0, 1, pieces + 1)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def branching_tree(rng: np.random.Generator, root: np.ndarray, heading: float, length: float, width: float,
                   depth: int) -> list[tuple[np.ndarray, float]]:
    """An arborizing vessel: a wavy trunk forking into thinner, shorter branches; (points, width) each."""
    branches = []
    stack = [(np.asarray(root, np.float64), heading, length, width, depth)]
    while stack:
        point, angle, seg_len, seg_w, level = stack.pop()
        points = [point]
        for _ in range(3):  # each branch turns a little twice
            angle += rng.normal(0, 0.35)
            points.append(points[-1] + seg_len / 3 * np.array([np.cos(angle), np.sin(angle)]))
        branches.append((np.array(points), seg_w))
        if level > 0:
            for turn in (-1, 1):
                stack.append((points[-1], angle + turn * rng.uniform(0.3, 0.9), seg_len * 0.65, seg_w * 0.7, level - 1))
    return branches


def over(base: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-composite `colour` ((H, W, 3) or (3,)) over `base` (H, W, 3)."""
    a = alpha[..., None]
    return base * (1 - a) + colour * a
