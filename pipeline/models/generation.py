"""The one generation step everything shares: latents of given global sample indices, made with the
config's guidance toward a target.

The job's workers (`pipeline.jobs.worker`), the checks before a job (the pilot's candidates, the reach
check's unguided batch), and users' own diffusers pipelines (`make_guidance`) all sample here, from
explicit arguments: nothing of a job is needed to generate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from guidance import DeltaKernel, MMDGuidance, MMDTarget, ProductKernel, SampleMemory, StrengthSchedule

from ..config import AugmentConfig
from ..plan import seeds_for
from .loading import LoadedModel
from .numerics import sample_finite
from .prompts import SamplePrompts
from .sampling import sample_latents

#: Called with the number of samples just finished (generated, for the progress bar).
Progress = Callable[[int], None]


def model_label_map(class_names: list[str] | None, num_model_classes: int | None) -> dict[int, int] | None:
    """Class folders named by integers the model knows ("0".."9" for the shipped prior) become model
    labels, so a class-conditional model is asked for that class; otherwise only the kernel steers."""
    if class_names is None or num_model_classes is None:
        return None
    try:
        ids = [int(name) for name in class_names]
    except ValueError:
        return None
    if any(not 0 <= i < num_model_classes for i in ids):
        return None
    return dict(enumerate(ids))


def cfg_scale_for(cfg: AugmentConfig, model: LoadedModel) -> float:
    """The classifier-free guidance scale of the run: the config's, or under `auto` the model's default (2 for
    class-label models, the family's customary scale for text-to-image models)."""
    return model.default_cfg_scale if cfg.cfg_scale == "auto" else float(cfg.cfg_scale)


def sampler_name(sampler: str, model: LoadedModel) -> str:
    """The sampler a run uses: `auto` is DDIM for VP models and the model's own scheduler (by class name) for
    flow-matching ones (`pipeline.jobs.job.with_sampler`)."""
    if sampler != "auto":
        return sampler
    return type(model.scheduler).__name__ if model.flow_matching else "ddim"


def kernel_conditions(
    model: LoadedModel,
    kernel: object,
    prompts: SamplePrompts | None,
    indices: Sequence[int],
    labels: torch.Tensor | None,
) -> torch.Tensor | None:
    """What the product kernel sees of these samples: their classes (δ-kernel), the pooled embeddings of their
    prompts (prompt-aware kernel on captions), or None for a plain kernel."""
    if not isinstance(kernel, ProductKernel):
        return None
    if isinstance(kernel.condition_kernel, DeltaKernel):
        return labels
    if prompts is None:
        raise ValueError("a prompt-aware kernel needs the samples' prompts")
    return model.denoiser.prompt_embeddings(prompts.texts(indices, labels))


def make_guidance(cfg: AugmentConfig, target: MMDTarget, strength: float | None = None) -> MMDGuidance | None:
    """The guidance of `cfg` toward `target` (None when off); `strength` overrides the config's (which
    must then be a number, not 'auto')."""
    s = cfg.strength if strength is None else strength
    if s == "auto":
        raise ValueError("strength 'auto' must be resolved by the pilot before sampling")
    if cfg.guidance == "none" or s == 0:
        return None
    kind = (
        "interval" if cfg.schedule == "constant" and (cfg.schedule_start, cfg.schedule_end) != (0, 1) else cfg.schedule
    )
    schedule = StrengthSchedule(float(s), kind=kind, start=cfg.schedule_start, end=cfg.schedule_end)
    return MMDGuidance(
        target,
        schedule,
        mode=cfg.guidance,
        normalization=cfg.normalization,
        lookahead_steps=cfg.lookahead_steps,
        memory=SampleMemory(cfg.memory) if cfg.memory else None,
        attraction_floor=cfg.attraction_floor,
    )


def generate(
    cfg: AugmentConfig,
    model: LoadedModel,
    target: MMDTarget,
    strength: float,
    model_labels: dict[int, int] | None,
    indices: Sequence[int],
    labels: torch.Tensor | None,
    progress: Progress | None = None,
    prompts: SamplePrompts | None = None,
) -> torch.Tensor:
    """Latents [n, C, H, W] (float32, CPU) of the samples with these global indices and target classes.

    Guided toward `target` at `strength` (a number: 'auto' is resolved by the pilot first); `model_labels`
    maps a reference class id to the model's class id (None: the model is not told the class); `prompts`
    gives each sample its prompt on a text-to-image model (None: unprompted). Batches are consecutive slices
    of `indices`; each sample's noise comes from its own seed.
    """
    guidance = make_guidance(cfg, target, strength)  # fresh memory per call: independent of process count
    cfg_scale = cfg_scale_for(cfg, model)
    if getattr(model.denoiser, "guidance_embedded", False):  # Flux: the scale is an input, not a second pass
        model.denoiser.guidance_scale, cfg_scale = cfg_scale, 1.0
    sequential = cfg.coupling == "sequential"
    if sequential and guidance is not None and guidance.memory is None:
        guidance.memory = SampleMemory(100)
    step = 1 if sequential else cfg.batch_size
    out = []
    for offset in range(0, len(indices), step):
        batch = indices[offset : offset + step]
        if sequential and guidance is not None and len(guidance.memory) >= guidance.memory.capacity:
            guidance.memory.clear()  # the public code resets its memory bank every `capacity` samples
        lab = labels[offset : offset + len(batch)] if labels is not None else None
        condition = None
        if lab is not None and model_labels is not None:
            condition = torch.tensor([model_labels[int(c)] for c in lab], device=model.device)
        elif prompts is not None:
            condition = model.denoiser.encode_prompts(prompts.texts(batch, lab))
        mmd_condition = kernel_conditions(model, target.kernel, prompts, batch, lab)
        result = sample_finite(cfg, model.device, batch, sample_latents)(
            model.denoiser,
            model.scheduler,
            seeds_for(cfg, batch),
            num_steps=cfg.steps,
            condition=condition,
            cfg_scale=cfg_scale,
            ig_scale=cfg.ig_scale,
            ig_interval=cfg.ig_interval,
            guidance=guidance,
            mmd_condition=mmd_condition.to(model.device) if mmd_condition is not None else None,
            eta=cfg.eta,
            device=model.device,
        )
        out.append(result.latents.cpu())
        if progress is not None:
            progress(len(batch))
    return torch.cat(out)


__all__ = [
    "Progress",
    "cfg_scale_for",
    "generate",
    "kernel_conditions",
    "make_guidance",
    "model_label_map",
    "sampler_name",
]
