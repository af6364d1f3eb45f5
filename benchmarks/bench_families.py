"""What the job costs on every text-to-image family it drives, at the families' real sizes, against the stock pipelines.

Six families, each a diffusers pipeline whose networks have the published shapes of one real checkpoint (configs
written below, with the hub repo each comes from; random weights, nothing downloaded; the tokenizers are
character-level, built here, with the real maximum lengths):

  sd15    StableDiffusionPipeline       stable-diffusion-v1-5/stable-diffusion-v1-5        512 px
  sdxl    StableDiffusionXLPipeline     stabilityai/stable-diffusion-xl-base-1.0           1024 px
  sd3     StableDiffusion3Pipeline      stabilityai/stable-diffusion-3-medium-diffusers    1024 px
  flux    FluxPipeline                  black-forest-labs/FLUX.1-dev                       1024 px
  pixart  PixArtAlphaPipeline           PixArt-alpha/PixArt-XL-2-1024-MS                   1024 px
  sana    SanaPipeline                  Efficient-Large-Model/Sana_1600M_1024px_diffusers  1024 px

For each family and batch size B (`--batch-sizes`), at `--steps` and the family's resolution (`--resolution`
overrides it), three rows, each a warm-up call and `--repeats` timed calls (the median is reported; the order of
the rows rotates per repeat so that drift spreads over them), with the peak memory of every call (CUDA:
`torch.cuda.max_memory_allocated`; CPU: the process's peak resident set size, reset before each call):

  stock       the diffusers pipeline itself: `pipe(prompt=[p] * B, num_inference_steps=steps, height, width,
              guidance_scale=<the family's default>, output_type="latent")`;
  job/none    the job's generation step, `pipeline.models.generation.generate`, on the same modules turned into
              the job's model (`loaded_from_pipeline`, `with_sampler(model, "auto")`), B samples of
              `SamplePrompts.single(p)`, unguided, at the same CFG scale (`cfg_scale_for`, `--cfg-scale auto`);
  job/noisy   the same, guided (`guidance="noisy"`, `--strength`, default 0.05) toward 16 random smooth
              images encoded with the job's `LoadedModel.encode` (a `ReferenceBundle`, `build_target`).

and the ratios job/none ÷ stock (what the job's loop costs against diffusers'; also with the stock call's prompt
encoding taken out, "no text") and job/noisy ÷ job/none (what guidance costs). Neither side decodes (stock:
latents out; the job's step ends at latents too). Each row also records the denoiser's calls and the share of
its wall time in the denoiser and in the text encoders (wrappers that synchronise the GPU around each call;
`--no-component-times` leaves them out). Things to know when reading the numbers:
- the stock pipeline encodes its B prompts (and, under CFG, B negative prompts) on every call; the job encodes
  each distinct prompt once per job, as a real job does (its warm-up call fills the cache);
- sd15's stock pipeline runs DDIM (the repo's default PNDM makes one extra UNet call per run), the sampler of
  the job's `--sampler auto`; sdxl's and pixart's stock pipelines keep their own schedulers (Euler, DPM-Solver),
  the job runs DDIM; sd3, flux and sana keep their own flow-matching schedulers in both: every row makes
  `steps` denoiser calls;
- flux is guidance-distilled: its guidance scale (3.5) is an input of the transformer, one pass per step in
  both the stock pipeline and the job (no batch doubling); every other family runs CFG as one doubled batch;
- with character-level tokenizers CLIP and T5 see the pipelines' padded lengths (77; T5 256/512/120) as with the
  real ones, but Sana's complex human instruction (1,057 characters, ~200 words and marks) is ~1,060 tokens
  instead of ~200-250: Gemma encodes ~1,360 tokens per prompt instead of ~500, which inflates the stock
  pipeline's per-call text encoding for sana (the "no text" ratio leaves it out);
- a CUDA out-of-memory error is recorded as "oom" for its row (or for the family, if its networks do not fit)
  and the run goes on; the report is rewritten after every family.

`--check-shapes` builds every family's published networks on the meta device (`accelerate.init_empty_weights`:
no memory, seconds on a CPU) and compares their parameter counts with the published ones (`PUBLISHED_PARAMS`,
each with its source). `--smoke` uses tiny networks of the same classes instead (seconds on a CPU).

    # the published shapes' parameter counts against the published ones (meta device, a few seconds, any machine)
    python benchmarks/bench_families.py --check-shapes --out runs/bench_families_shapes.json
    # one GPU (an 80 GB H100: FLUX.1-dev's networks take ~34 GB in bf16), every family at its published size,
    # 20 steps, batches 1 and 4, 2 timed repeats (estimated 10-15 minutes on an H100)
    python benchmarks/bench_families.py --out runs/bench_families_gpu.json
    # a shorter GPU pass: two families, batch 4
    python benchmarks/bench_families.py --families sdxl,flux --batch-sizes 4 --out runs/bench_families_gpu_short.json
    # the test suite: tiny networks of the same classes, 2 steps, batches 1 and 2; seconds on a CPU
    python benchmarks/bench_families.py --smoke --out /tmp/bench_families_smoke.json

Each writes the JSON report to `--out` and a markdown table next to it (same name, `.md`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import string
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
import transformers
from bench_real_size import SD15_DDIM, SD15_UNET, SD15_VAE, peak_mib, reset_peak, synchronize
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from guidance.kernels import median_pairwise_distance
from pipeline.checks.reference import ReferenceBundle, build_target
from pipeline.config import AugmentConfig
from pipeline.jobs.job import with_sampler
from pipeline.models.generation import cfg_scale_for, generate
from pipeline.models.loading import LoadedModel, configure_backends, loaded_from_pipeline, resolve_device, resolve_dtype
from pipeline.models.prompts import SamplePrompts
from storage.errors import InputError

FAMILIES: tuple[str, ...] = ("sd15", "sdxl", "sd3", "flux", "pixart", "sana")
ROWS: tuple[str, ...] = ("stock", "job/none", "job/noisy")

HUB = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "flux": "black-forest-labs/FLUX.1-dev",
    "pixart": "PixArt-alpha/PixArt-XL-2-1024-MS",
    "sana": "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
}
DEFAULT_RESOLUTION = {"sd15": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024, "pixart": 1024, "sana": 1024}
SMOKE_RESOLUTION = {"sana": 32}  # DC-AE with 3 stages (x4) and Sana's multiple of 32; the others 16 px (KL, x2)
SMOKE_DEFAULT_RESOLUTION = 16

# ---- published configs (each repo's <component>/config.json; the VAEs and text encoders too) ----------------

# openai/clip-vit-large-patch14 text tower: SD 1.5's text_encoder, SDXL's text_encoder, FLUX.1-dev's text_encoder,
# and (with the projection) SD3's text_encoder
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
# laion/CLIP-ViT-bigG-14 text tower with projection: SDXL's and SD3's text_encoder_2
CLIP_BIGG = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)
# google/t5-v1_1-xxl encoder: SD3's text_encoder_3, FLUX.1-dev's text_encoder_2, PixArt's text_encoder
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_heads=64,
    num_layers=24,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    dropout_rate=0.1,
)
# google/gemma-2-2b-it (Sana_1600M_1024px_diffusers/text_encoder: Gemma2Model)
GEMMA2_2B = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    final_logit_softcapping=30.0,
    attn_logit_softcapping=50.0,
)
# stabilityai/stable-diffusion-xl-base-1.0 unet/
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
# stabilityai/stable-diffusion-xl-base-1.0 vae/ (SD's KL-f8 autoencoder, its own scaling)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
# stabilityai/stable-diffusion-3-medium-diffusers transformer/
SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
# 16-channel KL-f8 autoencoder without quant convs: SD3 medium's vae/ (and FLUX.1-dev's, other scale and shift)
KL16_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=1024,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
SD3_VAE = dict(KL16_VAE, scaling_factor=1.5305, shift_factor=0.0609)
# black-forest-labs/FLUX.1-dev transformer/ and vae/
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_VAE = dict(KL16_VAE, scaling_factor=0.3611, shift_factor=0.1159)
# PixArt-alpha/PixArt-XL-2-1024-MS transformer/ (sample_size 128: resolution and aspect-ratio micro-conditions)
PIXART_XL2_1024 = dict(
    sample_size=128,
    num_layers=28,
    patch_size=2,
    attention_head_dim=72,
    num_attention_heads=16,
    caption_channels=4096,
    in_channels=4,
    out_channels=8,
    cross_attention_dim=1152,
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
)
PIXART_VAE = dict(SD15_VAE)  # PixArt-XL-2-1024-MS vae/: SD's KL-f8 (sd-vae-ft-ema)
# Efficient-Large-Model/Sana_1600M_1024px_diffusers transformer/
SANA_1600M = dict(
    in_channels=32,
    out_channels=32,
    num_attention_heads=70,
    attention_head_dim=32,
    num_layers=20,
    num_cross_attention_heads=20,
    cross_attention_head_dim=112,
    cross_attention_dim=2240,
    caption_channels=2304,
    mlp_ratio=2.5,
    sample_size=32,
    patch_size=1,
    norm_elementwise_affine=False,
    norm_eps=1e-6,
)
# mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers (Sana's vae/): deep-compression autoencoder, x32, 32 channels
DC_AE_F32C32 = dict(
    in_channels=3,
    latent_channels=32,
    attention_head_dim=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
    decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    downsample_block_type="Conv",
    upsample_block_type="interpolate",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    scaling_factor=0.41407,
)

#: family -> component -> (kind, config); the denoiser is "unet" or "transformer"
PUBLISHED: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "sd15": {"unet": ("unet", SD15_UNET), "vae": ("kl_vae", SD15_VAE), "text_encoder": ("clip", CLIP_L)},
    "sdxl": {
        "unet": ("unet", SDXL_UNET),
        "vae": ("kl_vae", SDXL_VAE),
        "text_encoder": ("clip", CLIP_L),
        "text_encoder_2": ("clip_proj", CLIP_BIGG),
    },
    "sd3": {
        "transformer": ("sd3", SD3_MEDIUM),
        "vae": ("kl_vae", SD3_VAE),
        "text_encoder": ("clip_proj", CLIP_L),
        "text_encoder_2": ("clip_proj", CLIP_BIGG),
        "text_encoder_3": ("t5", T5_XXL),
    },
    "flux": {
        "transformer": ("flux", FLUX_DEV),
        "vae": ("kl_vae", FLUX_VAE),
        "text_encoder": ("clip", CLIP_L),
        "text_encoder_2": ("t5", T5_XXL),
    },
    "pixart": {
        "transformer": ("pixart", PIXART_XL2_1024),
        "vae": ("kl_vae", PIXART_VAE),
        "text_encoder": ("t5", T5_XXL),
    },
    "sana": {
        "transformer": ("sana", SANA_1600M),
        "vae": ("dc_vae", DC_AE_F32C32),
        "text_encoder": ("gemma", GEMMA2_2B),
    },
}

# Published parameter counts, (count, source). Exact counts as reported for the published weights; PixArt-α's is
# the paper's rounded size (its network is PixArt-Σ XL/2's, 610,856,096 as published, plus the 493,056 parameters
# of the 1024 checkpoint's resolution and aspect-ratio embedders).
_CLIP_L = (123_060_480, "SDXL base's two text encoders, 817,720,320, less CLIP-bigG's")
_CLIP_L_PROJ = (123_650_304, "SD3 medium text_encoder (CLIPTextModelWithProjection)")
_CLIP_BIGG = (694_659_840, "SDXL base / SD3 medium text_encoder_2")
_T5_XXL = (4_762_310_656, "T5 v1.1 XXL encoder (SD3 medium text_encoder_3, PixArt, Flux)")
_SD_VAE = (83_653_863, "SD 1.5 / SDXL vae")
_KL16_VAE = (83_819_683, "FLUX.1-dev vae (SD3 medium's has the same shapes)")
PUBLISHED_PARAMS: dict[str, dict[str, tuple[int, str]]] = {
    "sd15": {
        "unet": (859_520_964, "stable-diffusion-v1-5 unet (diffusers' num_parameters docs: 860M)"),
        "vae": _SD_VAE,
        "text_encoder": _CLIP_L,
    },
    "sdxl": {
        "unet": (2_567_463_684, "stable-diffusion-xl-base-1.0 unet (2.6B)"),
        "vae": _SD_VAE,
        "text_encoder": _CLIP_L,
        "text_encoder_2": _CLIP_BIGG,
    },
    "sd3": {
        "transformer": (2_028_328_000, "stable-diffusion-3-medium-diffusers transformer (2B MMDiT)"),
        "vae": _KL16_VAE,
        "text_encoder": _CLIP_L_PROJ,
        "text_encoder_2": _CLIP_BIGG,
        "text_encoder_3": _T5_XXL,
    },
    "flux": {
        "transformer": (11_901_408_320, "FLUX.1-dev transformer (12B)"),
        "vae": _KL16_VAE,
        "text_encoder": _CLIP_L,
        "text_encoder_2": _T5_XXL,
    },
    "pixart": {
        "transformer": (611_000_000, "PixArt-α XL/2 (0.6B, ~611M; PixArt-Σ XL/2: 610,856,096)"),
        "vae": _SD_VAE,
        "text_encoder": _T5_XXL,
    },
    "sana": {
        "transformer": (1_604_000_000, "Sana-1.6B (paper: 1604M; the model card says 1648M)"),
        "vae": (312_250_275, "dc-ae-f32c32-sana-1.0 (Sana 1600M vae)"),
        "text_encoder": (2_614_341_888, "gemma-2-2b-it"),
    },
}

# ---- `--smoke`: tiny networks of the same classes (the numbers mean nothing) ----------------------------------

_TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=16)
_TINY_T5 = dict(
    d_model=32,
    d_ff=64,
    d_kv=8,
    num_heads=4,
    num_layers=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    dropout_rate=0.0,
)
_TINY_GEMMA = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    query_pre_attn_scalar=8,
)
_TINY_KL = dict(  # two blocks: x2, 16 px images -> 8x8 latents
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=16,
)
_TINY_UNET = dict(sample_size=8, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=4)
SMOKE: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "sd15": {
        "unet": (
            "unet",
            dict(
                SD15_UNET,
                **_TINY_UNET,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=16,
                attention_head_dim=4,
            ),
        ),
        "vae": ("kl_vae", dict(SD15_VAE, **_TINY_KL)),
        "text_encoder": ("clip", dict(CLIP_L, **_TINY_CLIP)),
    },
    "sdxl": {
        "unet": (
            "unet",
            dict(
                SDXL_UNET,
                **_TINY_UNET,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=1,
                attention_head_dim=(2, 4),
                cross_attention_dim=32,  # the two encoders' hidden states, concatenated
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 16,  # 6 size/crop ids + the pooled projection
            ),
        ),
        "vae": ("kl_vae", dict(SDXL_VAE, **_TINY_KL)),
        "text_encoder": ("clip", dict(CLIP_L, **_TINY_CLIP)),
        "text_encoder_2": ("clip_proj", dict(CLIP_BIGG, **_TINY_CLIP)),
    },
    "sd3": {
        "transformer": (
            "sd3",
            dict(
                SD3_MEDIUM,
                sample_size=8,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=2,
                joint_attention_dim=32,  # T5's width (>= the two CLIPs' 16 + 16, zero-padded to it)
                caption_projection_dim=16,
                pooled_projection_dim=32,
                pos_embed_max_size=16,
            ),
        ),
        "vae": ("kl_vae", dict(SD3_VAE, **_TINY_KL)),
        "text_encoder": ("clip_proj", dict(CLIP_L, **_TINY_CLIP)),
        "text_encoder_2": ("clip_proj", dict(CLIP_BIGG, **_TINY_CLIP)),
        "text_encoder_3": ("t5", dict(T5_XXL, **_TINY_T5)),
    },
    "flux": {
        "transformer": (
            "flux",
            dict(
                FLUX_DEV,
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=32,
                pooled_projection_dim=16,
                axes_dims_rope=(4, 4, 8),
            ),
        ),
        "vae": ("kl_vae", dict(FLUX_VAE, **_TINY_KL)),
        "text_encoder": ("clip", dict(CLIP_L, **_TINY_CLIP)),
        "text_encoder_2": ("t5", dict(T5_XXL, **_TINY_T5)),
    },
    "pixart": {
        "transformer": (
            "pixart",
            dict(
                PIXART_XL2_1024,
                sample_size=8,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=2,
                caption_channels=32,
                cross_attention_dim=16,
            ),
        ),
        "vae": ("kl_vae", dict(PIXART_VAE, **_TINY_KL)),
        "text_encoder": ("t5", dict(T5_XXL, **_TINY_T5)),
    },
    "sana": {
        "transformer": (
            "sana",
            dict(
                SANA_1600M,
                in_channels=4,
                out_channels=4,
                num_attention_heads=2,
                attention_head_dim=8,
                num_layers=2,
                num_cross_attention_heads=2,
                cross_attention_head_dim=8,
                cross_attention_dim=16,
                caption_channels=16,
                sample_size=8,
            ),
        ),
        "vae": (
            "dc_vae",
            dict(
                DC_AE_F32C32,
                latent_channels=4,
                attention_head_dim=4,
                encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                encoder_block_out_channels=(8, 16, 16),
                decoder_block_out_channels=(8, 16, 16),
                encoder_layers_per_block=(1, 1, 1),
                decoder_layers_per_block=(1, 1, 1),
                encoder_qkv_multiscales=((), (), (5,)),
                decoder_qkv_multiscales=((), (), (5,)),
            ),
        ),
        "text_encoder": ("gemma", dict(GEMMA2_2B, **_TINY_GEMMA)),
    },
}

# ---- schedulers (each repo's scheduler/scheduler_config.json) ------------------------------------------------

_SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
_PIXART_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
_DPM = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True)
SCHEDULERS: dict[str, Callable[[], Any]] = {
    # the repo's is PNDM (one extra UNet call per run); DDIM is what the job's `--sampler auto` runs
    "sd15": lambda: DDIMScheduler(**SD15_DDIM),
    "sdxl": lambda: EulerDiscreteScheduler(
        **_SD_BETAS,
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
    ),
    "sd3": lambda: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    "flux": lambda: FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
    "pixart": lambda: DPMSolverMultistepScheduler(**_PIXART_BETAS, prediction_type="epsilon", **_DPM),
    "sana": lambda: DPMSolverMultistepScheduler(
        **_PIXART_BETAS, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, **_DPM
    ),
}

PIPELINES: dict[str, type] = {
    "sd15": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
    "pixart": PixArtAlphaPipeline,
    "sana": SanaPipeline,
}
PIPELINE_EXTRAS: dict[str, dict[str, Any]] = {
    "sd15": {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
    "sdxl": {"add_watermarker": False},
}
TOKENIZERS: dict[str, dict[str, str]] = {
    "sd15": {"tokenizer": "clip"},
    "sdxl": {"tokenizer": "clip", "tokenizer_2": "clip"},
    "sd3": {"tokenizer": "clip", "tokenizer_2": "clip", "tokenizer_3": "t5"},
    "flux": {"tokenizer": "clip", "tokenizer_2": "t5"},
    "pixart": {"tokenizer": "t5"},
    "sana": {"tokenizer": "gemma"},
}
#: what the stock call needs besides the common arguments (no resolution bins: the size asked is the size made)
STOCK_EXTRAS: dict[str, dict[str, Any]] = {
    "pixart": {"use_resolution_binning": False, "clean_caption": False},
    "sana": {"use_resolution_binning": False, "clean_caption": False},
}
NOTES: dict[str, str] = {
    "sd15": "stock runs DDIM (the repo's PNDM makes one extra UNet call); CFG as one doubled batch in both",
    "sdxl": "stock keeps Euler, the job runs DDIM (--sampler auto); CFG as one doubled batch in both",
    "sd3": "rectified flow, FlowMatchEuler in both; CFG as one doubled batch in both",
    "flux": "guidance-distilled: the guidance scale is a transformer input, one pass per step in both (no CFG batch)",
    "pixart": "stock keeps DPM-Solver++, the job runs DDIM (--sampler auto); CFG as one doubled batch in both",
    "sana": "flow DPM-Solver in both; CFG as one doubled batch; char-level Gemma tokens inflate stock text encoding",
}

# ---- tokenizers: character-level, built offline, with the real maximum lengths -------------------------------

_CHARS = string.ascii_letters + string.digits + string.punctuation


def clip_tokenizer(folder: Path, max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer over single characters (vocab.json + an empty merges.txt written to `folder`), padded to
    77 tokens as CLIP's (token ids: start 0, end and pad 1)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase + string.digits + string.punctuation:
            vocab[c + suffix] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer whose Unigram model knows single characters (pad 0, eos 1, unk 2 as T5's); the pipelines pad
    to their own `max_sequence_length` (SD3 256, Flux 512, PixArt 120)."""
    pieces = ["▁", *_CHARS]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -math.log(len(pieces))) for p in pieces]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def gemma_tokenizer() -> GemmaTokenizerFast:
    """A Gemma tokenizer whose BPE model knows single characters, no merges (pad 0, eos 1, bos 2 as Gemma's)."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for piece in ["▁", "\n", *_CHARS]:
        vocab[piece] = len(vocab)
    return GemmaTokenizerFast(vocab=vocab, merges=[], add_bos_token=True, add_eos_token=False, model_max_length=8192)


def make_tokenizers(family: str, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kind in TOKENIZERS[family].items():
        if kind == "clip":
            out[name] = clip_tokenizer(tmp / family / name)
        elif kind == "t5":
            out[name] = t5_tokenizer()
        else:
            out[name] = gemma_tokenizer()
    return out


# ---- networks -------------------------------------------------------------------------------------------------


def build_component(kind: str, config: dict[str, Any]) -> torch.nn.Module:
    """One network of a pipeline from its config (random weights; on the current default device and dtype)."""
    if kind == "unet":
        return UNet2DConditionModel(**config)
    if kind == "sd3":
        return SD3Transformer2DModel(**config)
    if kind == "flux":
        return FluxTransformer2DModel(**config)
    if kind == "pixart":
        return PixArtTransformer2DModel(**config)
    if kind == "sana":
        return SanaTransformer2DModel(**config)
    if kind == "kl_vae":
        return AutoencoderKL(**config)
    if kind == "dc_vae":
        return AutoencoderDC(**config)
    if kind in ("clip", "clip_proj"):
        cls = CLIPTextModel if kind == "clip" else CLIPTextModelWithProjection
        return cls(CLIPTextConfig(**config, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    if kind == "t5":
        model = T5EncoderModel(T5Config(**config, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    elif kind == "gemma":
        model = Gemma2Model(Gemma2Config(**config, pad_token_id=0, eos_token_id=1, bos_token_id=2))
    else:
        raise ValueError(f"unknown component kind {kind!r}")
    model.tie_weights()  # T5's shared input embedding (`count_parameters` ties it again off the meta context)
    return model


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_parameters(families: tuple[str, ...] | list[str] = FAMILIES) -> dict[str, dict[str, dict[str, Any]]]:
    """The published networks built on the meta device (no memory): per family and component, the class, the
    measured parameter count, the published one, their ratio and the source of the published count."""
    from accelerate import init_empty_weights

    out: dict[str, dict[str, dict[str, Any]]] = {}
    for family in families:
        out[family] = {}
        for name, (kind, config) in PUBLISHED[family].items():
            with init_empty_weights():
                module = build_component(kind, config)
            if hasattr(module, "tie_weights"):  # ties made under init_empty_weights do not hold (T5's embedding)
                module.tie_weights()
            measured = parameter_count(module)
            published, source = PUBLISHED_PARAMS[family][name]
            out[family][name] = {
                "class": type(module).__name__,
                "measured": measured,
                "published": published,
                "ratio": measured / published,
                "source": source,
            }
            del module
    return out


def denoiser_name(family: str) -> str:
    return "unet" if "unet" in PUBLISHED[family] else "transformer"


@contextlib.contextmanager
def building(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Networks made directly on `device` in `dtype` (FLUX.1-dev's 12B parameters never sit in float32 or on the
    CPU), seeded."""
    old = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def build_pipeline(
    family: str, shapes: dict[str, dict[str, tuple[str, dict[str, Any]]]], tmp: Path, device, dtype
) -> Any:
    """The family's stock diffusers pipeline with `shapes`' networks (random weights) on `device` in `dtype`."""
    modules: dict[str, Any] = {}
    with building(device, dtype):
        for name, (kind, config) in shapes[family].items():
            modules[name] = build_component(kind, config).train(False).requires_grad_(False)
    pipe = PIPELINES[family](
        **modules,
        **make_tokenizers(family, tmp),
        scheduler=SCHEDULERS[family](),
        **PIPELINE_EXTRAS.get(family, {}),
    )
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_latents(model: LoadedModel, count: int, size: int, seed: int = 0) -> torch.Tensor:
    """`count` smooth random RGB images (bicubic-upsampled 8x8 noise, in [-1, 1]) through the job's encode."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(count, 3, 8, 8, generator=g) * 2 - 1
    images = F.interpolate(small, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
    return model.encode(images, batch_size=2).float().cpu()


# ---- measurement ----------------------------------------------------------------------------------------------


class Counted:
    """Wraps a module's forward: counts calls and (with `sync`) their wall time, the GPU synchronised around each."""

    def __init__(self, module: torch.nn.Module, device: torch.device, sync: bool):
        self.fn, self.device, self.sync = module.forward, device, sync
        self.seconds, self.calls = 0.0, 0
        module.forward = self

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if not self.sync:
            return self.fn(*args, **kwargs)
        synchronize(self.device)
        t = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            synchronize(self.device)
            self.seconds += time.perf_counter() - t


