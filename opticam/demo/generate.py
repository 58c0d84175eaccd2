"""A deterministic synthetic image-classification dataset with ground-truth boxes.

Every image is 128x128 RGB and holds exactly one class object (one of ten shapes)
at a random position, size, rotation and colour, drawn over a cluttered background:
smooth colour gradients, low-frequency noise, stripes, soft blobs, pixel noise, and
distractors that belong to no class (thin curves, small dots, small irregular blobs,
some in the object's own hue). Background and distractors are drawn independently
of the label, so the only evidence for the class is the object itself: a classifier
trained on this data must look at the object, which is what makes saliency maps and
their localization scores meaningful on it.

Sample ``index`` under ``seed`` depends on ``(seed, index)`` alone: its random
generator is ``numpy.random.default_rng([seed, index])``. Shards written twice with
the same arguments are byte-identical.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CLASS_NAMES",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "generate_batch",
    "generate_sample",
    "make_shards",
    "save_gallery",
]

IMAGE_SIZE = 128
CLASS_NAMES: tuple[str, ...] = (
    "disc",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "hexagon",
    "crescent",
    "arrow",
    "heart",
)
NUM_CLASSES = len(CLASS_NAMES)

# Object radius in pixels (every shape fits in the unit circle before scaling), so
# objects are roughly 34-64 pixels long. The smallest object is still clearly larger
# than the largest distractor blob (radius <= 9), which keeps the task well posed.
_MIN_RADIUS = 17.0
_MAX_RADIUS = 32.0
# The object's coverage is rendered at this many times the output resolution and box
# filtered down, which antialiases its edges like a photographed object.
_SUPERSAMPLE = 4
_JPEG_QUALITY = 95

Polygon = list[tuple[float, float]]

# Pixel coordinate grids (row index, column index), float32 (S,S); shared, read-only.
_ROWS, _COLS = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
_ROWS.flags.writeable = False
_COLS.flags.writeable = False


def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> Polygon:
    return [
        (
            radius * math.cos(phase + 2 * math.pi * k / n),
            radius * math.sin(phase + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _star(points: int = 5, inner: float = 0.42) -> Polygon:
    out: Polygon = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + math.pi * k / points
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _heart() -> Polygon:
    # The classic parametric heart, scaled into the unit circle, tip pointing down.
    out: Polygon = []
    for t in np.linspace(0, 2 * math.pi, 64, endpoint=False):
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        out.append((x / 17.0, -(y + 2.5) / 17.0))
    return out


def _circle(radius: float, cx: float = 0.0, cy: float = 0.0, n: int = 64) -> Polygon:
    return [
        (cx + radius * math.cos(2 * math.pi * k / n), cy + radius * math.sin(2 * math.pi * k / n))
        for k in range(n)
    ]


# Each class: polygons in unit coordinates, each with the coverage value it paints
# (255 fills, 0 cuts a hole), drawn in order.
_SHAPES: dict[str, list[tuple[Polygon, int]]] = {
    "disc": [(_circle(0.92), 255)],
    "square": [(_regular(4, 1.0, math.pi / 4), 255)],
    "triangle": [(_regular(3, 1.0), 255)],
    "star": [(_star(), 255)],
    "cross": [
        (
            [
                (-0.3, -1.0),
                (0.3, -1.0),
                (0.3, -0.3),
                (1.0, -0.3),
                (1.0, 0.3),
                (0.3, 0.3),
                (0.3, 1.0),
                (-0.3, 1.0),
                (-0.3, 0.3),
                (-1.0, 0.3),
                (-1.0, -0.3),
                (-0.3, -0.3),
            ],
            255,
        )
    ],
    "ring": [(_circle(0.95), 255), (_circle(0.55), 0)],
    "hexagon": [(_regular(6, 1.0), 255)],
    "crescent": [(_circle(0.95), 255), (_circle(0.8, 0.42, -0.12), 0)],
    "arrow": [
        (
            [
                (-1.0, -0.2),
                (0.1, -0.2),
                (0.1, -0.58),
                (1.0, 0.0),
                (0.1, 0.58),
                (0.1, 0.2),
                (-1.0, 0.2),
            ],
            255,
        )
    ],
    "heart": [(_heart(), 255)],
}
assert tuple(_SHAPES) == CLASS_NAMES


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (all in [0,1]) -> RGB float array (3,) in [0,1]."""
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float64)


