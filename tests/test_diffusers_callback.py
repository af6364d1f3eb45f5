"""MMDGuidanceCallback on tiny random diffusers pipelines built from configs (offline, no weights fetched).

Stable Diffusion (UNet2DConditionModel + AutoencoderKL + a tiny CLIP text encoder and tokenizer written to a
temp dir) and Flux (packed latents, a VAE with a shift factor). The callback must move samples toward the
references, apply the job's `noisy` update exactly (same numbers as `pipeline.models.sampling.sample_latents`), work
with batched prompts, `num_images_per_prompt` and CFG on or off, and refuse pipelines without the hook.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DiTPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
)
from PIL import Image
from tiny_models import save_tiny_ddpm, save_tiny_dit, tiny_unet_condition, tiny_vae, write_reference_folder
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from guidance import ProductKernel, guidance_step, noisy_guidance_update
from pipeline.checks.pilot import FALLBACK_STRENGTH
from pipeline.config import AugmentConfig
from pipeline.integrations.diffusers_callback import (
    LatentEncoding,
    MMDGuidanceCallback,
    encode_references,
    latent_encoding,
    pool_prompt_embeds,
)
from pipeline.models.adapters import UNet2DConditionAdapter
from pipeline.models.sampling import initial_noise, sample_latents
from storage.errors import InputError

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["red", "blue"]
STEPS = 4


# ---------------------------------------------------------------------------------------------- builders


def tiny_clip(tmp: Path) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A 2-layer CLIP text encoder (hidden 12 = the tiny UNet's cross-attention width) and the benchmark's
    character-level CLIP tokenizer (vocabulary written to `tmp`, 16 tokens)."""
    tokenizer = load_benchmark().char_tokenizer(tmp, max_length=16)
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=12,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval(), tokenizer


def tiny_rgb_vae(**config) -> AutoencoderKL:
    """3-channel tiny VAE. The scaling factor brings the random encoder's latents (std 0.27) to the scale of
    the random denoisers' samples, so the kernel sees both."""
    return tiny_vae(3, **{"scaling_factor": 20.0, **config}).eval()


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_real_size", REPO / "benchmarks" / "bench_real_size.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_sd(tmp: Path) -> StableDiffusionPipeline:
    text_encoder, tokenizer = tiny_clip(tmp / "tokenizer")
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_rgb_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet_condition().eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux() -> FluxPipeline:
    """Flux with no text encoders (the tests pass prompt embeddings); 16x16 images -> 8x8 latents packed to
    [16, 16] tokens; a VAE with a shift factor, as Flux's."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_rgb_vae(scaling_factor=4.0, shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_captioned_references(root: Path, count: int = 16) -> Path:
    """Two groups of RGB references with captions 'red' and 'blue' (sidecar .txt files)."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        caption = PROMPTS[i % 2]
        arr = (rng.random((16, 16, 3)) * 80).astype(np.uint8)
        arr[..., 0 if caption == "red" else 2] += 170
        Image.fromarray(arr, mode="RGB").save(root / f"img_{i:03d}.png")
        (root / f"img_{i:03d}.txt").write_text(caption)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diffusers_callback")
    return {
        "tmp": tmp,
        "sd": tiny_sd(tmp),
        "refs": write_reference_folder(tmp / "refs", count=16, size=16),
        "captioned": write_captioned_references(tmp / "captioned"),
        "cache": str(tmp / "cache"),
    }


def sd_latents(pipe, guide=None, *, cfg: float = 1.0, per_prompt: int = 1, prompts=PROMPTS, **kwargs):
    """Final latents of a seeded pipeline call (DDIM η = 0, deterministic)."""
    out = pipe(
        list(prompts),
        num_inference_steps=STEPS,
        guidance_scale=cfg,
        num_images_per_prompt=per_prompt,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        callback_on_step_end=guide,
        **kwargs,
    )
    return out.images


# ---------------------------------------------------------------------------------------------- SD


@pytest.mark.parametrize(("cfg", "per_prompt"), [(1.0, 1), (4.0, 1), (1.0, 3), (4.0, 2)])
def test_callback_moves_samples_toward_the_references(world, cfg, per_prompt):
    pipe = world["sd"]
    guide = MMDGuidanceCallback.from_references(pipe, world["refs"], strength=0.2, cache_dir=world["cache"])
    target = guide.guidance.target
    plain = sd_latents(pipe, cfg=cfg, per_prompt=per_prompt)
    guided = sd_latents(pipe, guide, cfg=cfg, per_prompt=per_prompt)
    assert guided.shape == plain.shape == (len(PROMPTS) * per_prompt, 4, 8, 8)
    before, after = float(target.mmd2(plain)), float(target.mmd2(guided))
    assert after < 0.7 * before, (before, after)
    assert len(guide.mmd2_trace) == STEPS  # one guided step per sampler step, batch-coupled over all images