def free_memory(device: torch.device) -> None:
    """Drop what a finished call or family left on the GPU (on a CPU, tensors go with their last reference)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


class Family:
    """One family's pipeline, the job's model on it, references and the runs of each row."""

    def __init__(self, family: str, args: argparse.Namespace, tmp: Path, device: torch.device, dtype: torch.dtype):
        self.family, self.args, self.device = family, args, device
        self.resolution = args.resolution or (
            SMOKE_RESOLUTION.get(family, SMOKE_DEFAULT_RESOLUTION) if args.smoke else DEFAULT_RESOLUTION[family]
        )
        t = time.perf_counter()
        self.pipe = build_pipeline(family, SMOKE if args.smoke else PUBLISHED, tmp, device, dtype)
        synchronize(device)
        self.build_seconds = time.perf_counter() - t
        self.parameters = {
            name: parameter_count(getattr(self.pipe, name)) for name in (SMOKE if args.smoke else PUBLISHED)[family]
        }
        model = loaded_from_pipeline(self.pipe, f"{family}-random", resolution=self.resolution)
        self.model = with_sampler(model, "auto")  # as the job: DDIM for the VP families, flow models keep theirs
        self.cfg_scale = cfg_scale_for(self.config("none", 1), self.model)
        self.model.denoiser.configure(None, self.cfg_scale)
        sync = args.component_times
        self.network = Counted(getattr(self.pipe, denoiser_name(family)), device, sync)
        self.text = [
            Counted(getattr(self.pipe, name), device, sync)
            for name in PUBLISHED[family]
            if name.startswith("text_encoder")
        ]
        t = time.perf_counter()
        latents = reference_latents(self.model, args.references, self.resolution)
        self.encode_seconds = time.perf_counter() - t
        bundle = ReferenceBundle(
            latents=latents,
            labels=None,
            class_names=None,
            bandwidth=median_pairwise_distance(latents.flatten(1)),
            content_hash="random",
            model_id=self.model.model_id,
            files=[],
        )
        self.target = build_target(self.config("noisy", 1), bundle, device)
        self.prompts = SamplePrompts.single(args.prompt)

    def config(self, mode: str, batch: int) -> AugmentConfig:
        args = self.args
        return AugmentConfig(
            ref="random",
            out="",
            n=batch,
            model=self.family,
            steps=args.steps,
            batch_size=batch,
            guidance=mode,
            strength=args.strength,
            prompt=args.prompt,
        )

    def record(self) -> dict[str, Any]:
        return {
            "hub": HUB[self.family],
            "pipeline": type(self.pipe).__name__,
            "resolution": self.resolution,
            "latent_shape": list(self.model.denoiser.latent_shape),
            "cfg_scale": self.cfg_scale,
            "stock_scheduler": type(self.pipe.scheduler).__name__,
            "job_sampler": type(self.model.scheduler).__name__,
            "note": NOTES[self.family],
            "parameters": self.parameters,
            "build_seconds": self.build_seconds,
            "reference_encode_seconds": self.encode_seconds,
            "references": self.args.references,
        }

    def stock(self, batch: int) -> None:
        self.pipe(
            prompt=[self.args.prompt] * batch,
            num_inference_steps=self.args.steps,
            height=self.resolution,
            width=self.resolution,
            guidance_scale=self.cfg_scale,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **STOCK_EXTRAS.get(self.family, {}),
        )

    def job(self, mode: str, batch: int) -> None:
        cfg = self.config(mode, batch)
        generate(cfg, self.model, self.target, self.args.strength, None, list(range(batch)), None, None, self.prompts)

    def run(self, row: str, batch: int) -> dict[str, Any]:
        """One call of `row`, timed, with its peak memory and the components' share."""
        fn = (lambda: self.stock(batch)) if row == "stock" else (lambda: self.job(row.removeprefix("job/"), batch))
        for counter in (self.network, *self.text):
            counter.reset()
        free_memory(self.device)
        reset_peak(self.device)
        synchronize(self.device)
        t = time.perf_counter()
        fn()
        synchronize(self.device)
        wall = time.perf_counter() - t
        out = {"seconds": wall, "peak_memory_mib": peak_mib(self.device), "network_calls": self.network.calls}
        if self.args.component_times:
            out["network_seconds"] = self.network.seconds
            out["text_encoder_seconds"] = sum(c.seconds for c in self.text)
        return out

    def close(self) -> None:
        for name in ("pipe", "model", "target", "network", "text"):
            setattr(self, name, None)
        gc.collect()
        free_memory(self.device)


