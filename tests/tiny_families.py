"""Tiny randomly initialised diffusers text-to-image pipelines, one per model family, built offline.

`build_tiny_pipeline(family, tmp)` returns the stock diffusers pipeline of the family with tiny random modules
(seeded, in inference mode), and `save_tiny_pipeline(family, path)` writes it with `save_pretrained`, so that
`DiffusionPipeline.from_pretrained(path)` loads it back with nothing fetched (the way diffusers' own tests
build theirs, "get_dummy_components", but with no tokenizer or config from the hub: every tokenizer is
character-level and built here).

Every family but Sana makes RGB 16x16 images from 8x8 latents (KL VAEs with 2 down blocks: scale factor 2).
Sana makes 32x32 images: its pipeline requires height and width divisible by 32; its DC-AE has 3 stages
(scale factor 4), so its latents are 8x8 too.

Family      pipeline / denoiser                            scheduler                                VAE
`sd1`       StableDiffusionPipeline, UNet2DConditionModel  DDIM, SD betas, epsilon                  KL, 4 ch
`sd2`       the same                                       DDIM, SD betas, v_prediction             KL, 4 ch
`sdxl`      StableDiffusionXLPipeline, UNet "text_time"    EulerDiscrete, SD betas, epsilon         KL, 4 ch
`sd3`       StableDiffusion3Pipeline, SD3Transformer2D     FlowMatchEuler, shift 3                  KL, 16 ch, shift
`flux`      FluxPipeline, FluxTransformer2D (guidance)     FlowMatchEuler, FLUX.1-dev dynamic shift KL, 16 ch, shift
`pixart`    PixArtAlphaPipeline, PixArtTransformer2D       DPMSolverMultistep, epsilon              KL, 4 ch
`sana`      SanaPipeline, SanaTransformer2D                DPMSolverMultistep, flow_prediction,     DC-AE, 4 ch
                                                           use_flow_sigmas, flow_shift 3 (Sana's)

Text encoders: CLIP (hidden 16, 2 layers; SDXL's second and SD3's two with a projection), T5 (T5EncoderModel,
d_model 32, 2 layers) and Gemma 2 (Gemma2Model, hidden 16, 2 layers), with tokenizers over characters:
a CLIPTokenizer (vocab.json + merges.txt with no merges, written to `tmp`, 32 tokens long), a T5Tokenizer
(the `tokenizers`-backed class, = T5TokenizerFast, a Unigram over characters) and a GemmaTokenizer (a BPE
over characters with no merges). The CLIP tokenizers keep 30 characters of a prompt (spaces aside).

VAE scaling: each VAE's `scaling_factor` (and `shift_factor` for SD3/Flux) is set from the latent statistics
of its random encoder (posterior mode of images in [-1, 1]: uniform noise, smooth colour fields, red/blue
noise), so that encoded latents have about unit size, the scale of the pipelines' initial noise: rms ~1 for
the unshifted ones (KL 4-channel: mean ~0.2, std ~0.97; DC-AE: mean ~0.4, std ~0.85, as Sana's pipeline
knows no shift), mean ~0 and std ~1 for SD3/Flux. Sana's AutoencoderDC encodes to `.latent` (no
`latent_dist`; deterministic).

What callers must pass:
- height=16, width=16 for Flux (its pipeline's default size is hard-coded: 128 x vae_scale_factor = 256) and
  height=32, width=32 for Sana (its call defaults to 1024); the others default to 16 (sample_size 8 x 2).
- use_resolution_binning=False for PixArt and Sana (their bins exist only for full-size sample sizes).
- nothing for the T5/Gemma sequence lengths: the tokenizers pad/truncate to the `max_sequence_length` the
  pipelines pass (defaults SD3 256, Flux 512, PixArt 120, Sana 300; T5 has relative positions and Gemma
  rotary ones, so any length works); passing a smaller `max_sequence_length` (e.g. 16) is merely faster.
  Sana's default `complex_human_instruction` is tokenized too (about 1,100 characters, still fast).
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
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

FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl", "sd3", "flux", "pixart", "sana")

_CLIP_MAX_LENGTH = 32  # CLIP pipelines pad every prompt to the tokenizer's model_max_length
_T5_MAX_LENGTH = 512  # what T5 tokenizers declare; the pipelines pass their own max_sequence_length
_GEMMA_MAX_LENGTH = 4096
_CHARS = string.ascii_letters + string.digits + string.punctuation

# Measured on the random VAEs built here (posterior mode of 192 images in [-1, 1]: uniform noise, smooth
# colour fields, red/blue noise): 4-channel KL latents have rms 0.285 (mean 0.058, std 0.279); 16-channel KL
# latents mean 0.057, std 0.302; DC-AE latents (32x32 images) rms 1.61 (mean 0.41, std 1.55; Sana's pipeline
# has no shift). Scaled (and shifted) latents: std (rms for the unshifted ones) about 1.
_KL4_SCALING = 3.5
_KL16_SHIFT = 0.057
_KL16_SCALING = 3.3
_DC_SCALING = 0.62

_SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# ---------------------------------------------------------------------------------------------- tokenizers


def _clip_tokenizer(folder: Path, max_length: int = _CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """A CLIP tokenizer over single characters (vocab.json + an empty merges.txt written to `folder`)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase + string.digits + string.punctuation:
            vocab[c + suffix] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def _t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer whose Unigram model knows single characters only (no sentencepiece file, no sentinels)."""
    pieces = ["▁", *_CHARS]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -math.log(len(pieces))) for p in pieces]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=_T5_MAX_LENGTH)


def _gemma_tokenizer() -> GemmaTokenizerFast:
    """A Gemma tokenizer whose BPE model knows single characters only (no merges; unknown ones -> <unk>); it
    prepends <bos> as Gemma's does."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for piece in ["▁", "\n", *_CHARS]:
        vocab[piece] = len(vocab)
    return GemmaTokenizerFast(
        vocab=vocab, merges=[], add_bos_token=True, add_eos_token=False, model_max_length=_GEMMA_MAX_LENGTH
    )


