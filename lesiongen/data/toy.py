"""A procedural dermoscopy-like toy data set: the 7 HAM10000 classes, made here, no external images.

Each class is a `ClassStyle`: ranges and probabilities for the textbook dermoscopic signs (colour
palette and variegation, size, border irregularity, asymmetry, border sharpness, pigment network,
dots / globules, blue-grey nests, arborizing vessels, a white central patch, lacunae, scale). A lesion
draws its own values from its class's ranges, and the ranges overlap on purpose: a nevus can be a
little asymmetric, a melanoma can lack dots, a keratosis is as brown as a nevus. Every photo adds
class-free nuisances (skin tone, hairs, lighting, dermatoscope vignette, sensor noise, blur).
Each lesion is photographed 1-3 times (rotated, shifted, rescaled), all sharing its `group_id`,
so lesion-aware splitting has real groups to keep together.

Deterministic: lesion `i` of class `c` is drawn from its own generator seeded with (seed, c, i).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from lesiongen.data.toy_render import (
    FourierField,
    Frame,
    bezier,
    blobs,
    branching_tree,
    draw_lines,
    over,
    rotation,
    sigmoid,
)
from lesiongen.errors import InputError
from lesiongen.utils.atomic import atomic_dir
from lesiongen.utils.outdir import check_replaceable, write_marker

Range = tuple[float, float]
RGB = tuple[float, float, float]

# Dermoscopic colours (linear-ish RGB in [0, 1]).
TAN, LIGHT_BROWN, BROWN, DARK_BROWN = (0.78, 0.60, 0.44), (0.68, 0.48, 0.33), (0.52, 0.33, 0.21), (0.33, 0.19, 0.12)
BLACK, BLUE_GREY, RED, DARK_RED = (0.13, 0.09, 0.09), (0.42, 0.46, 0.56), (0.74, 0.26, 0.27), (0.50, 0.10, 0.17)
PINK, PALE_PINK, PURPLE, WHITE = (0.88, 0.58, 0.58), (0.93, 0.76, 0.74), (0.47, 0.16, 0.32), (0.95, 0.93, 0.90)
MILIA = (0.96, 0.93, 0.78)


@dataclass(frozen=True)
class ClassStyle:
    """How one class tends to look; every range is sampled per lesion, every probability per lesion."""

    palette: tuple[RGB, ...]  # pigment colours; the first dominates when variegation is low
    variegation: Range  # 0: one colour, 1: the palette mixed in patches
    radius: Range  # lesion radius as a fraction of the half-image
    irregularity: Range  # amplitude of the border's angular harmonics
    asymmetry: Range  # one-sided bulge of the outline and of the dark pigment
    softness: Range  # border blur relative to the radius
    network: float = 0.0  # P(pigment network)
    network_distortion: Range = (0.0, 0.2)  # 0 regular honeycomb, 1 broken and warped
    network_periphery: bool = False  # network only in the rim (dermatofibroma)
    dots: float = 0.0  # P(dots / globules)
    dot_colours: tuple[RGB, ...] = (DARK_BROWN,)
    dot_placement: str = "uniform"  # uniform / centre / periphery
    dot_count: tuple[int, int] = (6, 20)
    nests: float = 0.0  # P(blue-grey ovoid nests)
    vessels: float = 0.0  # P(arborizing vessels)
    white_patch: float = 0.0  # P(central white scar-like patch)
    lacunae: float = 0.0  # P(red-purple lacunae)
    scale: float = 0.0  # P(white surface scale)


STYLES: dict[str, ClassStyle] = {
    "akiec": ClassStyle(palette=(PINK, RED, LIGHT_BROWN, TAN), variegation=(0.2, 0.6), radius=(0.45, 0.8),
                        irregularity=(0.05, 0.16), asymmetry=(0.05, 0.35), softness=(0.12, 0.3),
                        dots=0.6, dot_colours=(WHITE, MILIA), dot_count=(8, 24), vessels=0.2, scale=0.8),
    "bcc": ClassStyle(palette=(PALE_PINK, PINK, LIGHT_BROWN, TAN), variegation=(0.1, 0.45), radius=(0.35, 0.7),
                      irregularity=(0.03, 0.14), asymmetry=(0.05, 0.4), softness=(0.06, 0.18),
                      nests=0.65, vessels=0.8, white_patch=0.2, dots=0.15, dot_colours=(BLUE_GREY,)),
    "bkl": ClassStyle(palette=(LIGHT_BROWN, TAN, BROWN), variegation=(0.1, 0.5), radius=(0.4, 0.75),
                      irregularity=(0.04, 0.14), asymmetry=(0.05, 0.4), softness=(0.02, 0.07),
                      network=0.15, network_distortion=(0.2, 0.6), dots=0.85, dot_colours=(MILIA, DARK_BROWN),
                      dot_count=(6, 18), scale=0.3),
    "df": ClassStyle(palette=(LIGHT_BROWN, TAN, BROWN), variegation=(0.0, 0.3), radius=(0.28, 0.55),
                     irregularity=(0.0, 0.08), asymmetry=(0.0, 0.2), softness=(0.1, 0.22),
                     network=0.7, network_distortion=(0.0, 0.3), network_periphery=True, white_patch=0.85),
    "mel": ClassStyle(palette=(DARK_BROWN, BLACK, BLUE_GREY, BROWN, RED), variegation=(0.35, 1.0), radius=(0.45, 0.8),
                      irregularity=(0.06, 0.22), asymmetry=(0.2, 0.6), softness=(0.02, 0.12),
                      network=0.6, network_distortion=(0.35, 1.0), dots=0.65, dot_colours=(BLACK, DARK_BROWN),
                      dot_placement="periphery", dot_count=(6, 24), nests=0.25, white_patch=0.15, vessels=0.1),
    "nv": ClassStyle(palette=(BROWN, LIGHT_BROWN, DARK_BROWN, PINK), variegation=(0.0, 0.3), radius=(0.3, 0.62),
                     irregularity=(0.0, 0.07), asymmetry=(0.0, 0.25), softness=(0.03, 0.1),
                     network=0.75, network_distortion=(0.0, 0.3), dots=0.3, dot_colours=(DARK_BROWN, BROWN),
                     dot_placement="centre", dot_count=(4, 12)),
    "vasc": ClassStyle(palette=(RED, PURPLE, DARK_RED, DARK_BROWN), variegation=(0.2, 0.6), radius=(0.28, 0.55),
                       irregularity=(0.0, 0.1), asymmetry=(0.0, 0.3), softness=(0.02, 0.08), lacunae=0.9),
}


class Spots(NamedTuple):
    """Round marks of one kind (dots, nests or lacunae) in lesion coordinates."""

    centres: np.ndarray  # (N, 2)
    sigmas: np.ndarray  # (N,)
    colours: np.ndarray  # (N, 3)
    sharpness: float  # 1 Gaussian dot, > 1 flat-topped clod
    opacity: float


@dataclass
class Lesion:
    """One synthetic lesion, in its own coordinate frame; `photograph` renders a view of it."""

    label: str
    skin: np.ndarray  # (3,)
    radius: float
    elongation: float
    axis: float
    harmonics: np.ndarray  # (K, 3): order, amplitude, phase
    bulge: tuple[float, float]  # amplitude, direction
    softness: float
    palette: np.ndarray  # (P, 3)
    variegation: float
    colour_fields: list[FourierField]
    edge_field: FourierField
    network: tuple[float, float, float, float] | None  # strength, period, distortion, angle
    network_periphery: bool
    warp_fields: tuple[FourierField, FourierField]
    spots: list[Spots]
    vessels: list[tuple[np.ndarray, float]]  # polylines (points, width) in lesion coordinates
    white_patch: tuple[np.ndarray, float, float] | None  # centre, radius, opacity
    scale_field: FourierField | None


def _uniform(rng: np.random.Generator, bounds: Range) -> float:
    return float(rng.uniform(*bounds))


def _spot_centres(rng: np.random.Generator, n: int, radius: float, placement: str) -> np.ndarray:
    reach = {"uniform": (0.0, 0.85), "centre": (0.0, 0.45), "periphery": (0.6, 0.95)}[placement]
    r = radius * np.sqrt(rng.uniform(reach[0] ** 2, reach[1] ** 2, n))
    theta = rng.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1).astype(np.float32)


def sample_lesion(label: str, rng: np.random.Generator) -> Lesion:
    style = STYLES[label]
    light, dark = np.array([0.94, 0.80, 0.72]), np.array([0.72, 0.52, 0.42])
    skin = light + rng.random() * (dark - light) + rng.normal(0, 0.02, 3)
    radius = _uniform(rng, style.radius)
    asymmetry = _uniform(rng, style.asymmetry)
    orders = np.arange(2, 8)
    harmonics = np.stack([orders, _uniform(rng, style.irregularity) * rng.random(6) / orders**0.5,
                          rng.uniform(0, 2 * np.pi, 6)], axis=1)
    palette = np.array(style.palette)
    lead = 0 if rng.random() < 0.65 else int(rng.integers(1, len(palette)))  # some lesions lead with another colour
    palette[[0, lead]] = palette[[lead, 0]]
    palette = palette * rng.normal(1.0, 0.08, (len(palette), 1)) + rng.normal(0, 0.04, (len(palette), 3))
    spots = []
    if rng.random() < style.dots:
        n = int(rng.integers(*style.dot_count))
        centres = _spot_centres(rng, n, radius, style.dot_placement)
        colours = np.array(style.dot_colours)[rng.integers(0, len(style.dot_colours), n)]
        spots.append(Spots(centres, rng.uniform(0.018, 0.04, n).astype(np.float32), colours, 1.0, 0.9))
    if rng.random() < style.nests:
        n = int(rng.integers(2, 7))
        spots.append(Spots(_spot_centres(rng, n, radius, "uniform"), rng.uniform(0.05, 0.11, n).astype(np.float32),
                           np.tile(BLUE_GREY, (n, 1)) * rng.normal(1, 0.05, (n, 1)), 1.5, 0.8))
    if rng.random() < style.lacunae:
        n = int(rng.integers(5, 14))
        colours = np.array([RED, PURPLE, DARK_RED])[rng.integers(0, 3, n)]
        spots.append(Spots(_spot_centres(rng, n, radius, "uniform"), rng.uniform(0.05, 0.1, n).astype(np.float32),
                           colours, 2.5, 0.95))
    vessels = []
    if rng.random() < style.vessels:
        for _ in range(int(rng.integers(1, 4))):
            vessels += branching_tree(rng, _spot_centres(rng, 1, radius, "periphery")[0], rng.uniform(0, 2 * np.pi),
                                      radius * rng.uniform(0.5, 0.9), rng.uniform(0.012, 0.02) * 2, depth=2)
    white_patch = None
    if rng.random() < style.white_patch:
        white_patch = (rng.normal(0, 0.08 * radius, 2).astype(np.float32), radius * rng.uniform(0.25, 0.5),
                       rng.uniform(0.6, 0.95))
    network = None
    if rng.random() < style.network:
        network = (rng.uniform(0.3, 0.6), rng.uniform(0.11, 0.16), _uniform(rng, style.network_distortion),
                   rng.uniform(0, np.pi))
    return Lesion(
        label=label, skin=np.clip(skin, 0, 1), radius=radius, elongation=rng.uniform(0, 0.25) + 0.3 * asymmetry,
        axis=rng.uniform(0, np.pi), harmonics=harmonics, bulge=(asymmetry * 0.5, rng.uniform(0, 2 * np.pi)),
        softness=_uniform(rng, style.softness), palette=np.clip(palette, 0, 1),
        variegation=_uniform(rng, style.variegation),
        colour_fields=[FourierField.sample(rng, 10, 2.0, 9.0) for _ in style.palette],
        edge_field=FourierField.sample(rng, 12, 8.0, 30.0),
        network=network, network_periphery=style.network_periphery,
        warp_fields=(FourierField.sample(rng, 8, 3.0, 12.0), FourierField.sample(rng, 8, 3.0, 12.0)),
        spots=spots, vessels=vessels, white_patch=white_patch,
        scale_field=FourierField.sample(rng, 16, 15.0, 45.0) if rng.random() < style.scale else None,
    )


def _outline(lesion: Lesion, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    """(mask in [0, 1], rho / r(phi): 0 at the centre, 1 on the border) over a frame in lesion coordinates."""
    stretch = np.diag([1 / (1 + lesion.elongation), 1 + 0.5 * lesion.elongation]) @ rotation(lesion.axis)
    u = frame.then(stretch).coords
    rho = np.sqrt((u**2).sum(0)) + 1e-6
    phi = np.arctan2(u[1], u[0])
    edge = 1.0 + sum(a * np.cos(k * phi + p) for k, a, p in lesion.harmonics)
    bulge, direction = lesion.bulge
    roughness = 0.04 * lesion.harmonics[:, 1].sum() * lesion.edge_field(frame)
    boundary = lesion.radius * edge * (1 + bulge * np.cos(phi - direction)) * (1 + roughness)
    mask = sigmoid((boundary - rho) / (lesion.softness * lesion.radius + 1e-3))
    return mask, rho / boundary


def photograph(lesion: Lesion, size: int, rng: np.random.Generator) -> np.ndarray:
    """One dermoscopy-like view (uint8 H x W x 3) of `lesion`: its own pose, hairs, light and noise."""
    image_frame = Frame(size)
    scale = rng.uniform(0.85, 1.15)
    mirror = np.diag([-1.0, 1.0]) if rng.random() < 0.5 else np.eye(2)
    pose = mirror @ rotation(rng.uniform(0, 2 * np.pi)) / scale
    frame = image_frame.then(pose, -pose @ rng.uniform(-0.12, 0.12, 2))  # image -> lesion coordinates
    q = frame.coords
    mask, rel = _outline(lesion, frame)
    px_per_unit = size / 2 * scale

    # Skin with faint texture; pigment = palette colours mixed in patches, darker towards the bulge
    # (asymmetric pigment), a little darker in the centre than at the rim.
    skin = lesion.skin * (1 + 0.03 * FourierField.sample(rng, 8, 6.0, 25.0)(image_frame))[..., None]
    logits = np.stack([f(frame) for f in lesion.colour_fields], axis=-1) * (4 * lesion.variegation)
    logits[..., 0] += 3.0 * (1 - lesion.variegation)
    bulge, direction = lesion.bulge
    towards_bulge = q[0] * np.cos(direction) + q[1] * np.sin(direction)
    logits += (2.0 * bulge * towards_bulge)[..., None] * np.linspace(1, -1, len(lesion.palette))
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    pigment = (weights / weights.sum(-1, keepdims=True)) @ lesion.palette
    pigment *= (0.85 + 0.2 * np.clip(rel, 0, 1))[..., None]
    image = over(skin, pigment, mask * 0.92)

    if lesion.network is not None:
        strength, period, distortion, angle = lesion.network
        warp = distortion * period * 0.8 * np.stack([lesion.warp_fields[0](frame), lesion.warp_fields[1](frame)])
        v = (frame.then(rotation(angle)).coords + warp) * (np.pi / period)
        lines = np.maximum(np.exp(-np.sin(v[0]) ** 2 / 0.12), np.exp(-np.sin(v[1]) ** 2 / 0.12))
        patchy = sigmoid((lesion.warp_fields[0](frame.then(1.7 * np.eye(2))) + 1.2 - 2.5 * distortion) * 3)
        region = mask * (sigmoid((rel - 0.55) * 12) if lesion.network_periphery else 1.0)
        image = image * (1 - strength * (lines * patchy * region)[..., None])
    if lesion.scale_field is not None:
        flakes = sigmoid((lesion.scale_field(frame) - 0.9) * 5) * mask
        image = over(image, np.array(WHITE), 0.55 * flakes)
    if lesion.white_patch is not None:
        centre, radius, opacity = lesion.white_patch
        d = np.sqrt(((q - centre[:, None, None]) ** 2).sum(0))
        image = over(image, np.array(WHITE) * 0.97, opacity * sigmoid((radius - d) / (0.25 * radius)) * mask)
    for spots in lesion.spots:
        alpha, colour = blobs(q, spots.centres, spots.sigmas, spots.colours, spots.sharpness)
        image = over(image, colour, spots.opacity * alpha * np.clip(mask * 1.3, 0, 1))
    if lesion.vessels:
        lines = [(frame.to_pixels(points), width * px_per_unit) for points, width in lesion.vessels]
        image = over(image, np.array(RED) * 0.9, 0.85 * draw_lines(size, lines) * mask)

    # Class-free nuisances of a real photograph.
    n_hairs = rng.poisson(rng.choice([0.3, 2.5]))
    if n_hairs:
        hairs = [(image_frame.to_pixels(bezier(*rng.uniform(-1.2, 1.2, (3, 2)))), rng.uniform(0.6, 1.3) * size / 64)
                 for _ in range(n_hairs)]
        image = over(image, np.full(3, rng.uniform(0.08, 0.25)), 0.9 * draw_lines(size, hairs))
    grid = image_frame.coords
    angle = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0, 0.12) * (grid[0] * np.cos(angle) + grid[1] * np.sin(angle))
    image = image * light[..., None] * rng.uniform(0.85, 1.12) * rng.normal(1.0, 0.05, 3)  # exposure, white balance
    if rng.random() < 0.5:  # the dermatoscope's round field of view
        radial = np.sqrt((grid**2).sum(0))
        image = image * sigmoid((rng.uniform(1.0, 1.35) - radial) / 0.04)[..., None]
    image = image + rng.normal(0, rng.uniform(0.005, 0.025), (size, size, 3))
    out = Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8))
    blur = rng.uniform(0, 0.6) * size / 64
    return np.asarray(out.filter(ImageFilter.GaussianBlur(blur)) if blur > 0.2 else out)


def make_toy_dataset(out_dir: str | os.PathLike, n_per_class: int = 16, size: int = 64, seed: int = 0, *,
                     overwrite: bool = False) -> Path:
    """Write `out_dir/labels.csv` (image,label,group_id,view) and `out_dir/images/<class>/*.png`.

    Each class gets exactly `n_per_class` images from lesions photographed 1-3 times each.
    Returns the path of labels.csv.
    """
    if n_per_class < 1:
        raise InputError(f"n_per_class must be >= 1, got {n_per_class}")
    if size < 32:
        raise InputError(f"size must be >= 32 px (64 or 128 recommended), got {size}")
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency

    out_dir = check_replaceable(out_dir, "toy-data", overwrite, what="toy data folder")
    rows = []
    # The matrices here are tiny (64 x 10); BLAS threads only add overhead (twice as slow measured).
    with threadpool_limits(1, user_api="blas"), atomic_dir(out_dir) as tmp:
        for class_index, label in enumerate(STYLES):
            (tmp / "images" / label).mkdir(parents=True)
            made, lesion_index = 0, 0
            while made < n_per_class:
                rng = np.random.default_rng([seed, class_index, lesion_index])
                lesion = sample_lesion(label, rng)
                group_id = f"toy-{label}-{lesion_index:04d}"
                for view in range(min(int(rng.integers(1, 4)), n_per_class - made)):
                    image = f"images/{label}/{group_id}-{view}.png"
                    Image.fromarray(photograph(lesion, size, rng)).save(tmp / image, compress_level=1)
                    rows.append({"image": image, "label": label, "group_id": group_id, "view": view})
                    made += 1
                lesion_index += 1
        pd.DataFrame(rows).to_csv(tmp / "labels.csv", index=False)  # the folder as a whole is atomic
        write_marker(tmp, "toy-data")
    return Path(out_dir) / "labels.csv"
