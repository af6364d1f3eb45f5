"""MMD guidance for your own diffusers pipeline: one `callback_on_step_end` argument.

Standard diffusers pipelines (Stable Diffusion 1.x/2.x, SDXL, SD3, Flux and their img2img/inpaint
variants) call `callback_on_step_end(pipe, step, timestep, callback_kwargs)` right after each scheduler
step, and use the `latents` the callback returns for the next step. That is exactly where the job's
`noisy` guidance acts (DESIGN.md §2): g = ∇_{x_t} MMD²(X_t, Y) in closed form on the current noisy latent,
applied after the sampler step. So:

    from pipeline.integrations.diffusers_callback import MMDGuidanceCallback

    guide = MMDGuidanceCallback.from_references(pipe, "./xray_samples", strength=0.01)
    images = pipe(prompts, callback_on_step_end=guide,
                  callback_on_step_end_tensor_inputs=guide.tensor_inputs).images

What it shares with the `augment` job (nothing is re-implemented here):
- the references are read, validated, encoded once with the pipeline's own VAE and cached as a reference
  bundle (`storage.bundle`, the job's cache folder) by the job's own `pipeline.checks.reference.encoded_bundle`;
- the sample kernel comes from `pipeline.checks.reference.build_kernel` (median-heuristic bandwidth), the guidance
  settings (strength schedule, step normalisation, sample memory) from `pipeline.models.generation.make_guidance`, all
  from one validated `AugmentConfig`; the update is the job's `noisy` method's own function,
  `guidance.noisy.noisy_guidance_update`;
- the gradient is batch-coupled: MMD² over the whole batch of latents at that step (all prompts ×
  `num_images_per_prompt`); under classifier-free guidance the callback sees the un-doubled batch.

Latent spaces: references are encoded as the pipeline expects its latents, `(z − shift_factor) ×
scaling_factor` (SD and SDXL have no shift; SD3 and Flux do), or `(z − latents_mean) × scaling_factor /
latents_std` for VAEs that carry per-channel statistics. Flux's latents are packed 2×2 patches
[B, H/2·W/2, 4C]: the callback unpacks them with the pipeline's own `_unpack_latents`, guides, and packs the
update back (`_pack_latents`), so the MMD math sees the same [C, H, W] latents as for SD.

Prompt-aware guidance: when the references carry captions (sidecar `.txt` or `captions.jsonl/.csv`) or class
sub-folders, the kernel becomes the product k((c, x), (c', y)) = k_C(c, c')·k_X(x, y) over prompt
embeddings, so each image is pulled toward the references whose caption is like its prompt. Generated
images use the `prompt_embeds` the pipeline already computed (requested through `tensor_inputs`; the
positive half under CFG), references the same pipeline's `encode_prompt` of their caption (or
`class_prompt.format(class_name)`); both are averaged over tokens. Pipelines with no `callback_on_step_end`
(DiT, DDPM, PixArt) are refused with a pointer to `augment`, which drives those models itself.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.callbacks import PipelineCallback

from guidance import (
    MMDGuidance,
    MMDTarget,
    ProductKernel,
    StrengthSchedule,
    noisy_guidance_update,
)
from guidance.kernels import ConditionKernel

from ..checks.pilot import FALLBACK_STRENGTH
from ..checks.reference import (
    ReferenceBundle,
    build_kernel,
    encoded_bundle,
    prompt_kernel,
    split_holdout,
)
from ..config import AugmentConfig
from ..models.families import pool_prompt_embeds
from ..models.generation import make_guidance
from ..models.vae import LatentEncoding, latent_encoding

__all__ = [
    "LatentEncoding",
    "MMDGuidanceCallback",
    "check_pipeline",
    "default_resolution",
    "encode_references",
    "latent_encoding",
    "pipeline_fingerprint",
    "pool_prompt_embeds",
    "pooled_prompt_embeddings",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# What the pipeline offers
# --------------------------------------------------------------------------------------------------------


def check_pipeline(pipe: Any) -> None:
    """Raise TypeError unless `pipe` has a `callback_on_step_end` hook that may return `latents`."""
    name = type(pipe).__name__
    has_hook = callable(pipe) and "callback_on_step_end" in inspect.signature(type(pipe).__call__).parameters
    inputs = getattr(pipe, "_callback_tensor_inputs", None) or []
    if not has_hook or "latents" not in inputs:
        why = "no callback_on_step_end hook" if not has_hook else "a callback_on_step_end hook without 'latents'"
        raise TypeError(
            f"{name} has {why}, so MMD guidance cannot be attached to it; run the augment job instead "
            f"(augment --model <folder or hub id> --ref <references> --guidance noisy ...), which drives "
            f"DiT, DDPM and UNet models through its own sampling loop"
        )
    if getattr(pipe, "vae", None) is None:
        raise TypeError(f"{name} has no VAE: the callback guides latent diffusion pipelines; use augment instead")


def default_resolution(pipe: Any) -> tuple[int, int]:
    """(height, width) the pipeline generates when the call names none."""
    size = getattr(pipe, "default_sample_size", None)
    if size is None:
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        size = getattr(denoiser.config, "sample_size", None) if denoiser is not None else None
    if size is None:
        raise ValueError(f"cannot tell the default resolution of {type(pipe).__name__}: pass height and width")
    if isinstance(size, list | tuple):
        h, w = int(size[0]), int(size[-1])
    else:
        h = w = int(size)
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    return h * factor, w * factor


def pipeline_fingerprint(pipe: Any) -> str:
    """An id for the reference cache: the pipeline's name or path plus a hash of its VAE (config and weights).

    Only the VAE shapes the bundle's latents, so the hash covers it alone (a few hundred MB read once).
    """
    vae = pipe.vae
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    name = getattr(pipe.config, "_name_or_path", None) or type(pipe).__name__
    return f"{name}@vae-{h.hexdigest()[:12]}"


# --------------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _vae_encode(pipe: Any, images: torch.Tensor, encoding: LatentEncoding, batch_size: int) -> torch.Tensor:
    """Images in [−1, 1] -> the pipeline's latents (posterior mode, normalised), float32 on the CPU."""
    vae = pipe.vae
    dtype = vae.dtype
    # as the pipelines' decode: a float16 VAE that asks for it runs in float32 (SDXL's VAE overflows)
    upcast = dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        run_dtype = vae.dtype
        device = next(vae.parameters()).device
        out = []
        for chunk in images.split(batch_size):
            dist = vae.encode(chunk.to(device, run_dtype)).latent_dist
            out.append(encoding.apply(dist.mode()).cpu())
    finally:
        if upcast:
            vae.to(dtype)
    return torch.cat(out)