# ---------------------------------------------------------------------------------------------- text encoders


def _clip_config(tokenizer: CLIPTokenizer, hidden: int = 16, projection: int = 16) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _clip(tokenizer: CLIPTokenizer, hidden: int = 16) -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(_clip_config(tokenizer, hidden)).train(False)


def _clip_with_projection(tokenizer: CLIPTokenizer, hidden: int = 16, projection: int = 16):
    torch.manual_seed(0)
    return CLIPTextModelWithProjection(_clip_config(tokenizer, hidden, projection)).train(False)


def _t5(tokenizer: T5TokenizerFast, d_model: int = 32) -> T5EncoderModel:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).train(False)


def _gemma(tokenizer: GemmaTokenizerFast, hidden: int = 16) -> Gemma2Model:
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=_GEMMA_MAX_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Gemma2Model(config).train(False)


# ---------------------------------------------------------------------------------------------- VAEs


def _kl_vae(latent_channels: int = 4, **config) -> AutoencoderKL:
    """16x16 RGB images -> `latent_channels` x 8 x 8 latents; `config` adds scaling/shift factors and so on."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        **config,
    ).train(False)


def _dc_vae(**config) -> AutoencoderDC:
    """A deep-compression autoencoder with 3 stages (scale factor 4): 32x32 RGB -> 4 x 8 x 8 latents."""
    torch.manual_seed(0)
    return AutoencoderDC(
        in_channels=3,
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
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        **config,
    ).train(False)


# ---------------------------------------------------------------------------------------------- denoisers


def _unet(cross_attention_dim: int, **config) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=4,
        cross_attention_dim=cross_attention_dim,
        **config,
    ).train(False)


# ---------------------------------------------------------------------------------------------- families


def _sd(tmp: Path, prediction_type: str, **unet_config) -> StableDiffusionPipeline:
    tokenizer = _clip_tokenizer(tmp / "tokenizer")
    scheduler = DDIMScheduler(
        **_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type
    )
    return StableDiffusionPipeline(
        vae=_kl_vae(scaling_factor=_KL4_SCALING),
        text_encoder=_clip(tokenizer),
        tokenizer=tokenizer,
        unet=_unet(
            16,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4,
            **unet_config,
        ),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sd1(tmp: Path) -> StableDiffusionPipeline:
    return _sd(tmp, "epsilon")


def _sd2(tmp: Path) -> StableDiffusionPipeline:
    return _sd(tmp, "v_prediction", use_linear_projection=True)


def _sdxl(tmp: Path) -> StableDiffusionXLPipeline:
    tokenizer = _clip_tokenizer(tmp / "tokenizer")
    tokenizer_2 = _clip_tokenizer(tmp / "tokenizer_2")
    text_encoder = _clip(tokenizer, hidden=16)
    text_encoder_2 = _clip_with_projection(tokenizer_2, hidden=16, projection=16)
    time_dim = 8
    unet = _unet(
        16 + 16,  # the two encoders' penultimate hidden states, concatenated
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + 16,  # 6 time ids + the pooled projection
    )
    scheduler = EulerDiscreteScheduler(
        **_SD_BETAS,
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=_kl_vae(scaling_factor=_KL4_SCALING),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )


def _sd3(tmp: Path) -> StableDiffusion3Pipeline:
    tokenizer = _clip_tokenizer(tmp / "tokenizer")
    tokenizer_2 = _clip_tokenizer(tmp / "tokenizer_2")
    tokenizer_3 = _t5_tokenizer()
    text_encoder = _clip_with_projection(tokenizer, hidden=16, projection=16)
    text_encoder_2 = _clip_with_projection(tokenizer_2, hidden=16, projection=16)
    text_encoder_3 = _t5(tokenizer_3, d_model=32)  # >= 16 + 16: the CLIP states are zero-padded to its width
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=16 + 16,
        pos_embed_max_size=16,
    ).train(False)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_kl_vae(
            16,
            scaling_factor=_KL16_SCALING,
            shift_factor=_KL16_SHIFT,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _flux(tmp: Path) -> FluxPipeline:
    tokenizer = _clip_tokenizer(tmp / "tokenizer")
    tokenizer_2 = _t5_tokenizer()
    text_encoder = _clip(tokenizer, hidden=16)
    text_encoder_2 = _t5(tokenizer_2, d_model=32)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * 16,  # 2x2 patches of the 16-channel latents, packed by the pipeline
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    ).train(False)
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_kl_vae(
            16,
            scaling_factor=_KL16_SCALING,
            shift_factor=_KL16_SHIFT,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _pixart(tmp: Path) -> PixArtAlphaPipeline:
    tokenizer = _t5_tokenizer()
    text_encoder = _t5(tokenizer, d_model=32)
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=32,
        in_channels=4,
        out_channels=8,  # learned variance, as PixArt-alpha's (the pipeline keeps the first half)
        cross_attention_dim=16,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).train(False)
    scheduler = DPMSolverMultistepScheduler(  # PixArt-alpha's
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
    )
    return PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_kl_vae(scaling_factor=_KL4_SCALING),
        transformer=transformer,
        scheduler=scheduler,
    )


def _sana(tmp: Path) -> SanaPipeline:
    tokenizer = _gemma_tokenizer()
    text_encoder = _gemma(tokenizer, hidden=16)
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
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
        patch_size=1,
    ).train(False)
    scheduler = DPMSolverMultistepScheduler(  # Sana's
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
    )
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_dc_vae(scaling_factor=_DC_SCALING),
        transformer=transformer,
        scheduler=scheduler,
    )


_BUILDERS: dict[str, Callable[[Path], DiffusionPipeline]] = {
    "sd1": _sd1,
    "sd2": _sd2,
    "sdxl": _sdxl,
    "sd3": _sd3,
    "flux": _flux,
    "pixart": _pixart,
    "sana": _sana,
}


def build_tiny_pipeline(family: str, tmp: Path) -> DiffusionPipeline:
    """The family's stock pipeline with tiny random modules; `tmp` is a scratch folder for tokenizer files."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}: one of {', '.join(FAMILIES)}")
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    pipe = _BUILDERS[family](tmp)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(family: str, path: Path) -> Path:
    """Build the family's tiny pipeline and `save_pretrained` it to `path` (tokenizer scratch files go to
    `path`/_scratch, removed afterwards); returns `path`."""
    import shutil

    path = Path(path)
    scratch = path / "_scratch"
    try:
        build_tiny_pipeline(family, scratch).save_pretrained(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path
