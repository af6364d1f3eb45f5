"""Target domains for the domain suite: documented shifts of held-out MNIST digits (pure array functions).

Every domain is made from images the prior never trained on (`pipeline.models.prior_data.mnist_split`'s
1,000 held-out rows, 100 per class), each under its own shift; each has about 100 labelled references and
uses the rest of its classes' rows as test images (references and test images are disjoint). Shifts act
on [n, 28, 28] uint8 digits and return [n, 32, 32] uint8 (2 px of padding, like the prior's training
images); random shifts are seeded per domain, so every domain is a fixed function of the rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DOMAINS", "DomainSpec", "SplitDomain", "make_domain"]


def _to_float(images_28: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(images_28), dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0


def _to_uint8_32(x: torch.Tensor, fill: float = 0.0) -> np.ndarray:
    x = F.pad(x, (2, 2, 2, 2), value=fill)
    return (x[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def thick(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Strokes about 2 px wider: 3×3 grey dilation."""
    return _to_uint8_32(F.max_pool2d(_to_float(images), 3, stride=1, padding=1))


def thin(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Strokes about 1 px narrower: 2×2 grey erosion."""
    x = _to_float(images)
    return _to_uint8_32(-F.max_pool2d(-F.pad(x, (0, 1, 0, 1)), 2, stride=1))


def slant(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Italic: horizontal shear x += 0.4·(y − centre)."""
    x = _to_float(images)
    theta = torch.tensor([[1.0, 0.4, 0.0], [0.0, 1.0, 0.0]]).expand(len(x), 2, 3)
    return _to_uint8_32(_affine(x, theta))


def lowres(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Low resolution: area-downsampled to 10×10, blown up again to 28×28 in blocks of 2-3 px (blocky,
    blurred strokes)."""
    x = F.interpolate(_to_float(images), size=(10, 10), mode="area")
    return _to_uint8_32(F.interpolate(x, size=(28, 28), mode="nearest"))


def contrast(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Low contrast on a grey background: intensity v -> 0.3 + 0.4·v."""
    return _to_uint8_32(0.3 + 0.4 * _to_float(images), fill=0.3)


def scale_position(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Small and off-centre: scaled by U(0.5, 0.7), moved by U(−5, 5) px on each axis."""
    x = _to_float(images)
    n = len(x)
    s = torch.as_tensor(rng.uniform(0.5, 0.7, n), dtype=torch.float32)
    shift = torch.as_tensor(rng.uniform(-5, 5, (n, 2)) * 2 / 28, dtype=torch.float32)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / s
    theta[:, :, 2] = -shift / s[:, None]
    return _to_uint8_32(_affine(x, theta))


def elastic(images: np.ndarray, rng: np.random.Generator, alpha: float = 34.0, sigma: float = 4.0) -> np.ndarray:
    """Elastic distortion (Simard et al. 2003): displacement fields of uniform noise smoothed by a Gaussian
    of σ = 4 px, scaled by α = 34 px."""
    x = _to_float(images)
    n = len(x)
    field = torch.as_tensor(rng.uniform(-1, 1, (n, 2, 28, 28)), dtype=torch.float32)
    radius = int(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    field = F.conv2d(F.pad(field.reshape(-1, 1, 28, 28), (radius,) * 4, mode="reflect"), g.view(1, 1, 1, -1))
    field = F.conv2d(field, g.view(1, 1, -1, 1)).reshape(n, 2, 28, 28) * alpha * 2 / 28  # px -> [-1, 1] units
    base = F.affine_grid(torch.eye(2, 3).expand(n, 2, 3), [n, 1, 28, 28], align_corners=False)
    grid = base + field.permute(0, 2, 3, 1)
    return _to_uint8_32(F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False))


def noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise: additive Gaussian noise of std 0.2 (of the full range) on the whole 32×32 image."""
    x = F.pad(_to_float(images), (2, 2, 2, 2))
    x = x + torch.as_tensor(rng.normal(0, 0.2, x.shape), dtype=torch.float32)
    return (x[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def identity(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """No style shift (the class-subset domain shifts only the label distribution)."""
    return _to_uint8_32(_to_float(images))


@dataclass(frozen=True)
class DomainSpec:
    name: str
    shift: Callable[[np.ndarray, np.random.Generator], np.ndarray]
    description: str
    references: dict[int, int]  # class -> number of labelled references


_BALANCED = {c: 10 for c in range(10)}

#: The suite: one documented shift each (see each shift's docstring).
DOMAINS: dict[str, DomainSpec] = {
    d.name: d
    for d in (
        DomainSpec("thick", thick, "strokes ~2 px wider (3x3 dilation)", _BALANCED),
        DomainSpec("thin", thin, "strokes ~1 px narrower (2x2 erosion)", _BALANCED),
        DomainSpec("slant", slant, "italic (shear 0.4)", _BALANCED),
        DomainSpec("lowres", lowres, "10x10 resolution shown in 2-3 px blocks", _BALANCED),
        DomainSpec("contrast", contrast, "low contrast on grey (0.3 + 0.4 v)", _BALANCED),
        DomainSpec("scale", scale_position, "scaled 0.5-0.7, moved up to 5 px", _BALANCED),
        DomainSpec("elastic", elastic, "elastic distortion (alpha 34, sigma 4)", _BALANCED),
        DomainSpec("noise", noise, "Gaussian noise, std 0.2", _BALANCED),
        DomainSpec("subset", identity, "classes 2/4/5/8 only, 40/30/20/10%", {2: 40, 4: 30, 5: 20, 8: 10}),
    )
}


@dataclass
class SplitDomain:
    """A domain's shifted images [n, 32, 32] uint8, labels and source rows: references and test images."""

    spec: DomainSpec
    ref_images: np.ndarray
    ref_labels: np.ndarray
    ref_rows: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    test_rows: np.ndarray


def make_domain(spec: DomainSpec, images_28: np.ndarray, labels: np.ndarray, rows: np.ndarray, seed: int = 0):
    """Split the held-out `rows` of the classes `spec` uses into references (a seeded choice per class, the
    counts of `spec.references`) and test images (every other row of those classes), then shift both.

    `images_28` [N, 784] or [N, 28, 28] uint8 and `labels` [N] are the whole array; `rows` index it.
    """
    rng = np.random.default_rng([seed, *spec.name.encode()])
    rows = np.asarray(rows)
    ref_rows, test_rows = [], []
    for c, count in sorted(spec.references.items()):
        members = rng.permutation(rows[labels[rows] == c])
        if len(members) <= count:
            raise ValueError(f"domain {spec.name}: {len(members)} held-out rows of class {c}, need more than {count}")
        ref_rows.append(np.sort(members[:count]))
        test_rows.append(np.sort(members[count:]))
    ref, test = np.concatenate(ref_rows), np.concatenate(test_rows)
    pixels = np.asarray(images_28, dtype=np.uint8).reshape(-1, 28, 28)
    return SplitDomain(
        spec,
        spec.shift(pixels[ref], rng),
        labels[ref],
        ref,
        spec.shift(pixels[test], rng),
        labels[test],
        test,
    )
