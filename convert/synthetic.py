"""Procedural lesion-like photos: skin-toned background, a darker blob, hair, noise.

Used to build and check the demo model, to measure FP32 parity when no clinic photos
are given, for golden vectors, and by the server's tests and benchmarks. Every image is
a pure function of (seed, index, size), so a list is reproducible whatever its length.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

FAMILIES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

# Per family: main colour, second colour, radius range (fraction of the short side),
# border irregularity, texture strength, edge softness (fraction of the radius).
# Each family's colours are its own (bkl yellowish, df a mauve ring, bcc pink-violet),
# so a small network learns them apart: the demo is trained on these families.
_STYLE = {
    "akiec": ((196, 112, 100), (232, 200, 190), (0.16, 0.30), 0.14, 0.55, 0.10),
    "bcc": ((214, 150, 176), (170, 70, 110), (0.12, 0.24), 0.08, 0.20, 0.05),
    "bkl": ((170, 150, 70), (140, 118, 52), (0.16, 0.30), 0.10, 0.35, 0.04),
    "df": ((140, 84, 96), (214, 184, 170), (0.08, 0.15), 0.05, 0.15, 0.12),
    "mel": ((62, 36, 30), (96, 92, 118), (0.14, 0.30), 0.28, 0.45, 0.06),
    "nv": ((104, 64, 44), (92, 56, 38), (0.10, 0.20), 0.03, 0.08, 0.08),
    "vasc": ((152, 38, 62), (108, 30, 74), (0.08, 0.18), 0.06, 0.20, 0.05),
}
_SKIN_LIGHT = np.array([238, 204, 182], np.float32)
_SKIN_DARK = np.array([128, 86, 62], np.float32)


def synthetic_photos(n: int, seed: int, size: tuple[int, int] = (320, 256)) -> list[Image.Image]:
    """`n` lesion-like RGB photos of `size` (width, height), families mixed, deterministic in `seed`."""
    return synthetic_lesions(n, seed, size)[0]


def synthetic_lesions(
    n: int, seed: int, size: tuple[int, int] = (320, 256), families: list[int] | None = None
) -> tuple[list[Image.Image], list[int]]:
    """Photos and the family index (into FAMILIES) each was drawn from."""
    children = np.random.SeedSequence(seed).spawn(n)
    images, labels = [], []
    for i, child in enumerate(children):
        rng = np.random.default_rng(child)
        family = families[i] if families is not None else int(rng.integers(len(FAMILIES)))
        images.append(draw_lesion(rng, FAMILIES[family], size))
        labels.append(family)
    return images, labels


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bicubically."""
    gw, gh = max(2, cells * w // max(w, h)), max(2, cells * h // max(w, h))
    grid = rng.uniform(0, 255, (gh, gw)).astype(np.uint8)
    up = Image.fromarray(grid, "L").resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(up, np.float32) / 127.5 - 1.0


def draw_lesion(rng: np.random.Generator, family: str, size: tuple[int, int]) -> Image.Image:
    """One photo of a lesion of `family` on skin."""
    w, h = size
    main, second, radius_range, irregular, texture, soft = _STYLE[family]
    # Skin: a tone, a lighting gradient, a little mottling.
    skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * rng.uniform(0.0, 0.8) + rng.normal(0, 6, 3)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    light = 1.0 + 0.12 * ((xs / w - 0.5) * np.cos(angle) + (ys / h - 0.5) * np.sin(angle))
    img = skin[None, None, :] * light[..., None]
    img += 10.0 * _smooth_noise(rng, w, h, 12)[..., None]

    # The lesion: a blob with a wobbling border, two-tone interior, texture.
    short = min(w, h)
    r0 = short * rng.uniform(*radius_range)
    cx = w / 2 + rng.normal(0, short * 0.06)
    cy = h / 2 + rng.normal(0, short * 0.06)
    dx, dy = xs - cx, ys - cy
    theta = np.arctan2(dy, dx)
    stretch = rng.uniform(0.75, 1.25)
    dist = np.sqrt((dx * stretch) ** 2 + (dy / stretch) ** 2)
    border = np.ones_like(theta)
    for k in range(2, 7):
        border += irregular * rng.uniform(0.2, 1.0) / (k - 1) ** 0.5 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    edge = (r0 * border - dist) / max(1.0, soft * r0)
    mask = 1.0 / (1.0 + np.exp(-np.clip(edge, -30, 30)))

    mix = 0.5 + 0.5 * _smooth_noise(rng, w, h, 6)
    if family == "df":  # a pale centre in a brown ring
        mix = np.clip(1.3 - dist / (0.6 * r0), 0, 1)
    colour = np.array(main, np.float32) + rng.normal(0, 8, 3)
    colour2 = np.array(second, np.float32) + rng.normal(0, 8, 3)
    lesion = colour[None, None, :] * (1 - mix[..., None]) + colour2[None, None, :] * mix[..., None] * 0.6 + colour[None, None, :] * mix[..., None] * 0.4
    lesion += texture * 40.0 * _smooth_noise(rng, w, h, 40)[..., None]
    img = img * (1 - mask[..., None]) + lesion * mask[..., None]

    photo = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(photo)
    scale = short / 256
    if family == "bcc":  # fine red vessels across the lesion
        for _ in range(int(rng.integers(3, 7))):
            pts = [(cx + rng.normal(0, r0 * 0.5), cy + rng.normal(0, r0 * 0.5)) for _ in range(3)]
            draw.line(pts, fill=(170, 40, 50), width=max(1, int(round(1.2 * scale))))
    if family == "akiec":  # whitish scale flecks
        for _ in range(int(rng.integers(10, 25))):
            x, y = cx + rng.normal(0, r0 * 0.6), cy + rng.normal(0, r0 * 0.6)
            s = rng.uniform(1, 3) * scale
            draw.ellipse([x - s, y - s, x + s, y + s], fill=(236, 226, 220))
    if family == "mel":  # dark globules off-centre
        for _ in range(int(rng.integers(4, 12))):
            x, y = cx + rng.normal(0, r0 * 0.5), cy + rng.normal(0, r0 * 0.5)
            s = rng.uniform(1.5, 4) * scale
            draw.ellipse([x - s, y - s, x + s, y + s], fill=(30, 20, 22))
    for _ in range(int(rng.integers(0, 6))):  # hair
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        heading = rng.uniform(0, 2 * np.pi)
        pts = []
        for _ in range(6):
            pts.append((x, y))
            heading += rng.normal(0, 0.25)
            step = rng.uniform(0.05, 0.12) * short
            x, y = x + step * np.cos(heading), y + step * np.sin(heading)
        draw.line(pts, fill=tuple(int(c) for c in rng.uniform(20, 60, 3)), width=max(1, int(round(rng.uniform(1, 2.5) * scale))))

    photo = photo.filter(ImageFilter.GaussianBlur(radius=0.6 * scale))
    arr = np.asarray(photo, np.float32) + rng.normal(0, rng.uniform(2, 6), (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
