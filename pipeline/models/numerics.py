"""Non-finite samples: found at the batch that makes them, explained as settings to change.

Settings that overflow (`--dtype float16` on a CPU, an enormous `--strength` or `--cfg-scale`) turn the
latents into NaN or inf within a few steps. The guidance math then refuses them ("x contains NaN or inf
values") deep inside the sampler. `sample_finite` runs one batch and turns either symptom into one
`InputError` line that names the batch and says what to change:

    result = sample_finite(cfg, device, batch_indices, sample_latents)(denoiser, scheduler, seeds, ...)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from storage.errors import InputError

from ..config import AugmentConfig

T = TypeVar("T")


def sample_finite(
    cfg: AugmentConfig, device: torch.device, indices: Sequence[int], sample: Callable[..., T]
) -> Callable[..., T]:
    """`sample`, for the batch of sample `indices`, raising InputError if its latents are not finite.

    `sample` returns an object with a `latents` tensor (`pipeline.models.sampling.sample_latents`).
    """

    def checked(*args: Any, **kwargs: Any) -> T:
        try:
            result = sample(*args, **kwargs)
        except ValueError as exc:
            if "NaN or inf" not in str(exc):
                raise
            raise non_finite_error(cfg, device, indices) from exc
        if not bool(torch.isfinite(result.latents).all()):  # type: ignore[attr-defined]
            raise non_finite_error(cfg, device, indices)
        return result

    return checked


def non_finite_error(cfg: AugmentConfig, device: torch.device, indices: Sequence[int]) -> InputError:
    """The one-line error for NaN/inf latents in the batch of samples `indices`, with what to change."""
    strength = f"{cfg.strength:g}" if isinstance(cfg.strength, float) else str(cfg.strength)
    cfg_scale = f"{cfg.cfg_scale:g}" if isinstance(cfg.cfg_scale, float) else str(cfg.cfg_scale)
    half = cfg.dtype in ("float16", "bfloat16")
    advice = []
    if half:
        advice.append(f"use --dtype float32 ({cfg.dtype} has a narrow range or precision)")
    if isinstance(cfg.strength, float) and cfg.guidance != "none" and cfg.strength > 1.0:
        advice.append(f"lower --strength (now {strength}; or 'auto', the default)")
    if isinstance(cfg.cfg_scale, float) and cfg.cfg_scale > 20.0:
        advice.append(f"lower --cfg-scale (now {cfg.cfg_scale:g})")
    if not advice:
        advice.append("lower --strength or --cfg-scale, or use --dtype float32")
    where = f"samples {indices[0]}..{indices[-1]}" if len(indices) > 1 else f"sample {indices[0]}"
    return InputError(
        f"{where}: the sampler produced NaN or infinite latents (--dtype {cfg.dtype} on {device.type}, "
        f"--guidance {cfg.guidance}, --strength {strength}, --cfg-scale {cfg_scale}); " + "; or ".join(advice)
    )
