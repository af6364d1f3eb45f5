"""Guidance methods by name: the one place `AugmentConfig.guidance` strings become methods.

Adding a method = one file in `guidance/` with a `GuidanceMethod` subclass, and one line here.
"""

from __future__ import annotations

from .latent import LatentGuidance
from .lookahead import LookaheadGuidance
from .method import GuidanceMethod
from .noisy import NoisyGuidance
from .posterior import PosteriorGuidance

#: name -> method class, in the order the docs list them.
GUIDANCE_METHODS: dict[str, type[GuidanceMethod]] = {
    cls.name: cls for cls in (LatentGuidance, PosteriorGuidance, LookaheadGuidance, NoisyGuidance)
}


def make_guidance_method(name: str, *, lookahead_steps: int | None = 2) -> GuidanceMethod:
    """The method called `name` (a key of `GUIDANCE_METHODS`), built from the job-level options."""
    try:
        cls = GUIDANCE_METHODS[name]
    except KeyError:
        raise ValueError(f"guidance method must be one of {tuple(GUIDANCE_METHODS)}, got {name!r}") from None
    return cls.create(lookahead_steps=lookahead_steps)