def test_callback_is_the_jobs_noisy_update(world):
    """Same numbers as the job's loop (`sample_latents`, mode noisy) on the same model, noise and schedule."""
    pipe = world["sd"]
    guide = MMDGuidanceCallback.from_references(pipe, world["refs"], strength=0.2, cache_dir=world["cache"])
    seeds = [11, 12, 13]
    prompts = ["red", "blue", "red"]
    noise = initial_noise(seeds, (4, 8, 8))
    for cfg in (1.0, 3.0):
        ours = pipe(
            prompts,
            latents=noise.clone(),
            num_inference_steps=STEPS,
            guidance_scale=cfg,
            output_type="latent",
            callback_on_step_end=guide,
        ).images
        trace = guide.mmd2_trace
        denoiser = UNet2DConditionAdapter(pipe.unet, pipe.text_encoder, pipe.tokenizer)
        # the job's loop with the same UNet as its adapter (prompt embeddings: strings + CFG would not concat)
        condition = denoiser.encode_prompts(prompts)
        job = sample_latents(
            denoiser,
            pipe.scheduler,
            seeds,
            num_steps=STEPS,
            condition=condition,
            cfg_scale=cfg,
            guidance=guide.guidance,
            eta=0.0,
        )
        torch.testing.assert_close(ours, job.latents, rtol=1e-4, atol=1e-4)
        assert trace == pytest.approx(job.mmd2_trace, rel=1e-4)
        unguided = sample_latents(denoiser, pipe.scheduler, seeds, num_steps=STEPS, condition=condition, cfg_scale=cfg)
        assert (unguided.latents - ours).abs().max() > 1e-2  # the guidance did move them


def test_one_step_equals_the_closed_form_update(world):
    pipe = world["sd"]
    guide = MMDGuidanceCallback.from_references(
        pipe, world["refs"], strength=0.05, normalization="batch", cache_dir=world["cache"]
    )
    pipe.scheduler.set_timesteps(10)
    pipe._num_timesteps = 10
    x = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    out = guide(pipe, 2, pipe.scheduler.timesteps[2], {"latents": x.clone()})["latents"]
    grad, _ = guide.guidance.target.grad(x)
    torch.testing.assert_close(out, x - guidance_step(grad, x, 0.05, "batch"))
    assert guide.guidance.normalization == "batch"


def test_settings_come_from_the_jobs_config(world):
    pipe = world["sd"]
    config = AugmentConfig(
        ref="elsewhere",
        out="x",
        n=10,
        guidance="latent",
        kernel="cubic",
        strength=0.3,
        schedule="interval",
        schedule_start=0.5,
        memory=4,
        cache_dir=world["cache"],
    )
    guide = MMDGuidanceCallback.from_references(pipe, world["refs"], config=config, normalization="raw")
    g = guide.guidance
    assert (g.mode, g.normalization, type(g.target.kernel).__name__) == ("noisy", "raw", "CubicPolynomialKernel")
    assert g.schedule(0.25) == 0.0 and g.schedule(0.5) == 0.3
    sd_latents(pipe, guide, per_prompt=2)
    assert len(guide.mmd2_trace) == STEPS // 2  # the interval schedule guides the second half only
    assert len(g.memory) == 4  # the finished latents join the sample memory
    guide.reset()
    assert len(g.memory) == 0
    off = MMDGuidanceCallback.from_references(pipe, world["refs"], strength=0.0, cache_dir=Path(world["cache"]))
    torch.testing.assert_close(sd_latents(pipe, off), sd_latents(pipe))


def test_references_are_encoded_once_and_cached(world, monkeypatch):
    pipe = world["sd"]
    cache = str(world["tmp"] / "cache-once")
    first, _ = encode_references(pipe, world["refs"], cache_dir=cache)
    calls = []
    encode = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    second, _ = encode_references(pipe, world["refs"], cache_dir=cache)
    assert not first.reused and second.reused and calls == []
    torch.testing.assert_close(first.latents, second.latents)
    # the latents are the pipeline's: posterior mode × scaling factor (SD has no shift)
    image = torch.zeros(1, 3, 16, 16)
    z = pipe.vae.encode(image).latent_dist.mode()
    torch.testing.assert_close(LatentEncoding(20.0).apply(z), z * 20.0)
    assert first.latents.shape == (16, 4, 8, 8) and first.bandwidth > 0