def failure(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, torch.OutOfMemoryError):
        return {"status": "oom", "message": str(exc).splitlines()[0][:300]}
    return {"status": "error", "message": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}


def time_batch(fam: Family, batch: int, repeats: int) -> dict[str, Any]:
    """Warm-up, then `repeats` rounds over the rows (rotated), each row's calls recorded; out of memory (or
    non-finite latents) ends a row, not the run."""
    runs: dict[str, list[dict[str, Any]]] = {row: [] for row in ROWS}
    failed: dict[str, dict[str, Any]] = {}

    def attempt(row: str) -> dict[str, Any] | None:
        try:
            return fam.run(row, batch)
        except (torch.OutOfMemoryError, InputError) as exc:
            failed[row] = failure(exc)
            print(f"[{fam.family} batch {batch}] {row}: {failed[row]['status']}", flush=True)
        free_memory(fam.device)  # outside the handler: the exception's frames no longer hold the tensors
        return None

    for row in ROWS:  # warm-up (allocator, kernels, the job's prompt cache)
        attempt(row)
    for rep in range(repeats):
        for row in ROWS[rep % len(ROWS) :] + ROWS[: rep % len(ROWS)]:
            if row in failed:
                continue
            result = attempt(row)
            if result is not None:
                runs[row].append(result)
                print(
                    f"[{fam.family} batch {batch} rep {rep}] {row:10s} {batch / result['seconds']:9.4f} samples/s  "
                    f"peak {result['peak_memory_mib'] or float('nan'):9.0f} MiB",
                    flush=True,
                )
    rows: dict[str, Any] = {}
    for row in ROWS:
        if row in failed:
            rows[row] = failed[row]
            continue
        seconds = [r["seconds"] for r in runs[row]]
        median = statistics.median(seconds)
        peaks = [r["peak_memory_mib"] for r in runs[row] if r["peak_memory_mib"] is not None]
        rows[row] = {
            "status": "ok",
            "samples": batch,
            "seconds": seconds,
            "median_seconds": median,
            "samples_per_second": batch / median,
            "peak_memory_mib": [r["peak_memory_mib"] for r in runs[row]],
            "peak_memory_mib_max": max(peaks) if peaks else None,
            "network_calls": runs[row][-1]["network_calls"],
        }
        if fam.args.component_times:
            rows[row]["network_share"] = statistics.median(r["network_seconds"] / r["seconds"] for r in runs[row])
            rows[row]["text_encoder_share"] = statistics.median(
                r["text_encoder_seconds"] / r["seconds"] for r in runs[row]
            )
    return {"rows": rows, "ratios": ratios(rows)}


