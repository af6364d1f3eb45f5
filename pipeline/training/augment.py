"""Label-preserving nuisance augmentation for the shipped prior's training data.

A pretrained foundation model has seen far more variation than one clean dataset; MMD guidance can only
move samples within what the prior can draw. So every training image is, with probability
`1 - plain_fraction`, drawn through a random subset of the transforms in TRANSFORMS (stroke width,
slant/rotation/scale/position, resolution, blur, contrast, elastic deformation, pixel noise; each with
probability `p_each`, at least one), with per-sample parameters from one `torch.Generator`
(deterministic). The ranges live in `AugmentRanges`; `augmentation_table()` renders them for the model
card, so the card cannot drift from the code.

Images are [n, C, H, W] in [-1, 1] with background -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentRanges:
    thick_blend: tuple[float, float] = (0.35, 1.0)
    thin_blend: tuple[float, float] = (0.3, 0.7)
    shear: float = 0.35
    degrees: float = 15.0
    scale: tuple[float, float] = (0.75, 1.15)
    shift_px: float = 3.0
    low_res_px: tuple[int, int] = (10, 16)
    blur_sigma: tuple[float, float] = (0.5, 1.3)
    gamma: tuple[float, float] = (0.6, 1.8)
    gain: tuple[float, float] = (0.55, 1.0)
    lift: tuple[float, float] = (0.0, 0.2)
    elastic_px: tuple[float, float] = (0.8, 2.2)
    noise_sigma: tuple[float, float] = (0.02, 0.12)


RANGES = AugmentRanges()
TRANSFORMS = ("stroke", "affine", "resolution", "blur", "contrast", "elastic", "noise")


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _bcast(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def stroke(x: torch.Tensor, g: torch.Generator, r: AugmentRanges = RANGES) -> torch.Tensor:
    """Thicker (dilation) or thinner (erosion) strokes: x + a (pool(x) - x), one direction per image."""
    n = x.shape[0]
    thicker = torch.rand(n, generator=g) < 0.5
    dil = F.max_pool2d(x, 3, stride=1, padding=1)
    ero = -F.max_pool2d(-x, 3, stride=1, padding=1)
    a = torch.where(thicker, _uniform(n, *r.thick_blend, g), _uniform(n, *r.thin_blend, g))
    target = torch.where(_bcast(thicker), dil, ero)
    return x + _bcast(a) * (target - x)


def affine(x: torch.Tensor, g: torch.Generator, r: AugmentRanges = RANGES) -> torch.Tensor:
    """Slant (shear), rotation, scale and translation in one bilinear resampling; background stays -1."""
    n, _, h, w = x.shape
    ang = _uniform(n, -r.degrees, r.degrees, g) * torch.pi / 180
    shear = _uniform(n, -r.shear, r.shear, g)
    s = _uniform(n, *r.scale, g)
    dx, dy = (_uniform(n, -r.shift_px, r.shift_px, g) * 2 / side for side in (w, h))
    shift = torch.stack([dx, dy], 1)
    cos, sin = torch.cos(ang), torch.sin(ang)
    # inverse map output -> input coordinates: (R S)^-1 / s with S = [[1, shear], [0, 1]]
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    sh = torch.zeros(n, 2, 2)
    sh[:, 0, 0] = sh[:, 1, 1] = 1
    sh[:, 0, 1] = shear
    fwd = rot @ sh * _bcast(s)[:, :, :, 0]
    theta = torch.cat([torch.linalg.inv(fwd), -shift[:, :, None]], 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def resolution(x: torch.Tensor, g: torch.Generator, r: AugmentRanges = RANGES) -> torch.Tensor:
    """Down-sample (area) to a random size, then up-sample (bilinear) back: blocky, low-detail digits."""
    out = torch.empty_like(x)
    sizes = torch.randint(r.low_res_px[0], r.low_res_px[1] + 1, (x.shape[0],), generator=g)
    for size in sizes.unique().tolist():
        sel = sizes == size
        low = F.interpolate(x[sel], size=(size, size), mode="area")
        out[sel] = F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return out


def blur(x: torch.Tensor, g: torch.Generator, r: AugmentRanges = RANGES) -> torch.Tensor:
    """Gaussian blur with a per-image σ (separable 7-tap kernel, reflect padding)."""
    n, c = x.shape[:2]
    sigma = _uniform(n, *r.blur_sigma, g)
    taps = torch.arange(-3, 4, dtype=x.dtype)
    k = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*c, 7]
    y = x.reshape(1, n * c, *x.shape[-2:])
    y = F.conv2d(F.pad(y, (3, 3, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="reflect"), k[:, None, :, None], groups=n * c)
    return y.reshape_as(x)


def contrast(x: torch.Tensor, g: torch.Generator, r: AugmentRanges = RANGES) -> torch.Tensor:
    """u' = lift + (gain - lift) u^γ on the [0, 1] scale: fainter or bolder ink, a grey background."""
    n = x.shape[0]
    u = ((x + 1) / 2).clamp(0, 1)
    gamma, gain, lift = (_bcast(_uniform(n, *rng, g)) for rng in (r.gamma, r.gain, r.lift))
    return (lift + (gain - lift) * u.pow(gamma)) * 2 - 1