def test_prompt_aware_uses_the_positive_prompt_embeddings(world):
    pipe = world["sd"]
    guide = MMDGuidanceCallback.from_references(pipe, world["captioned"], strength=0.2, cache_dir=world["cache"])
    assert guide.prompt_aware and guide.tensor_inputs == ["latents", "prompt_embeds"]
    target = guide.guidance.target
    assert isinstance(target.kernel, ProductKernel)
    # reference conditions: the pipeline's own embeddings of the captions, pooled over tokens
    with torch.no_grad():
        red = pool_prompt_embeds(pipe.encode_prompt(["red"], "cpu", 1, False)[0])
        blue = pool_prompt_embeds(pipe.encode_prompt(["blue"], "cpu", 1, False)[0])
    captions = [(world["captioned"] / f"img_{i:03d}.txt").read_text() for i in range(16)]
    expected = torch.cat([red if c == "red" else blue for c in captions])
    torch.testing.assert_close(target.reference_conditions, expected)
    seen = {}

    def spy(p, step, t, kwargs):
        seen["rows"] = kwargs["prompt_embeds"].shape[0]
        out = guide(p, step, t, kwargs)
        seen["value"] = guide.mmd2_trace[-1]
        seen["latents"] = kwargs["latents"]
        return out

    spy.tensor_inputs = guide.tensor_inputs
    prompts = ["red", "blue", "red"]
    for cfg in (1.0, 4.0):
        pipe(
            prompts,
            num_inference_steps=1,
            guidance_scale=cfg,
            num_images_per_prompt=2,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            callback_on_step_end=spy,
            callback_on_step_end_tensor_inputs=guide.tensor_inputs,
        )
        assert seen["rows"] == (12 if cfg > 1 else 6)  # [negative; positive] under CFG
        conditions = torch.cat([red if p == "red" else blue for p in prompts for _ in range(2)])
        grad_value = target.mmd2(seen["latents"], x_cond=conditions)  # guided latents: MMD² after the move
        before = seen["value"]
        assert float(grad_value) < before  # the step lowered the prompt-conditional MMD²
    # each image's kernel weight on a reference of its own prompt is 1, on the other prompt's below 1
    k = target.kernel.condition_kernel.matrix(torch.cat([red, blue]), torch.cat([red, blue]))
    assert k[0, 0] == pytest.approx(1.0) and k[0, 1] < 0.99


def test_prompt_aware_needs_the_prompt_embeddings(world):
    pipe = world["sd"]
    guide = MMDGuidanceCallback.from_references(pipe, world["captioned"], strength=0.2, cache_dir=world["cache"])
    pipe._num_timesteps = STEPS
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs=guide.tensor_inputs"):
        guide(pipe, 0, 999, {"latents": torch.randn(2, 4, 8, 8)})
    plain = MMDGuidanceCallback.from_references(
        pipe, world["captioned"], strength=0.2, prompt_aware=False, cache_dir=world["cache"]
    )
    assert plain.tensor_inputs == ["latents"] and not isinstance(plain.guidance.target.kernel, ProductKernel)
    with pytest.raises(ValueError, match="captions"):
        MMDGuidanceCallback.from_references(pipe, world["refs"], prompt_aware=True, cache_dir=world["cache"])


def test_wrong_resolution_is_a_clear_error(world):
    pipe = world["sd"]
    guide = MMDGuidanceCallback.from_references(pipe, world["refs"], cache_dir=world["cache"])
    with pytest.raises(ValueError, match="generate at height=16, width=16"):
        sd_latents(pipe, guide, height=32, width=32)


def test_bad_references_and_settings_are_refused(world, tmp_path):
    pipe = world["sd"]
    with pytest.raises(InputError, match="does not exist"):
        MMDGuidanceCallback.from_references(pipe, tmp_path / "missing", cache_dir=world["cache"])
    with pytest.raises(ValueError, match="strength"):
        MMDGuidanceCallback.from_references(pipe, world["refs"], strength=-1.0, cache_dir=world["cache"])
    with pytest.raises(ValueError, match="kernel"):
        MMDGuidanceCallback.from_references(pipe, world["refs"], kernel="gaussian", cache_dir=world["cache"])


def test_pipelines_without_the_hook_point_to_augment(world):
    for folder in (save_tiny_ddpm(world["tmp"] / "ddpm"), save_tiny_dit(world["tmp"] / "dit")):
        cls = DDPMPipeline if folder.name == "ddpm" else DiTPipeline
        pipe = cls.from_pretrained(folder)
        with pytest.raises(TypeError, match=rf"{cls.__name__} has no callback_on_step_end hook.*augment"):
            MMDGuidanceCallback.from_references(pipe, world["refs"], cache_dir=world["cache"])


