"""Text-to-image families behind the one denoiser contract: SD 1/2, SDXL, SD3, Flux, PixArt-α/Σ and Sana.

Each adapter holds the user's diffusers pipeline and turns it into a `Denoiser`: given x_t [B, C, H, W] (the
unpacked latent), the timestep and a batch of text conditions, return the model output. Text goes through the
pipeline's own `encode_prompt` (diffusers keeps each family right: two encoders and pooled embeddings for SDXL,
three for SD3, CLIP + T5 for Flux, T5 for PixArt, Gemma for Sana), once per distinct prompt per job: a
condition is a dict of batch-first tensors (`encoder_hidden_states`, pooled `text_embeds`, attention masks),
cached row by row. Everything else a family needs sits here too: SDXL's size and crop ids, Flux's packed
2×2 latent patches, position ids and guidance input (guidance-distilled: the scale is an input, not a
second pass), PixArt's resolution conditioning, the learned-σ half of PixArt's and Sana's outputs.

Rectified-flow families (SD3, Flux, Sana) predict the velocity v = ε − x0 ("flow_prediction"); the sampling
loop turns it into x̂0 = x_t − σ v (`guidance.parameterization`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .denoiser import DenoiserOutput

#: A batch of text conditions: batch-first tensors by name (concatenated along dim 0 for CFG).
TextCondition = dict[str, torch.Tensor]

#: Customary classifier-free guidance scales (the pipelines' own defaults), used by `--cfg-scale auto`.
FAMILY_CFG_SCALE = {"sd": 7.5, "sdxl": 5.0, "sd3": 7.0, "flux": 3.5, "pixart": 4.5, "sana": 4.5}


def _timesteps(t: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    return t.reshape(-1).expand(batch) if t.numel() == 1 else t


def _sample_size(config: Any) -> int:
    size = config.sample_size
    return int(size if isinstance(size, int) else size[0])


def pool_prompt_embeds(embeds: torch.Tensor) -> torch.Tensor:
    """[n, L, D] token embeddings -> [n, D] float32 (mean over tokens); [n, D] passes through."""
    embeds = embeds.float()
    return embeds.mean(1) if embeds.dim() == 3 else embeds.reshape(embeds.shape[0], -1)


class TextToImageAdapter:
    """The shared part: prompt encoding through the pipeline (cached per distinct prompt), CFG's negative branch.

    Subclasses set `family`, the denoising network (`network`) and implement `_encode` and `_forward`.
    """

    family: ClassVar[str]
    supports_internal_guidance = False
    supports_cfg = True
    #: Flux (guidance-distilled): CFG's scale is the model's guidance input, not a second pass.
    guidance_embedded = False

    def __init__(self, pipe: Any, network: torch.nn.Module, prediction_type: str, latent_size: int) -> None:
        self.pipe = pipe
        self.network = network
        self.prediction_type = prediction_type
        channels = int(network.config.in_channels)
        self.latent_shape = (channels, latent_size, latent_size)
        self.device = torch.device(getattr(pipe, "_execution_device", None) or network.device)
        self.negative_prompt = ""
        self.guidance_scale = 1.0
        self.encodings = 0  # distinct prompts encoded so far (each once per job)
        self._cache: dict[str, TextCondition] = {}

    @property
    def image_size(self) -> int:
        return self.latent_shape[-1] * int(getattr(self.pipe, "vae_scale_factor", 8))

    def configure(self, negative_prompt: str | None, guidance_scale: float) -> None:
        """The job's negative prompt (CFG's unconditional branch) and CFG scale (Flux: its guidance input)."""
        self.negative_prompt = negative_prompt or ""
        self.guidance_scale = float(guidance_scale)

    # ---- prompts -------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> TextCondition:
        """The batch's conditions; each distinct prompt is encoded once (`pipe.encode_prompt`) and cached."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            encoded = self._encode(missing)
            for i, p in enumerate(missing):
                self._cache[p] = {k: v[i : i + 1] for k, v in encoded.items()}
            self.encodings += len(missing)
        rows = [self._cache[p] for p in prompts]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def prompt_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """[n, D] float32: each prompt's token embeddings (`encode_prompt`'s first output) averaged over tokens,
        the space of the prompt-aware kernel (as `MMDGuidanceCallback`'s)."""
        return pool_prompt_embeds(self.encode_prompts(prompts)["encoder_hidden_states"]).cpu()

    def null_condition(self, batch_size: int) -> TextCondition:
        """The negative prompt's conditions (the empty prompt unless `--negative-prompt`), for a batch."""
        cond = self.encode_prompts([self.negative_prompt])
        return {k: v.expand(batch_size, *v.shape[1:]) for k, v in cond.items()}

    def _encode_kwargs(self, **wanted: Any) -> dict[str, Any]:
        """`wanted` restricted to what this pipeline's `encode_prompt` takes."""
        params = inspect.signature(self.pipe.encode_prompt).parameters
        return {k: v for k, v in wanted.items() if k in params}

    # ---- the denoiser contract -------------------------------------------------------------------------

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any) -> DenoiserOutput:
        batch = x_t.shape[0]
        if condition is None:  # unprompted: the empty prompt
            condition = self.encode_prompts([""] * batch)
        elif isinstance(condition, list | tuple):
            condition = self.encode_prompts(list(condition))
        dtype = next(self.network.parameters()).dtype
        cond = {
            k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)) for k, v in condition.items()
        }
        out = self._forward(x_t.to(dtype), _timesteps(t, batch, x_t.device), cond)
        channels = self.latent_shape[0]
        if out.shape[1] == 2 * channels:  # learned variance (PixArt, Sana checkpoints with it): [pred, σ]
            out = out[:, :channels]
        return DenoiserOutput(sample=out)

    def _encode(self, prompts: list[str]) -> TextCondition:
        raise NotImplementedError

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        raise NotImplementedError


