"""Per-sample seeds (EDM-style determinism): sample i depends only on (run seed, i)."""

from __future__ import annotations

import hashlib

import torch

_MASK63 = (1 << 63) - 1


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints/strings (sha256; stable across platforms and versions)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & _MASK63


def sample_seed(run_seed: int, index: int) -> int:
    """The seed of sample `index` of a run."""
    return derive_seed("sample", run_seed, index)


def noise_generator(seed: int) -> torch.Generator:
    """CPU generator for a sample's initial noise x_T (CPU so results match across devices)."""
    return torch.Generator("cpu").manual_seed(derive_seed("noise", seed))


def step_generator(seed: int) -> torch.Generator:
    """CPU generator for a sample's per-step noise (stochastic samplers: DDPM, DDIM with η > 0)."""
    return torch.Generator("cpu").manual_seed(derive_seed("step", seed))