def ratios(rows: dict[str, Any]) -> dict[str, float | None]:
    def sps(row: str) -> float | None:
        return rows[row].get("samples_per_second") if rows[row]["status"] == "ok" else None

    stock, none, noisy = sps("stock"), sps("job/none"), sps("job/noisy")
    out = {
        "job_none_vs_stock": none / stock if none and stock else None,
        "job_noisy_vs_job_none": noisy / none if noisy and none else None,
    }
    if stock and none and "text_encoder_share" in rows["stock"]:
        # loop against loop: the stock call's per-call prompt encoding taken out (the job's is cached per job)
        out["job_none_vs_stock_without_text_encoding"] = none / stock * (1 - rows["stock"]["text_encoder_share"])
    return out


# ---- report ---------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _cell(row: dict[str, Any]) -> str:
    return _fmt(row["samples_per_second"]) if row["status"] == "ok" else row["status"]


def _peak(row: dict[str, Any]) -> str:
    return f"{row['peak_memory_mib_max']:.0f}" if row["status"] == "ok" and row["peak_memory_mib_max"] else "–"


def shapes_markdown(shapes: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [
        "| family | component | class | measured params | published params | measured ÷ published |",
        "|---|---|---|---:|---:|---:|",
    ]
    for family, components in shapes.items():
        for name, c in components.items():
            lines.append(
                f"| {family} | {name} | {c['class']} | {c['measured']:,} | {c['published']:,} | {c['ratio']:.4f} |"
            )
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    s, d = report["settings"], report["device"]
    versions = f"torch {d['torch']}, diffusers {d['diffusers']}, transformers {d['transformers']}"
    if d["type"] == "meta":
        header = f"Meta device (no memory), {versions}; {s['seconds']:.1f} s."
    else:
        memory = f", {d['memory_gib']:.0f} GiB" if d.get("memory_gib") else ""
        header = (
            f"{d['name']} ({d['type']}{memory}), {d['dtype']}, {versions}; networks: {s['networks']}; "
            f"{s['steps']} steps, median of {s['repeats']} timed calls per row after a warm-up; job/noisy at strength "
            f'{s["strength"]:g} toward {s["references"]} random references. samples/s; "no text": the stock '
            "call's prompt encoding taken out (the job encodes each prompt once per job)."
        )
    lines = ["# bench_families", "", header, ""]
    if "shapes" in report:
        lines += [
            "## Parameters: published shapes (meta device) vs published counts",
            "",
            shapes_markdown(report["shapes"]),
            "",
        ]
    if report.get("families"):
        lines += [
            "## Samples per second",
            "",
            "| family | px | CFG | batch | stock | job/none | job/noisy | none ÷ stock | none ÷ stock (no text) "
            "| noisy ÷ none | peak MiB stock / none / noisy |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for family, fam in report["families"].items():
            if fam.get("status") in ("oom", "error"):
                lines.append(f"| {family} | | | | {fam['status']} | | | | | | |")
                continue
            for batch, b in fam["batches"].items():
                rows, r = b["rows"], b["ratios"]
                lines.append(
                    f"| {family} | {fam['resolution']} | {fam['cfg_scale']:g} | {batch} | "
                    + " | ".join(_cell(rows[row]) for row in ROWS)
                    + f" | {_fmt(r['job_none_vs_stock'])} | {_fmt(r.get('job_none_vs_stock_without_text_encoding'))}"
                    + f" | {_fmt(r['job_noisy_vs_job_none'])} | "
                    + " / ".join(_peak(rows[row]) for row in ROWS)
                    + " |"
                )
        lines += ["", "Notes:", ""]
        lines += [f"- {family}: {fam['note']}" for family, fam in report["families"].items() if "note" in fam]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))