def elastic(x: torch.Tensor, g: torch.Generator, r: AugmentRanges = RANGES) -> torch.Tensor:
    """Smooth random displacement: a 4x4 field of unit vectors' worth of noise, bicubic-upsampled."""
    n, _, h, w = x.shape
    amp = _uniform(n, *r.elastic_px, g)
    field = torch.randn(n, 2, 4, 4, generator=g)
    field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True)
    field = field / field.flatten(1).std(1).clamp_min(1e-6).view(-1, 1, 1, 1)
    disp = field * amp.view(-1, 1, 1, 1) * torch.tensor([2 / w, 2 / h]).view(1, 2, 1, 1)
    base = F.affine_grid(torch.eye(2, 3).expand(n, 2, 3), [n, 1, h, w], align_corners=False)
    grid = base + disp.permute(0, 2, 3, 1)
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def noise(x: torch.Tensor, g: torch.Generator, r: AugmentRanges = RANGES) -> torch.Tensor:
    """Additive Gaussian pixel noise (σ on the [0, 1] scale)."""
    sigma = _bcast(_uniform(x.shape[0], *r.noise_sigma, g))
    return x + 2 * sigma * torch.randn(x.shape, generator=g)


_FUNCS = {
    "stroke": stroke,
    "affine": affine,
    "resolution": resolution,
    "blur": blur,
    "contrast": contrast,
    "elastic": elastic,
    "noise": noise,
}


def transform(name: str, x: torch.Tensor, generator: torch.Generator, ranges: AugmentRanges = RANGES) -> torch.Tensor:
    """One named transform applied to every image of `x` (for grids and tests)."""
    return _FUNCS[name](x, generator, ranges).clamp(-1, 1)


def nuisance_augment(
    x: torch.Tensor,
    generator: torch.Generator,
    plain_fraction: float = 0.4,
    p_each: float = 0.35,
    ranges: AugmentRanges = RANGES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch; returns (images, mask [n, len(TRANSFORMS)] of the transforms applied).

    A `plain_fraction` of the images is returned unchanged; every other image goes through each
    transform with probability `p_each` (at least one, chosen uniformly when none was drawn), in the
    fixed order of TRANSFORMS (geometry before blur/contrast, noise last).
    """
    n = x.shape[0]
    augmented = torch.rand(n, generator=generator) >= plain_fraction
    mask = (torch.rand(n, len(TRANSFORMS), generator=generator) < p_each) & augmented[:, None]
    none = augmented & ~mask.any(1)
    forced = torch.randint(0, len(TRANSFORMS), (n,), generator=generator)
    mask[none, forced[none]] = True
    out = x.clone()
    for j, name in enumerate(TRANSFORMS):
        sel = mask[:, j]
        if sel.any():
            out[sel] = _FUNCS[name](out[sel], generator, ranges)
    return out.clamp(-1, 1), mask


def augmentation_table(plain_fraction: float = 0.4, p_each: float = 0.35, r: AugmentRanges = RANGES) -> str:
    """Markdown table of the transforms and their ranges (for the model card)."""
    rows = [
        (
            "stroke",
            f"dilation blend {r.thick_blend[0]:g}-{r.thick_blend[1]:g} or erosion blend "
            f"{r.thin_blend[0]:g}-{r.thin_blend[1]:g} (3x3 max-pool)",
        ),
        (
            "affine",
            f"shear ±{r.shear:g}, rotation ±{r.degrees:g}°, scale ×{r.scale[0]:g}-{r.scale[1]:g}, "
            f"shift ±{r.shift_px:g} px",
        ),
        ("resolution", f"area down-sampling to {r.low_res_px[0]}-{r.low_res_px[1]} px, bilinear up-sampling"),
        ("blur", f"Gaussian σ {r.blur_sigma[0]:g}-{r.blur_sigma[1]:g} px"),
        (
            "contrast",
            f"γ {r.gamma[0]:g}-{r.gamma[1]:g}, ink gain {r.gain[0]:g}-{r.gain[1]:g}, "
            f"background lift {r.lift[0]:g}-{r.lift[1]:g} (on [0, 1])",
        ),
        ("elastic", f"smooth 4x4 displacement field, amplitude {r.elastic_px[0]:g}-{r.elastic_px[1]:g} px"),
        ("noise", f"Gaussian σ {r.noise_sigma[0]:g}-{r.noise_sigma[1]:g} (on [0, 1])"),
    ]
    head = [
        f"{plain_fraction:.0%} of training images are used as they are; each other image goes through each"
        f" transform below with probability {p_each:g} (at least one), in this order, with parameters drawn"
        " per image:",
        "",
        "| transform | range |",
        "| --- | --- |",
    ]
    return "\n".join(head + [f"| {a} | {b} |" for a, b in rows])