def encode_references(
    pipe: Any,
    ref: str | os.PathLike[str],
    *,
    height: int | None = None,
    width: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
) -> tuple[ReferenceBundle, list[str] | None]:
    """Read, validate and encode the references with the pipeline's own VAE (cached like the job's bundle).

    Returns the bundle (latents [M, C, H, W] float32 in the pipeline's unpacked latent space, labels, the
    median pairwise distance) and the captions aligned with `bundle.files` (None without captions).
    Images are center-cropped and resized to (height, width), the pipeline's default resolution unless given:
    generate at that resolution (the MMD compares latents of one shape).
    """
    if height is None or width is None:
        dh, dw = default_resolution(pipe)
        height, width = height or dh, width or dw
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    encoding = latent_encoding(pipe)
    multiple = factor * (2 if encoding.packed else 1)
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple} for {type(pipe).__name__}")
    shape = [int(pipe.vae.config.latent_channels), height // factor, width // factor]
    bundle, refs = encoded_bundle(
        str(ref),
        channels=int(pipe.vae.config.in_channels),
        size=(height, width),
        model_id=pipeline_fingerprint(pipe),
        encode=lambda images: _vae_encode(pipe, images, encoding, batch_size),
        # the latents depend on the VAE (its fingerprint), the resolution and the latent normalisation
        extra_key={
            "latent_shape": shape,
            "encoding": {"scaling_factor": encoding.scaling_factor, "shift": encoding.shift, "std": encoding.std},
        },
        cache_dir=cache_dir,
    )
    return bundle, refs.captions


@torch.no_grad()
def pooled_prompt_embeddings(
    pipe: Any, prompts: Sequence[str], batch_size: int = 16, **encode_kwargs: Any
) -> torch.Tensor:
    """The pipeline's own `encode_prompt(prompts)[0]` ([n, L, D], no CFG), averaged over tokens: [n, D] float32."""
    params = inspect.signature(pipe.encode_prompt).parameters
    kwargs: dict[str, Any] = {"num_images_per_prompt": 1}
    if "device" in params:
        kwargs["device"] = getattr(pipe, "_execution_device", None) or pipe.device
    if "do_classifier_free_guidance" in params:
        kwargs["do_classifier_free_guidance"] = False
    kwargs.update(encode_kwargs)
    out = []
    for start in range(0, len(prompts), batch_size):
        embeds = pipe.encode_prompt(prompt=list(prompts[start : start + batch_size]), **kwargs)[0]
        out.append(pool_prompt_embeds(embeds).cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------------------


class MMDGuidanceCallback(PipelineCallback):
    """Batch MMD guidance of a diffusers pipeline toward a reference set, as a `callback_on_step_end`.

    Build it with :meth:`from_references` (reads, validates, encodes and caches the references with the
    pipeline's VAE), then pass it as `callback_on_step_end=guide` and
    `callback_on_step_end_tensor_inputs=guide.tensor_inputs` (SD, SDXL and SD3 pipelines read the inputs from
    the callback themselves; Flux needs them passed). It can be combined with other callbacks through
    `diffusers.callbacks.MultiPipelineCallbacks`.

    Attributes:
        guidance: the job's guidance settings (target, strength schedule, normalisation, sample memory).
        latent_shape: (C, H, W) of the references' latents; generate at the matching resolution.
        prompt_aware: True when the kernel is a product kernel over prompt embeddings.
    """

    def __init__(
        self,
        guidance: MMDGuidance,
        latent_shape: Sequence[int],
        *,
        prompt_aware: bool = False,
        vae_scale_factor: int = 8,
    ) -> None:
        super().__init__()
        if guidance.mode != "noisy":
            raise ValueError(
                f"a step-end callback applies the 'noisy' update (on x_t after the sampler step); got mode "
                f"{guidance.mode!r}, which needs the model output: use the augment job for it"
            )
        if prompt_aware != isinstance(guidance.target.kernel, ProductKernel):
            raise ValueError("prompt_aware must be True exactly when the target's kernel is a ProductKernel")
        self.guidance = guidance
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.prompt_aware = prompt_aware
        self.vae_scale_factor = int(vae_scale_factor)
        self._trace: list[torch.Tensor] = []

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def from_references(
        cls,
        pipe: Any,
        ref: str | os.PathLike[str],
        *,
        strength: float | None = None,
        config: AugmentConfig | None = None,
        prompt_aware: bool | None = None,
        class_prompt: str = "{}",
        condition_kernel: ConditionKernel | None = None,
        height: int | None = None,
        width: int | None = None,
        encode_prompt_kwargs: dict[str, Any] | None = None,
        **settings: Any,
    ) -> MMDGuidanceCallback:
        """Encode the references with `pipe`'s VAE (cached) and build the callback.

        Args:
            pipe: a diffusers pipeline with `callback_on_step_end` (SD, SDXL, SD3, Flux, ...).
            ref: reference folder or fsspec URL (as `augment --ref`: class sub-folders and captions allowed).
            strength: guidance strength (default 0.01, the job's fallback: the callback runs no strength pilot;
                with `per_sample` normalisation each step moves a latent by strength × its norm).
            config: an `AugmentConfig` to take the guidance settings from (e.g. a job's); keyword `settings`
                override its fields. Without it the job's defaults apply.
            prompt_aware: product kernel over prompt embeddings (None: on when the references carry captions
                or class folders and at least two distinct prompts).
            class_prompt: how a class folder name becomes a prompt when there are no captions.
            condition_kernel: kernel on pooled prompt embeddings (default: RBF with the median distance
                between the references' distinct prompt embeddings).
            height, width: resolution the references are encoded at (default: the pipeline's default).
            encode_prompt_kwargs: extra arguments for `pipe.encode_prompt` when embedding reference prompts
                (use the ones your pipeline call uses, e.g. `max_sequence_length`, `clip_skip`).
            settings: any other `AugmentConfig` guidance field: `kernel`, `schedule`, `schedule_start`,
                `schedule_end`, `normalization`, `memory`, `bandwidth_factors`, `rff_features`, `holdout`,
                `seed`, `cache_dir`, `batch_size` (VAE encoding batch).

        Raises:
            TypeError: the pipeline has no `callback_on_step_end` hook (use `augment`).
            storage.errors.InputError: bad references (one line naming the file).
        """
        check_pipeline(pipe)
        cfg = _guidance_config(ref, config, strength, settings)
        encoded, captions = encode_references(
            pipe, ref, height=height, width=width, cache_dir=cfg.cache_dir, batch_size=cfg.batch_size
        )
        caption_of = dict(zip(encoded.files, captions, strict=True)) if captions is not None else None
        bundle = split_holdout(encoded, cfg.holdout, cfg.seed)
        # generated images carry prompts, not class ids: the sample kernel alone, product over prompts below
        kernel = build_kernel(cfg.model_copy(update={"class_aware": False}), bundle)
        prompts = _reference_prompts(bundle, caption_of, class_prompt)
        if prompt_aware is None:
            prompt_aware = prompts is not None and len(set(prompts)) >= 2
            if prompts is not None and not prompt_aware:
                log.info("every reference has the same prompt: guiding without the prompt kernel")
        y_cond = None
        if prompt_aware:
            y_cond, condition_kernel = _prompt_conditions(pipe, ref, prompts, condition_kernel, encode_prompt_kwargs)
            kernel = ProductKernel(kernel, condition_kernel)
        device = getattr(pipe, "_execution_device", None) or pipe.device
        target = MMDTarget(bundle.latents.to(device), kernel, y_cond=y_cond, unbiased=False)
        guidance = make_guidance(cfg, target)
        if guidance is None:  # strength 0 or guidance "none": a callback that changes nothing
            guidance = MMDGuidance(target, StrengthSchedule(0.0), mode="noisy", normalization=cfg.normalization)
        log.info(
            "MMD guidance callback: %d references, kernel %r, strength %g (%s, %s)",
            target.num_references,
            kernel,
            cfg.strength,
            cfg.schedule,
            cfg.normalization,
        )
        return cls(
            guidance,
            bundle.latents.shape[1:],
            prompt_aware=prompt_aware,
            vae_scale_factor=int(getattr(pipe, "vae_scale_factor", 8)),
        )

    # ---- the diffusers callback contract ------------------------------------------------------------

    @property
    def tensor_inputs(self) -> list[str]:
        """The `callback_kwargs` entries this callback reads: `latents` (+ `prompt_embeds` when prompt-aware)."""
        return ["latents", "prompt_embeds"] if self.prompt_aware else ["latents"]

    @property
    def mmd2_trace(self) -> list[float]:
        """MMD² of the batch's noisy latents at each guided step of the latest pipeline call."""
        return [float(v) for v in self._trace]

    def reset(self) -> None:
        """Forget the sample memory (if any) and the trace."""
        if self.guidance.memory is not None:
            self.guidance.memory.clear()
        self._trace = []

    def callback_fn(
        self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        if step_index == 0:
            self._trace = []
        latents = callback_kwargs.get("latents")
        if not isinstance(latents, torch.Tensor):
            raise ValueError(
                "the pipeline passed no 'latents': call it with callback_on_step_end_tensor_inputs=guide.tensor_inputs"
            )
        num_steps = int(getattr(pipeline, "num_timesteps", None) or len(pipeline.scheduler.timesteps))
        strength = self.guidance.schedule(step_index / num_steps)
        last = step_index == num_steps - 1
        remember = last and self.guidance.memory is not None
        if strength <= 0 and not remember:
            return callback_kwargs
        x = self._unpack(pipeline, latents)
        cond = self._conditions(callback_kwargs, x.shape[0]) if self.prompt_aware else None
        if strength > 0:
            g = self.guidance
            x, value = noisy_guidance_update(x, g.target, strength, g.normalization, x_cond=cond, memory=g.memory)
            self._trace.append(value.detach())
            callback_kwargs["latents"] = self._pack(pipeline, x, latents)
        if remember:
            self.guidance.memory.add(x.detach().float(), cond)
        return callback_kwargs

    # ---- layouts ------------------------------------------------------------------------------------

    def _unpack(self, pipeline: Any, latents: torch.Tensor) -> torch.Tensor:
        c, h, w = self.latent_shape
        if latents.dim() == 4:
            if tuple(latents.shape[1:]) != self.latent_shape:
                raise ValueError(self._shape_message(latents))
            return latents
        if latents.dim() == 3 and hasattr(type(pipeline), "_unpack_latents"):  # Flux: [B, H/2·W/2, 4C]
            if latents.shape[1] * latents.shape[2] != c * h * w or latents.shape[2] != 4 * c:
                raise ValueError(self._shape_message(latents))
            f = self.vae_scale_factor
            return type(pipeline)._unpack_latents(latents, h * f, w * f, f)
        raise ValueError(
            f"{type(pipeline).__name__} passes latents of shape {tuple(latents.shape)}; the callback handles "
            "[B, C, H, W] latents and Flux-style packed [B, H/2*W/2, 4C] latents"
        )

    def _pack(self, pipeline: Any, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.dim() == 4:
            return x
        c, h, w = self.latent_shape
        return type(pipeline)._pack_latents(x, x.shape[0], c, h, w)

    def _shape_message(self, latents: torch.Tensor) -> str:
        c, h, w = self.latent_shape
        f = self.vae_scale_factor
        return (
            f"the pipeline's latents have shape {tuple(latents.shape[1:])} per image but the references were "
            f"encoded to {c}x{h}x{w} ({h * f}x{w * f} pixels): generate at height={h * f}, width={w * f}, or "
            "build the callback with the height and width you generate at"
        )

    def _conditions(self, callback_kwargs: dict[str, Any], batch: int) -> torch.Tensor:
        embeds = callback_kwargs.get("prompt_embeds")
        if not isinstance(embeds, torch.Tensor):
            raise ValueError(
                "prompt-aware guidance needs the prompt embeddings: call the pipeline with "
                "callback_on_step_end_tensor_inputs=guide.tensor_inputs"
            )
        # under CFG the pipelines stack [negative; positive] embeddings: the positive ones are the last rows
        if embeds.shape[0] not in (batch, 2 * batch):
            raise ValueError(f"prompt_embeds has {embeds.shape[0]} rows for a batch of {batch} latents")
        return pool_prompt_embeds(embeds[-batch:])

    def __repr__(self) -> str:
        g = self.guidance
        return (
            f"MMDGuidanceCallback(references={g.target.num_references}, latent_shape={self.latent_shape}, "
            f"kernel={g.target.kernel!r}, schedule={g.schedule}, normalization={g.normalization!r}, "
            f"prompt_aware={self.prompt_aware})"
        )


def _guidance_config(
    ref: str | os.PathLike[str], config: AugmentConfig | None, strength: float | None, settings: dict[str, Any]
) -> AugmentConfig:
    """The job's validated config carrying the guidance settings (`out` and `n` are unused here)."""
    update = dict(settings)
    if isinstance(update.get("cache_dir"), os.PathLike):
        update["cache_dir"] = os.fspath(update["cache_dir"])
    if strength is not None:
        update["strength"] = strength
    if config is None:
        cfg = AugmentConfig(ref=str(ref), out="", n=1, guidance="noisy", **update)
    else:
        if config.guidance not in ("noisy", "none"):
            log.info("the callback applies the 'noisy' update; the config's guidance=%r is not used", config.guidance)
        data = config.model_dump()
        data.update(update, ref=str(ref), guidance="noisy" if config.guidance != "none" else "none")
        cfg = AugmentConfig.model_validate(data)
    if cfg.strength == "auto":  # the callback runs no pilot: the job's fixed fallback strength
        cfg = cfg.model_copy(update={"strength": FALLBACK_STRENGTH})
    return cfg


def _reference_prompts(
    bundle: ReferenceBundle, caption_of: dict[str, str] | None, class_prompt: str
) -> list[str] | None:
    """One prompt per reference of the bundle: its caption, else its class name through `class_prompt`."""
    if caption_of is not None:
        return [caption_of[f] for f in bundle.files]
    if bundle.labels is not None and bundle.class_names is not None:
        return [class_prompt.format(bundle.class_names[int(c)]) for c in bundle.labels]
    return None


def _prompt_conditions(
    pipe: Any,
    ref: str | os.PathLike[str],
    prompts: list[str] | None,
    condition_kernel: ConditionKernel | None,
    encode_prompt_kwargs: dict[str, Any] | None,
) -> tuple[torch.Tensor, ConditionKernel]:
    """Prompt-aware guidance: the references' pooled prompt embeddings and the kernel on them (by default
    RBF with the median distance between the distinct embeddings)."""
    if "prompt_embeds" not in (getattr(pipe, "_callback_tensor_inputs", None) or []):
        raise TypeError(f"{type(pipe).__name__} does not pass prompt_embeds to its callback: use prompt_aware=False")
    if prompts is None:
        raise ValueError(
            f"{ref}: prompt-aware guidance needs captions (<image>.txt or captions.jsonl/.csv) or class "
            "sub-folders in the references"
        )
    y_cond = pooled_prompt_embeddings(pipe, prompts, **(encode_prompt_kwargs or {}))
    if condition_kernel is None:
        try:
            condition_kernel = prompt_kernel(y_cond)
        except ValueError as exc:
            raise ValueError(f"{ref}: {exc}") from None
    return y_cond, condition_kernel
