"""Far target domains: digits the prior never saw, made offline from fonts and geometry (pure functions).

The near domains (`domains.py`) shift held-out MNIST digits; these are drawn from scratch, so they are as far
from the prior's training data as we like, in any quantity. Every domain yields [n, 32, 32] uint8 grayscale
images labelled 0-9 as a deterministic function of (domain name, split, seed), on this installation (glyphs
come from the TrueType fonts matplotlib ships, rasterised by Pillow's FreeType):

- ``fonts``: printed digits in 21 of matplotlib's fonts, white on black, jittered per image;
- ``sevenseg``: seven-segment display digits drawn as anti-aliased bars, jittered per image;
- ``textured``: the ``fonts`` digits on a grey textured background (gradient, blotches, synthetic texture);
- ``inverted``: the ``fonts`` digits as dark ink on white paper: outside what the prior can draw
  (``reachable=False``).

No network, no scikit-learn; textures are synthetic (gratings, grain, bricks), so the output does not
depend on which optional packages are installed. Run ``python -m pipeline.evaluation.far_domains [PATH]``
to save a preview grid (10 per class per domain).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "FAR_DOMAINS",
    "FONT_FILES",
    "FarDomain",
    "FarDomainSpec",
    "make_far_domain",
    "preview",
    "render_far",
    "write_domain",
]

SIZE = 32  # output side, px
_SS = 2  # supersampling factor of the font renderer
_CANVAS = 64  # side of one cached glyph canvas, px
_GLYPH_PX = 48  # the largest glyph side in its canvas, px (about 2 canvas px per output sub-pixel)
_CHUNK = 256  # images per grid_sample batch (bounds memory)

#: Fonts shipped in matplotlib's ``fonts/ttf`` whose digits render as ordinary lining figures (the symbol
#: and size-variant fonts have no digits; cmmi10 has old-style figures, cmex10/cmsy10 are symbols).
FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmti10.ttf",
)
_BOLD = np.array([("Bol" in name) or name == "cmb10.ttf" for name in FONT_FILES])


# ----------------------------------------------------------------------------------------------------------
# shared helpers


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _render_glyph(path: Path, digit: int) -> np.ndarray:
    """One digit of one font, cropped to its ink, with its longer side scaled to `_GLYPH_PX` px."""
    from PIL import Image, ImageDraw, ImageFont

    def draw(size: int) -> np.ndarray:
        font = ImageFont.truetype(str(path), size)
        im = Image.new("L", (3 * size, 3 * size), 0)
        ImageDraw.Draw(im).text((size, size // 2), str(digit), font=font, fill=255)
        a = np.asarray(im)
        ys, xs = np.nonzero(a)
        if len(ys) == 0:
            raise ValueError(f"font {path.name} renders no ink for digit {digit}")
        return a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]

    probe = draw(64)
    return draw(max(8, int(64 * _GLYPH_PX / max(probe.shape))))


@functools.lru_cache(maxsize=1)
def _glyph_bank() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (font, digit) glyph centred in a `_CANVAS`² canvas: [F·10, 1, C, C] float in [0, 1], and each
    glyph's ink height and width in canvas px ([F·10] each); row f·10 + d is font f, digit d."""
    folder = _font_dir()
    missing = [name for name in FONT_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"matplotlib's font folder {folder} lacks {missing}")
    canvases, heights, widths = [], [], []
    for name in FONT_FILES:
        for digit in range(10):
            g = _render_glyph(folder / name, digit)
            h, w = g.shape
            c = np.zeros((_CANVAS, _CANVAS), dtype=np.float32)
            top, left = (_CANVAS - h) // 2, (_CANVAS - w) // 2
            c[top : top + h, left : left + w] = g / 255.0
            canvases.append(c)
            heights.append(h)
            widths.append(w)
    bank = torch.from_numpy(np.stack(canvases))[:, None]
    return bank, torch.tensor(heights, dtype=torch.float32), torch.tensor(widths, dtype=torch.float32)


def _blur(x: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """Gaussian blur of each image [n, S, S] by its own σ (px; 0 = none), 7-tap separable kernels."""
    n = len(x)
    t = torch.arange(-3, 4, dtype=torch.float32)
    s = torch.as_tensor(np.maximum(sigma, 1e-3), dtype=torch.float32)[:, None]
    k = torch.exp(-(t[None] ** 2) / (2 * s**2))
    k = k / k.sum(1, keepdim=True)
    y = F.pad(x[None], (3, 3, 3, 3), mode="replicate")
    y = F.conv2d(y, k.view(n, 1, 1, 7), groups=n)
    y = F.conv2d(y, k.view(n, 1, 7, 1), groups=n)
    return y[0]


def _t(a) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.float32)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _centre_room(extent: np.ndarray, jitter: float) -> np.ndarray:
    """How far (px) a shape `extent` px across may move from the centre and keep a 1 px margin, at most `jitter`."""
    return np.clip((SIZE - 2 - extent) / 2, 0, jitter)