# ---- main -----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    ap.add_argument("--smoke", action="store_true", help="tiny networks of the same classes, 2 steps (seconds, CPU)")
    ap.add_argument(
        "--check-shapes",
        action="store_true",
        help="only count the published networks' parameters (meta device) against the published counts",
    )
    ap.add_argument("--device", default="auto", help="auto = cuda when present, else cpu")
    ap.add_argument("--dtype", default="auto", help="auto = bfloat16 (else float16) on CUDA, float32 on CPU")
    ap.add_argument("--batch-sizes", default=None, help="comma list (default 1,4; smoke 1,2)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 20 on CUDA, 2 on CPU and smoke)")
    ap.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: each family's)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per row, median reported (default 2)")
    ap.add_argument("--strength", type=float, default=0.05, help="strength of the guided rows (noisy)")
    ap.add_argument("--references", type=int, default=16, help="random reference images the guided rows aim at")
    ap.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    ap.add_argument(
        "--component-times",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the denoiser and text encoders within each call (synchronises the GPU around each call)",
    )
    ap.add_argument("--out", default="runs/bench_families.json", help="JSON report; the markdown table goes next to it")
    args = ap.parse_args(argv)
    args.family_list = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(args.family_list) - set(FAMILIES))
    if unknown:
        ap.error(f"--families: unknown {', '.join(unknown)} (choose from {', '.join(FAMILIES)})")
    cuda = not args.check_shapes and resolve_device(args.device).type == "cuda"
    args.steps = args.steps or (20 if cuda and not args.smoke else 2)
    args.batch_size_list = [int(b) for b in (args.batch_sizes or ("1,2" if args.smoke else "1,4")).split(",")]
    args.repeats = args.repeats or (1 if args.smoke else 2)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    settings = {
        k: v for k, v in vars(args).items() if k not in ("family_list", "batch_size_list", "families", "batch_sizes")
    }
    settings |= {
        "families": args.family_list,
        "batch_sizes": args.batch_size_list,
        "networks": "smoke (tiny)" if args.smoke else "published shapes, random weights",
    }
    versions = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    if args.check_shapes:
        t = time.perf_counter()
        shapes = count_parameters(args.family_list)
        settings |= {"networks": "published shapes on the meta device", "seconds": time.perf_counter() - t}
        report = {
            "settings": settings,
            "device": {"type": "meta", "name": "meta (no memory)", "dtype": "-", **versions},
            "shapes": shapes,
        }
        print(shapes_markdown(shapes))
        write(report, out)
        return report

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    configure_backends(device)
    cuda = device.type == "cuda"
    report: dict[str, Any] = {
        "settings": settings,
        "device": {
            "type": device.type,
            "name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
            "memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
            "cpu_threads": torch.get_num_threads(),
            "dtype": str(dtype).removeprefix("torch."),
            **versions,
        },
        "families": {},
    }
    if not args.smoke:
        report["shapes"] = count_parameters(args.family_list)
    with tempfile.TemporaryDirectory() as tmp_name:
        for family in args.family_list:
            print(f"== {family} ({HUB[family]})", flush=True)
            try:
                fam = Family(family, args, Path(tmp_name), device, dtype)
            except torch.OutOfMemoryError as exc:  # its networks (or the references' encoding) do not fit
                report["families"][family] = {"hub": HUB[family], "note": NOTES[family], **failure(exc)}
                print(f"[{family}] out of memory: {report['families'][family]['message']}", flush=True)
                fam = None
            if fam is None:
                gc.collect()  # the failed build's modules went with the exception
                free_memory(device)
                write(report, out)
                continue
            record = fam.record() | {"status": "ok", "batches": {}}
            report["families"][family] = record
            for batch in args.batch_size_list:
                record["batches"][str(batch)] = time_batch(fam, batch, args.repeats)
                write(report, out)
            fam.close()
            write(report, out)
    write(report, out)
    print(markdown(report))
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