# ---------------------------------------------------------------------------------------------- latent spaces


@pytest.mark.parametrize(
    ("config", "decode"),
    [
        # each pipeline's own decode step (the inverse of what the callback's encoding must do)
        ({"scaling_factor": 0.18215}, lambda lat, c: lat / c["scaling_factor"]),  # SD 1.x/2.x
        (
            {"scaling_factor": 1.5305, "shift_factor": 0.0609},  # SD3 / Flux
            lambda lat, c: lat / c["scaling_factor"] + c["shift_factor"],
        ),
        (
            {"scaling_factor": 0.5, "latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [2.0, 1.0, 0.5, 4.0]},
            lambda lat, c: (
                lat * torch.tensor(c["latents_std"]).view(1, 4, 1, 1) / c["scaling_factor"]
                + torch.tensor(c["latents_mean"]).view(1, 4, 1, 1)
            ),  # SDXL VAEs with latent statistics
        ),
    ],
)
def test_latent_encoding_inverts_the_pipelines_decode(config, decode):
    class Pipe:
        vae = tiny_rgb_vae(**config)

    encoding = latent_encoding(Pipe())
    z = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(decode(encoding.apply(z), config), z)
    assert not encoding.packed


def test_flux_packed_latents(world):
    pipe = tiny_flux()
    assert latent_encoding(pipe).packed and latent_encoding(pipe).shift == 0.1
    guide = MMDGuidanceCallback.from_references(
        pipe, world["refs"], strength=0.2, height=16, width=16, cache_dir=world["cache"]
    )
    target = guide.guidance.target
    # references: (posterior mode − shift) × scale, in the unpacked [C, H, W] layout
    bundle, _ = encode_references(pipe, world["refs"], height=16, width=16, cache_dir=world["cache"])
    assert bundle.reused and bundle.latents.shape == (16, 4, 8, 8)

    # one callback step: unpack, the job's noisy update, pack back
    pipe.scheduler.set_timesteps(STEPS)
    pipe._num_timesteps = STEPS
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    packed = FluxPipeline._pack_latents(x, 3, 4, 8, 8)
    out = guide(pipe, 1, pipe.scheduler.timesteps[1], {"latents": packed})["latents"]
    expected, _ = noisy_guidance_update(x, guide.guidance.target, 0.2, guide.guidance.normalization)
    torch.testing.assert_close(out, FluxPipeline._pack_latents(expected, 3, 4, 8, 8))

    # whole runs on a batch of 4 prompt embeddings (Flux does not repeat given embeddings per image)
    embeds = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1))
    pooled = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))

    def run(callback):
        latents = pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            height=16,
            width=16,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=guide.tensor_inputs,
        ).images
        return FluxPipeline._unpack_latents(latents, 16, 16, pipe.vae_scale_factor)

    plain, guided = run(None), run(guide)
    assert guided.shape == (4, 4, 8, 8)
    assert float(target.mmd2(guided)) < 0.7 * float(target.mmd2(plain))
    with pytest.raises(ValueError, match="generate at height=16, width=16"):
        guide(pipe, 0, 1.0, {"latents": torch.randn(2, 64, 16)})


def test_example_script_help():
    """The example for a real checkpoint (not run here: it loads weights by hub id) parses and documents itself."""
    example = REPO / "examples" / "diffusers_callback.py"
    done = subprocess.run([sys.executable, str(example), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--model" in done.stdout and "--ref" in done.stdout
    spec = importlib.util.spec_from_file_location("diffusers_callback_example", example)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--model", "some/hub-id", "--ref", "refs", "--prompt", "a", "--prompt", "b"])
    assert (args.model, args.prompt, args.strength) == (
        "some/hub-id",
        ["a", "b"],
        FALLBACK_STRENGTH,  # the callback runs no pilot: the job's fixed fallback
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_pipeline_on_cuda(world, dtype):
    """A half-precision pipeline on the GPU: the callback's math runs in float32, the latents keep their dtype."""
    pipe = tiny_sd(world["tmp"] / f"gpu-{dtype}").to("cuda", dtype)
    guide = MMDGuidanceCallback.from_references(pipe, world["refs"], strength=0.2, cache_dir=world["cache"])
    plain = sd_latents(pipe, cfg=4.0, per_prompt=2)
    guided = sd_latents(pipe, guide, cfg=4.0, per_prompt=2)
    assert guided.dtype == dtype and guided.device.type == "cuda" and torch.isfinite(guided).all()
    target = guide.guidance.target
    assert float(target.mmd2(guided.float())) < float(target.mmd2(plain.float()))