# ----------------------------------------------------------------------------------------------------------
# fonts


def _font_alpha(labels: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Ink coverage [n, 32, 32] in [0, 1] of font-rendered `labels`: per image a random font, digit height
    16-26 px, rotation ±10°, a shift of up to ±3 px (kept in frame), a stroke dilation of 0, ½ or 1 px (at
    most ½ px for bold faces) and a blur of σ 0-0.7 px. Rendered at 2× and area-averaged down."""
    bank, heights, widths = _glyph_bank()
    n = len(labels)
    font = rng.integers(0, len(FONT_FILES), n)
    height = rng.uniform(16, 26, n)
    angle = np.deg2rad(rng.uniform(-10, 10, n))
    dilate = rng.choice([0, 1, 2], n, p=[0.4, 0.3, 0.3])  # half-px steps
    dilate = np.where(_BOLD[font], np.minimum(dilate, 1), dilate)  # bold faces: at most ½ px
    sigma = rng.uniform(0, 0.7, n)
    shift = rng.uniform(-1, 1, (n, 2))
    row = torch.as_tensor(font * 10 + np.asarray(labels), dtype=torch.long)
    hg, wg = heights[row].numpy(), widths[row].numpy()
    scale = height / hg  # output px per canvas px
    w_out = wg * scale
    c, s = np.abs(np.cos(angle)), np.abs(np.sin(angle))
    room_x = _centre_room(w_out * c + height * s, 3.0)
    room_y = _centre_room(w_out * s + height * c, 3.0)
    shift = shift * np.stack([room_x, room_y], 1)

    # theta maps output normalised coords to canvas normalised coords: k · R(−angle) · (out − t)
    k = SIZE / (scale * _CANVAS)
    cos, sin = np.cos(angle), np.sin(angle)
    a = np.stack([np.stack([cos, sin], 1), np.stack([-sin, cos], 1)], 1) * k[:, None, None]
    t = shift * 2 / SIZE
    b = -np.einsum("nij,nj->ni", a, t)
    theta = torch.as_tensor(np.concatenate([a, b[:, :, None]], 2), dtype=torch.float32)

    out = torch.empty(n, SIZE, SIZE)
    side = SIZE * _SS
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, lo + _CHUNK)
        m = len(theta[sl])
        grid = F.affine_grid(theta[sl], [m, 1, side, side], align_corners=False)
        x = F.grid_sample(bank[row[sl]], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        for step in (1, 2):  # grey dilation by ½ or 1 px: a (2·step + 1)² max filter at 2× resolution
            pick = torch.as_tensor(np.flatnonzero(dilate[sl] == step))
            if len(pick):
                x[pick] = F.max_pool2d(x[pick], 2 * step + 1, 1, step)
        out[sl] = F.avg_pool2d(x, _SS)[:, 0]
    return _blur(out, sigma).clamp(0, 1)


def fonts(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Printed digits, white on black, in 21 of matplotlib's fonts (DejaVu Sans/Serif/Sans Mono and STIX
    General in four weights/slopes each, Computer Modern cmr10/cmb10/cmss10/cmtt10/cmti10)."""
    return _to_uint8(_font_alpha(labels, rng))


# ----------------------------------------------------------------------------------------------------------
# seven-segment digits

# segments a b c d e f g (top, top right, bottom right, bottom, bottom left, top left, middle)
_SEGMENTS = np.array(
    [
        [1, 1, 1, 1, 1, 1, 0],
        [0, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 1, 0, 1],
        [1, 1, 1, 1, 0, 0, 1],
        [0, 1, 1, 0, 0, 1, 1],
        [1, 0, 1, 1, 0, 1, 1],
        [1, 0, 1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 1, 1],
    ],
    dtype=bool,
)
# each segment's end points in units of (half inner width, half inner height): x right, y down
_ENDS = np.array(
    [
        [[-1, -1], [1, -1]],
        [[1, -1], [1, 0]],
        [[1, 0], [1, 1]],
        [[-1, 1], [1, 1]],
        [[-1, 0], [-1, 1]],
        [[-1, -1], [-1, 0]],
        [[-1, 0], [1, 0]],
    ],
    dtype=np.float64,
)


def _segment_distance(px: torch.Tensor, py: torch.Tensor, ends: torch.Tensor, hexagonal: torch.Tensor):
    """Distance [n, 7, S, S] from pixel centres (px, py: [n, 1, S, S]) to each of 7 bars (`ends`
    [n, 7, 2, 2]): Euclidean to the segment (rounded bar) or, where `hexagonal` [n], |across| + |beyond the
    end| (pointed bar, the classic LCD shape)."""
    p0, p1 = ends[:, :, 0, :, None, None], ends[:, :, 1, :, None, None]  # [n, 7, 2, 1, 1]
    d = p1 - p0
    length = d.pow(2).sum(2).sqrt().clamp_min(1e-6)
    u = d / length[:, :, None]
    rx, ry = px - p0[:, :, 0], py - p0[:, :, 1]
    along = rx * u[:, :, 0] + ry * u[:, :, 1]
    across = (rx * u[:, :, 1] - ry * u[:, :, 0]).abs()
    beyond = (along - length).clamp_min(0) + (-along).clamp_min(0)
    round_d = (across**2 + beyond**2).sqrt()
    return torch.where(hexagonal[:, None, None, None], across + beyond, round_d)


def sevenseg(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Seven-segment display digits: per image a height of 19-27 px, width 0.5-0.68 of it, bar thickness
    2.2-3.6 px, gaps of 0.2-0.9 px between bars, rounded or pointed bars, slant ±12°, a shift of up to ±3 px,
    lit intensity 0.85-1, half of them with the unlit segments faintly visible (10-20%), 7 drawn with the
    top-left bar a quarter of the time, and a blur of σ 0-0.5 px. Anti-aliased analytically."""
    n = len(labels)
    labels = np.asarray(labels)
    height = rng.uniform(19, 27, n)
    width = height * rng.uniform(0.5, 0.68, n)
    thick = rng.uniform(2.2, 3.6, n)
    gap = rng.uniform(0.2, 0.9, n)
    hexagonal = rng.random(n) < 0.5
    slant = np.tan(np.deg2rad(rng.uniform(-12, 12, n)))
    lit = rng.uniform(0.85, 1.0, n)
    faint = np.where(rng.random(n) < 0.5, rng.uniform(0.1, 0.2, n), 0.0)
    seven_f = rng.random(n) < 0.25
    sigma = rng.uniform(0, 0.5, n)
    shift = rng.uniform(-1, 1, (n, 2))
    room_x = _centre_room(width + height * np.abs(slant), 3.0)
    room_y = _centre_room(height, 3.0)
    shift = shift * np.stack([room_x, room_y], 1)

    r = thick / 2
    half = np.stack([width / 2 - r, height / 2 - r], 1)  # bar centre lines
    ends = _ENDS[None] * half[:, None, None, :]  # [n, 7, 2, 2]
    direction = np.sign(ends[:, :, 1] - ends[:, :, 0])  # shorten each bar by r + gap at both ends
    inset = (r + gap)[:, None, None]
    ends[:, :, 0] += direction * inset
    ends[:, :, 1] -= direction * inset
    on = _SEGMENTS[labels].copy()
    on[:, 5] |= (labels == 7) & seven_f

    c = torch.arange(SIZE, dtype=torch.float32) + 0.5 - SIZE / 2
    py, px = c.view(1, SIZE, 1), c.view(1, 1, SIZE)
    py = (py - _t(shift[:, 1])[:, None, None]).expand(n, SIZE, SIZE)[:, None]
    px = (px - _t(shift[:, 0])[:, None, None])[:, None] + py * _t(slant)[:, None, None, None]  # unslant
    dist = _segment_distance(px, py, _t(ends), torch.as_tensor(hexagonal))
    cover = (_t(r)[:, None, None, None] - dist + 0.5).clamp(0, 1)  # [n, 7, S, S]
    weight = torch.where(torch.as_tensor(on), _t(lit)[:, None], _t(faint)[:, None])
    img = (cover * weight[:, :, None, None]).amax(1)
    return _to_uint8(_blur(img, sigma))


# ----------------------------------------------------------------------------------------------------------
# textured backgrounds and inverted ink


def _texture(rng: np.random.Generator, n: int) -> torch.Tensor:
    """A synthetic texture per image [n, 32, 32], zero mean, unit-ish range: an oriented grating, paper grain,
    a brick wall or nothing."""
    c = torch.arange(SIZE, dtype=torch.float32)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    kind = rng.integers(0, 4, n)
    psi = torch.as_tensor(rng.uniform(0, math.pi, n), dtype=torch.float32)[:, None, None]
    freq = torch.as_tensor(rng.uniform(0.08, 0.25, n), dtype=torch.float32)[:, None, None]
    phase = torch.as_tensor(rng.uniform(0, 2 * math.pi, n), dtype=torch.float32)[:, None, None]
    grating = torch.sin(2 * math.pi * freq * (xx * psi.cos() + yy * psi.sin()) + phase)
    grain = _blur(torch.as_tensor(rng.normal(0, 1, (n, SIZE, SIZE)), dtype=torch.float32), np.full(n, 0.7))
    grain = grain / grain.std(dim=(1, 2), keepdim=True).clamp_min(1e-6) * 0.5
    rows = torch.as_tensor(rng.uniform(5, 9, n), dtype=torch.float32)[:, None, None]
    cols = rows * 2
    off = torch.as_tensor(rng.uniform(0, 20, (n, 2)), dtype=torch.float32)
    ry = (yy + off[:, 1, None, None]) / rows
    rx = (xx + off[:, 0, None, None]) / cols + 0.5 * (ry.floor() % 2)
    mortar = ((ry - ry.floor()) < 1 / rows) | ((rx - rx.floor()) < 1 / cols)
    bricks = _blur(torch.where(mortar, -1.0, 0.5), np.full(n, 0.6))
    k = torch.as_tensor(kind)[:, None, None]
    return torch.where(k == 0, grating, torch.where(k == 1, grain, torch.where(k == 2, bricks, 0.0)))


def _background(rng: np.random.Generator, n: int) -> torch.Tensor:
    """Grey backgrounds [n, 32, 32] in [0.15, 0.45]: a linear gradient in a random direction, low-frequency
    blotches (bicubic 4×4 noise) and a texture (`_texture`), mixed with random weights and stretched to a
    random sub-range [lo, hi] of [0.15, 0.45] (hi − lo ≥ 0.06)."""
    c = torch.arange(SIZE, dtype=torch.float32) - SIZE / 2 + 0.5
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    phi = torch.as_tensor(rng.uniform(0, 2 * math.pi, n), dtype=torch.float32)[:, None, None]
    gradient = (xx * phi.cos() + yy * phi.sin()) / SIZE
    blotch = torch.as_tensor(rng.normal(0, 1, (n, 1, 4, 4)), dtype=torch.float32)
    blotch = F.interpolate(blotch, size=(SIZE, SIZE), mode="bicubic", align_corners=False)[:, 0] * 0.5
    w = torch.as_tensor(rng.uniform(0, 1, (n, 3)), dtype=torch.float32)[:, :, None, None]
    bg = w[:, 0] * gradient + w[:, 1] * blotch + (0.3 + w[:, 2]) * _texture(rng, n)
    bg = bg - bg.amin(dim=(1, 2), keepdim=True)
    bg = bg / bg.amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    lo = rng.uniform(0.15, 0.33, n)
    hi = rng.uniform(lo + 0.06, 0.45)
    lo_t = torch.as_tensor(lo, dtype=torch.float32)[:, None, None]
    hi_t = torch.as_tensor(hi, dtype=torch.float32)[:, None, None]
    return lo_t + (hi_t - lo_t) * bg


def textured(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The `fonts` digits at intensity 0.75-1 over a grey textured background (0.15-0.45: gradient,
    blotches and a grating, grain or brick texture)."""
    alpha = _font_alpha(labels, rng)
    bg = _background(rng, len(labels))
    ink = torch.as_tensor(rng.uniform(0.75, 1.0, len(labels)), dtype=torch.float32)[:, None, None]
    return _to_uint8(bg * (1 - alpha) + ink * alpha)


def inverted(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The `fonts` digits as dark ink (intensity 0-40) on white paper (230-255)."""
    alpha = _font_alpha(labels, rng)
    n = len(labels)
    paper = torch.as_tensor(rng.uniform(230, 255, n) / 255, dtype=torch.float32)[:, None, None]
    ink = torch.as_tensor(rng.uniform(0, 40, n) / 255, dtype=torch.float32)[:, None, None]
    return _to_uint8(paper + (ink - paper) * alpha)


# ----------------------------------------------------------------------------------------------------------
# the suite


@dataclass(frozen=True)
class FarDomainSpec:
    name: str
    render: Callable[[np.ndarray, np.random.Generator], np.ndarray]  # (labels [n], rng) -> [n, 32, 32] uint8
    description: str
    reachable: bool  # False: the prior cannot draw it, the reach check should refuse the domain


#: The far suite: digits the prior never saw (see each renderer's docstring for its jitter).
FAR_DOMAINS: dict[str, FarDomainSpec] = {
    d.name: d
    for d in (
        FarDomainSpec("fonts", fonts, "printed digits in 21 fonts, white on black, jittered", True),
        FarDomainSpec("sevenseg", sevenseg, "seven-segment display digits, jittered, faint unlit bars", True),
        FarDomainSpec("textured", textured, "printed digits on grey textured backgrounds (0.15-0.45)", True),
        FarDomainSpec("inverted", inverted, "printed digits, dark ink on white paper", False),
    )
}

_SPLITS = ("refs", "test", "oracle")


def render_far(name: str, labels: np.ndarray, *, seed: int = 0, split: str = "refs") -> np.ndarray:
    """Images [n, 32, 32] uint8 of domain `name` for `labels` [n]: a fixed function of (name, split, seed,
    labels)."""
    if name not in FAR_DOMAINS:
        raise KeyError(f"unknown far domain {name!r}; known: {sorted(FAR_DOMAINS)}")
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, _SPLITS.index(split), *name.encode()])
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError("labels must lie in 0..9")
    if labels.size == 0:
        return np.zeros((0, SIZE, SIZE), dtype=np.uint8)
    with torch.no_grad():
        return FAR_DOMAINS[name].render(labels, rng)


@dataclass
class FarDomain:
    """A far domain's three disjoint draws (different sub-seeds), each [n, 32, 32] uint8 with labels [n]
    int64 sorted by class: references (for `augment --ref`), test images, and oracle images (a large
    labelled sample of the target, for upper-bound comparisons)."""

    spec: FarDomainSpec
    ref_images: np.ndarray
    ref_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    oracle_images: np.ndarray
    oracle_labels: np.ndarray


def make_far_domain(
    name: str,
    *,
    references_per_class: int = 13,
    test_per_class: int = 60,
    oracle_per_class: int = 100,
    seed: int = 0,
) -> FarDomain:
    """Draw domain `name`: `references_per_class`, `test_per_class` and `oracle_per_class` images of each
    digit, from three sub-seeds of `seed`."""
    splits = {}
    for split, per_class in zip(_SPLITS, (references_per_class, test_per_class, oracle_per_class), strict=True):
        labels = np.repeat(np.arange(10, dtype=np.int64), per_class)
        splits[split] = (render_far(name, labels, seed=seed, split=split), labels)
    return FarDomain(FAR_DOMAINS[name], *splits["refs"], *splits["test"], *splits["oracle"])


def _write_pngs(images: np.ndarray, labels: np.ndarray | None, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        sub = folder if labels is None else folder / str(int(labels[i]))
        sub.mkdir(exist_ok=True)
        Image.fromarray(img, mode="L").save(sub / f"{i:05d}.png")


def write_domain(domain: FarDomain, root: Path) -> dict[str, Path]:
    """Save `domain` as PNG folders under `root`: ``refs/<digit>/<i>.png`` (class folders "0".."9", the
    layout the prior's class-conditional model reads), ``refs_flat/<i>.png`` (the same images, unlabelled),
    ``test/<digit>/<i>.png`` and ``oracle/<digit>/<i>.png``. Returns those four folders by name."""
    root = Path(root)
    paths = {k: root / k for k in ("refs", "refs_flat", "test", "oracle")}
    _write_pngs(domain.ref_images, domain.ref_labels, paths["refs"])
    _write_pngs(domain.ref_images, None, paths["refs_flat"])
    _write_pngs(domain.test_images, domain.test_labels, paths["test"])
    _write_pngs(domain.oracle_images, domain.oracle_labels, paths["oracle"])
    return paths


def preview(path: Path, *, per_class: int = 10, seed: int = 0, zoom: int = 3) -> Path:
    """Save a grid PNG: one block per domain (side by side, in `FAR_DOMAINS` order), a row per digit,
    `per_class` columns, each image enlarged `zoom` times."""
    from PIL import Image

    labels = np.repeat(np.arange(10), per_class)
    blocks = []
    for name in FAR_DOMAINS:
        imgs = render_far(name, labels, seed=seed, split="refs").reshape(10, per_class, SIZE, SIZE)
        block = imgs.transpose(0, 2, 1, 3).reshape(10 * SIZE, per_class * SIZE)
        blocks += [block, np.full((10 * SIZE, 8), 128, dtype=np.uint8)]
    grid = np.concatenate(blocks[:-1], axis=1)
    grid = np.kron(grid, np.ones((zoom, zoom), dtype=np.uint8))
    path = Path(path)
    Image.fromarray(grid, mode="L").save(path)
    return path


if __name__ == "__main__":
    print(preview(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/far_domains_preview.png")))