class StableDiffusionAdapter(TextToImageAdapter):
    """SD 1.x/2.x: `UNet2DConditionModel` on the CLIP text encoder's hidden states (ε or v prediction)."""

    family = "sd"

    def _encode(self, prompts: list[str]) -> TextCondition:
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return {"encoder_hidden_states": embeds}

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        return self.network(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample


class StableDiffusionXLAdapter(TextToImageAdapter):
    """SDXL: two text encoders; the pooled embedding and the size/crop ids are the UNet's added conditions."""

    family = "sdxl"

    def _encode(self, prompts: list[str]) -> TextCondition:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def null_condition(self, batch_size: int) -> TextCondition:
        # as the pipeline: an empty negative prompt is zeros when the model says so (force_zeros_for_empty_prompt)
        cond = super().null_condition(batch_size)
        if not self.negative_prompt and getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
            cond = {k: torch.zeros_like(v) for k, v in cond.items()}
        return cond

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        size = (self.image_size, self.image_size)  # original = target size, no crop (the pipeline's defaults)
        pooled = cond["text_embeds"]
        time_ids = self.pipe._get_add_time_ids(
            size, (0, 0), size, dtype=pooled.dtype, text_encoder_projection_dim=int(pooled.shape[-1])
        )
        added = {"text_embeds": pooled, "time_ids": time_ids.to(x.device).repeat(x.shape[0], 1)}
        return self.network(x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample


class StableDiffusion3Adapter(TextToImageAdapter):
    """SD3: MMDiT on CLIP-L + CLIP-G + T5 embeddings and the pooled CLIP embedding; rectified flow."""

    family = "sd3"

    def _encode(self, prompts: list[str]) -> TextCondition:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        return self.network(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
        ).sample


class FluxAdapter(TextToImageAdapter):
    """Flux: packed 2×2 latent patches as tokens, CLIP pooled + T5 embeddings, rectified flow; FLUX.1-dev is
    guidance-distilled (its CFG scale is the `guidance` input: one pass, no negative branch)."""

    family = "flux"
    supports_cfg = False

    def __init__(self, pipe: Any, network: torch.nn.Module, prediction_type: str, latent_size: int) -> None:
        super().__init__(pipe, network, prediction_type, latent_size)
        channels = int(network.config.in_channels) // 4  # the transformer sees 2×2 patches of C channels
        self.latent_shape = (channels, latent_size, latent_size)
        self.guidance_embedded = bool(getattr(network.config, "guidance_embeds", False))

    def timestep_kwargs(self, num_steps: int) -> dict[str, Any]:
        """As FluxPipeline: σ from 1 to 1/N, shifted by the image's token count when the scheduler asks (μ)."""
        import numpy as np

        config = self.pipe.scheduler.config
        kwargs: dict[str, Any] = {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps)}
        if config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            tokens = (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)
            kwargs["mu"] = calculate_shift(
                tokens,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
        return kwargs

    def _encode(self, prompts: list[str]) -> TextCondition:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        batch, channels, height, width = x.shape
        pipe_cls = type(self.pipe)
        factor = int(self.pipe.vae_scale_factor)
        packed = pipe_cls._pack_latents(x, batch, channels, height, width)
        embeds = cond["encoder_hidden_states"]
        img_ids = pipe_cls._prepare_latent_image_ids(batch, height // 2, width // 2, x.device, x.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = None
        if self.guidance_embedded:
            guidance = torch.full((batch,), self.guidance_scale, device=x.device, dtype=torch.float32)
        out = self.network(
            hidden_states=packed,
            timestep=t / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
        ).sample
        return pipe_cls._unpack_latents(out, height * factor, width * factor, factor)


class PixArtAdapter(TextToImageAdapter):
    """PixArt-α/Σ: a DiT on T5 embeddings with their attention mask; α at 1024 px conditions on resolution."""

    family = "pixart"

    def _encode(self, prompts: list[str]) -> TextCondition:
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=self.device, clean_caption=False
        )
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if (
            getattr(self.network.config, "sample_size", None) == 128
        ):  # as the pipeline: PixArt-α 1024's micro-conditions
            batch = x.shape[0]
            size = float(self.image_size)
            added = {
                "resolution": torch.tensor([[size, size]], device=x.device, dtype=x.dtype).repeat(batch, 1),
                "aspect_ratio": torch.ones(batch, 1, device=x.device, dtype=x.dtype),
            }
        return self.network(
            x,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_attention_mask=cond["encoder_attention_mask"],
            timestep=t,
            added_cond_kwargs=added,
        ).sample


class SanaAdapter(TextToImageAdapter):
    """Sana: a linear-attention DiT on Gemma embeddings (with the pipeline's default complex human instruction)
    in a deep-compression autoencoder's latents; rectified flow."""

    family = "sana"

    def _encode(self, prompts: list[str]) -> TextCondition:
        default = inspect.signature(type(self.pipe).__call__).parameters.get("complex_human_instruction")
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            device=self.device,
            clean_caption=False,
            **self._encode_kwargs(complex_human_instruction=default.default if default is not None else None),
        )
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        return self.network(
            x,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_attention_mask=cond["encoder_attention_mask"],
            timestep=t,
        ).sample


#: Pipeline component class -> adapter (text-to-image families).
TEXT_FAMILIES: dict[str, type[TextToImageAdapter]] = {
    "SD3Transformer2DModel": StableDiffusion3Adapter,
    "FluxTransformer2DModel": FluxAdapter,
    "PixArtTransformer2DModel": PixArtAdapter,
    "SanaTransformer2DModel": SanaAdapter,
}

#: What `augment --model` drives, for messages.
SUPPORTED_FAMILIES = (
    "Stable Diffusion 1.x/2.x, SDXL, SD3, Flux, PixArt-α/Σ, Sana, DiT, DDPM (UNet2DModel), the shipped prior "
    "or a custom model by import path (pkg.module:factory)"
)


def text_adapter_for(pipe: Any, prediction_type: str) -> TextToImageAdapter | None:
    """The adapter of a text-to-image pipeline, or None when it is none of the text families."""
    transformer = getattr(pipe, "transformer", None)
    unet = getattr(pipe, "unet", None)
    if transformer is not None:
        cls = TEXT_FAMILIES.get(type(transformer).__name__)
        if cls is None:
            return None
        if cls is FluxAdapter:  # Flux's transformer has no sample size: the pipeline's default resolution
            size = int(getattr(pipe, "default_sample_size", 128))
        else:
            size = _sample_size(transformer.config)
        return cls(pipe, transformer, prediction_type, size)
    if unet is not None and type(unet).__name__ == "UNet2DConditionModel" and getattr(pipe, "text_encoder", None):
        xl = getattr(unet.config, "addition_embed_type", None) == "text_time"
        cls = StableDiffusionXLAdapter if xl else StableDiffusionAdapter
        return cls(pipe, unet, prediction_type, _sample_size(unet.config))
    return None