def _smooth_noise(rng: np.random.Generator, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise in about [-1,1]: a random grid upsampled bicubically, (S,S,C)."""
    grid = rng.uniform(-1.0, 1.0, size=(channels, cells, cells)).astype(np.float32)
    out = np.empty((IMAGE_SIZE, IMAGE_SIZE, channels), dtype=np.float32)
    for c in range(channels):
        img = Image.fromarray(grid[c], mode="F").resize(
            (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC
        )
        out[..., c] = np.asarray(img)
    return out


def _background(rng: np.random.Generator) -> np.ndarray:
    """Cluttered background, float (S,S,3) in [0,1]."""
    s = IMAGE_SIZE
    yy, xx = _ROWS / (s - 1), _COLS / (s - 1)
    c0 = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.8), rng.uniform(0.15, 0.95))
    c1 = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.8), rng.uniform(0.15, 0.95))
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (math.cos(angle) * (xx - 0.5) + math.sin(angle) * (yy - 0.5)) / math.sqrt(0.5) + 0.5
    ramp = np.clip(ramp, 0.0, 1.0)[..., None]
    bg = (1 - ramp) * c0.astype(np.float32) + ramp * c1.astype(np.float32)
    bg = bg + rng.uniform(0.05, 0.2) * _smooth_noise(rng, int(rng.integers(3, 9)), 3)
    if rng.uniform() < 0.6:
        # Stripes: a tinted sinusoid at a random orientation and period.
        phi = rng.uniform(0, math.pi)
        period = rng.uniform(5.0, 24.0) / s
        wave = np.sin(
            2 * math.pi * (math.cos(phi) * xx + math.sin(phi) * yy) / period
            + rng.uniform(0, 2 * math.pi)
        )
        tint = rng.uniform(-1.0, 1.0, size=3).astype(np.float32)
        bg = bg + rng.uniform(0.03, 0.12) * wave[..., None] * tint
    for _ in range(int(rng.integers(0, 5))):
        # Soft Gaussian blobs of a random colour.
        cx, cy = rng.uniform(0, 1, size=2)
        sx, sy = rng.uniform(0.05, 0.3, size=2)
        weight = 0.6 * np.exp(-(((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2) / 2)[..., None]
        colour = _hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0))
        bg = (1 - weight) * bg + weight * colour.astype(np.float32)
    sigma = np.float32(rng.uniform(0.0, 0.04))
    bg = bg + sigma * rng.standard_normal(size=bg.shape, dtype=np.float32)
    return np.clip(bg, 0.0, 1.0)


def _jitter_colour(rng: np.random.Generator, hsv: tuple[float, float, float]) -> tuple[int, ...]:
    h, s, v = hsv
    rgb = _hsv_to_rgb(
        (h + rng.normal(0, 0.05)) % 1.0,
        float(np.clip(s + rng.normal(0, 0.15), 0, 1)),
        float(np.clip(v + rng.normal(0, 0.15), 0.05, 1)),
    )
    return tuple(int(round(255 * c)) for c in rgb)


def _distractors(rng: np.random.Generator, object_hsv: tuple[float, float, float]) -> Image.Image:
    """Non-class clutter as an RGBA layer (S,S): thin curves, dots, small irregular blobs.

    Drawn at twice the resolution and box filtered down so their edges look like the
    object's; about half of them take a colour near the object's, so colour alone never
    tells the object apart.
    """
    k = 2
    big = IMAGE_SIZE * k
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)

    def colour() -> tuple[int, ...]:
        if rng.uniform() < 0.5:
            return (*_jitter_colour(rng, object_hsv), 255)
        rgb = _hsv_to_rgb(rng.uniform(), rng.uniform(0, 1), rng.uniform(0.1, 1))
        return (*(int(round(255 * c)) for c in rgb), 255)

    for _ in range(int(rng.integers(1, 6))):
        # Quadratic Bezier curve, 1-3 output pixels wide.
        p = rng.uniform(-0.1, 1.1, size=(3, 2)) * big
        t = np.linspace(0, 1, 40)[:, None]
        pts = (1 - t) ** 2 * p[0] + 2 * (1 - t) * t * p[1] + t**2 * p[2]
        draw.line(
            [tuple(q) for q in pts.tolist()], fill=colour(), width=int(rng.integers(1, 4)) * k
        )
    for _ in range(int(rng.integers(3, 16))):
        r = rng.uniform(1.0, 3.0) * k
        x, y = rng.uniform(0, big, size=2)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour())
    for _ in range(int(rng.integers(0, 4))):
        # Irregular blob: a radius that wobbles with angle.
        r0 = rng.uniform(4.0, 9.0) * k
        x, y = rng.uniform(0, big, size=2)
        n = 24
        harmonics = rng.normal(0, 0.18, size=(3, 2))
        pts = []
        for j in range(n):
            a = 2 * math.pi * j / n
            wobble = sum(
                harmonics[m, 0] * math.cos((m + 2) * a) + harmonics[m, 1] * math.sin((m + 2) * a)
                for m in range(3)
            )
            r = r0 * max(0.3, 1.0 + wobble)
            pts.append((x + r * math.cos(a), y + r * math.sin(a)))
        draw.polygon(pts, fill=colour())
    return layer.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def _object_coverage(
    label: int, cx: float, cy: float, radius: float, angle: float, aspect: float
) -> np.ndarray:
    """Fraction of each pixel covered by the object, float (S,S) in [0,1]."""
    k = _SUPERSAMPLE
    big = IMAGE_SIZE * k
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    ca, sa = math.cos(angle), math.sin(angle)
    for poly, value in _SHAPES[CLASS_NAMES[label]]:
        pts = []
        for u, v in poly:
            # Mild anisotropic stretch, then rotation, then placement; scaled by k
            # to the supersampled canvas.
            u2, v2 = u * aspect, v / aspect
            x = cx + radius * (ca * u2 - sa * v2)
            y = cy + radius * (sa * u2 + ca * v2)
            pts.append((x * k, y * k))
        draw.polygon(pts, fill=value)
    small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def generate_sample(
    index: int, seed: int
) -> tuple[Image.Image, int, tuple[int, int, int, int], np.ndarray]:
    """Draw sample ``index`` of the dataset with seed ``seed``.

    The label is uniform over the classes; the object's centre, radius ``r`` (17-32
    pixels), rotation, slight stretch (aspect in [0.85, 1.15]) and colour are random,
    the object lies entirely inside the image, and its colour is pushed away from the
    background under it when the two would be too alike (so every object is visible).

    Args:
        index: sample number, >= 0.
        seed: dataset seed, >= 0. The generator is ``default_rng([seed, index])``.

    Returns:
        ``(image, label, box, mask)``: the RGB PIL image (128x128); the class index;
        the tight box ``(x0, y0, x1, y1)`` in pixels around the mask, with ``x1, y1``
        exclusive (the mask's pixels are ``x0 <= x < x1``, ``y0 <= y < y1``); the
        binary object mask, bool array (128, 128), True where at least half of the
        pixel is covered by the object.
    """
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(NUM_CLASSES))
    radius = rng.uniform(_MIN_RADIUS, _MAX_RADIUS)
    margin = radius + 2.0
    cx, cy = rng.uniform(margin, IMAGE_SIZE - margin, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    aspect = math.exp(rng.uniform(math.log(0.85), math.log(1.15)))
    hsv = (float(rng.uniform()), float(rng.uniform(0.3, 1.0)), float(rng.uniform(0.2, 1.0)))

    image = _background(rng)
    clutter = np.asarray(_distractors(rng, hsv), dtype=np.float32) / 255.0
    alpha = clutter[..., 3:]
    image = image * (1 - alpha) + clutter[..., :3] * alpha

    coverage = _object_coverage(label, cx, cy, radius, angle, aspect)
    mask = coverage >= 0.5
    base = _hsv_to_rgb(*hsv).astype(np.float32)
    under = image[mask].mean(axis=0)
    if np.abs(base - under).sum() < 0.45:
        # Too close to what lies beneath: flip the value so the object stands out.
        lighter = under.mean() < 0.5
        hsv = (hsv[0], hsv[1], float(rng.uniform(0.8, 1.0) if lighter else rng.uniform(0.0, 0.2)))
        base = _hsv_to_rgb(*hsv).astype(np.float32)
    # Shading across the object plus fine texture, so it is not a flat sticker.
    shade_dir = rng.uniform(0, 2 * math.pi)
    shade = ((_COLS - cx) * math.cos(shade_dir) + (_ROWS - cy) * math.sin(shade_dir)) / radius
    fill = base[None, None, :] * (1 + np.float32(rng.uniform(0.0, 0.25)) * shade[..., None])
    fill = fill + np.float32(0.03) * rng.standard_normal(size=fill.shape, dtype=np.float32)
    cov = coverage[..., None]
    image = image * (1 - cov) + np.clip(fill, 0, 1) * cov
    image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)

    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return Image.fromarray(image, mode="RGB"), label, box, mask


def generate_batch(
    indices: range | list[int], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Generate many samples into arrays.

    Returns:
        ``(images, labels, boxes, masks)``: uint8 (N,128,128,3), int64 (N,),
        int64 (N,4) as ``x0, y0, x1, y1``, bool (N,128,128).
    """
    n = len(indices)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    boxes = np.empty((n, 4), dtype=np.int64)
    masks = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for i, index in enumerate(indices):
        image, label, box, mask = generate_sample(index, seed)
        images[i] = np.asarray(image)
        labels[i] = label
        boxes[i] = box
        masks[i] = mask
    return images, labels, boxes, masks


def encode_jpeg(image: Image.Image, quality: int = _JPEG_QUALITY) -> bytes:
    """JPEG bytes of an RGB image (baseline, no EXIF, so the bytes depend on pixels only)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_shards(
    url: str,
    shards: int,
    per_shard: int,
    seed: int,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write ``shards * per_shard`` generated samples as WebDataset shards.

    Shard ``i`` is ``{url}/demo-{i:06d}.tar`` and holds samples ``i*per_shard ...
    (i+1)*per_shard - 1``, each with members ``jpg`` (JPEG, quality 95), ``cls``
    (label as text) and ``json`` (``{"label", "class_name", "boxes": [[x0,y0,x1,y1]]}``,
    pixels of the stored image). Keys are ``{seed:06d}-{index:08d}``. The same
    arguments always give byte-identical shards.

    Args:
        url: folder or prefix URL (local path, ``file://``, ``s3://``, any fsspec).
        shards: number of shards, >= 1.
        per_shard: samples per shard, >= 1.
        seed: dataset seed, >= 0. Note that the bundled classifier was trained on
            seeds 1000 and 1001 (see ``opticam.demo.train``); use any other seed for
            held-out data.
        storage_options: extra fsspec options (endpoint, credentials, ...).

    Returns:
        The URLs of the shards written, in order.
    """
    if shards < 1 or per_shard < 1:
        raise ValueError(f"shards and per_shard must be >= 1, got {shards} and {per_shard}")
    # Imported here so that generating images (and training) needs no webdataset.
    from opticam.data.writer import ShardWriter

    pattern = url.rstrip("/") + "/demo-%06d.tar"
    with ShardWriter(pattern, per_shard, storage_options=storage_options) as writer:
        for index in range(shards * per_shard):
            image, label, box, _ = generate_sample(index, seed)
            writer.write(
                {
                    "__key__": f"{seed:06d}-{index:08d}",
                    "jpg": encode_jpeg(image),
                    "cls": label,
                    "json": {
                        "label": label,
                        "class_name": CLASS_NAMES[label],
                        "boxes": [list(box)],
                    },
                }
            )
    return list(writer.urls)


def save_gallery(path: str, seed: int = 0, columns: int = 5, scale: int = 2) -> None:
    """Save a grid with one sample per class, its box drawn in red and its name below.

    Args:
        path: output PNG path (local).
        seed: dataset seed; for each class the first sample of that class is shown.
        columns: images per row.
        scale: each image is enlarged this many times (nearest neighbour).
    """
    found: dict[int, tuple[Image.Image, tuple[int, int, int, int]]] = {}
    index = 0
    while len(found) < NUM_CLASSES:
        image, label, box, _ = generate_sample(index, seed)
        found.setdefault(label, (image, box))
        index += 1
    cell = IMAGE_SIZE * scale
    caption = 14
    pad = 4
    rows = math.ceil(NUM_CLASSES / columns)
    sheet = Image.new(
        "RGB", (columns * (cell + pad) + pad, rows * (cell + caption + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for label in range(NUM_CLASSES):
        image, (x0, y0, x1, y1) = found[label]
        big = image.resize((cell, cell), Image.Resampling.NEAREST)
        bdraw = ImageDraw.Draw(big)
        # The box's x1/y1 are exclusive; the outline goes on the last pixel inside.
        bdraw.rectangle(
            [x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], outline=(255, 0, 0), width=2
        )
        col, row = label % columns, label // columns
        left = pad + col * (cell + pad)
        top = pad + row * (cell + caption + pad)
        sheet.paste(big, (left, top))
        draw.text((left + 2, top + cell + 1), f"{label}: {CLASS_NAMES[label]}", fill="black")
    sheet.save(path, format="PNG")
