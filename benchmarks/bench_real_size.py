"""What MMD guidance costs at real model size: an SD 1.5-shaped UNet and VAE (random weights), side by side.

Compute does not depend on the weights, so the networks are built from Stable Diffusion 1.5's published
configs (860M-parameter UNet2DConditionModel, 84M-parameter AutoencoderKL, a 123M-parameter CLIP-L-shaped
text encoder; the values are written below, nothing is downloaded) with random weights. One run compares,
at the same batch, steps, resolution and CFG scale (DDIM, η = 0):

  job/none, job/latent (the default guidance), job/posterior (and any --modes, e.g. noisy)
        our job's loop: `pipeline.models.sampling.sample_latents` through the project's `UNet2DConditionAdapter`,
        then the job's VAE decode (`LoadedModel.decode`), guided toward encoded references by the job's
        target and settings (`build_target`, `make_guidance`);
  stock, stock+callback
        diffusers' `StableDiffusionPipeline` on the same modules, without and with `MMDGuidanceCallback`.

Every guided run uses one strength, `--strength` (default `auto`, the job's default): under `auto` the job's
own pilot (`pipeline.checks.pilot.run_pilot`) chooses it on these references and this model before the
timings, and where the pilot cannot run (fewer references than it needs: the CPU default of 8) the pilot's
documented fallback `FALLBACK_STRENGTH`, which also stands in where the pilot turns guidance off (strength 0:
a job would run unguided, and there would be no guidance to time). The output's "strength" records
{"requested", "chosen", "by": "pilot" | "fallback" | "given", "reason", "pilot_chose", "seconds", ...}. What
guidance costs hardly depends on the strength (only 0 turns it off).

For each: samples/s, the ratio to its unguided counterpart (job/* to job/none, stock+callback to stock,
job/none to stock), the share of wall time in the denoiser and in the VAE, and peak memory (CUDA:
`torch.cuda.max_memory_allocated`; CPU: the process's peak resident set size, reset before each run through
/proc/self/clear_refs). With `--flat-check` (default on CUDA) the default-guidance run generates two
batches and records the peak after each (memory must be flat in the number of samples). Optionally a
DiT-XL/2-shaped transformer through the job's loop (`--dit`), and on CUDA an out-of-memory error provoked
through the `augment` CLI to check its advice message (`--oom-check`).

    # this 2-core CPU, 256x256 (32x32 latents), about 25 minutes; absolute numbers drift with the machine's load
    # (seconds_per_denoiser_forward shows it), so compare ratios from a run on an otherwise idle machine
    python benchmarks/bench_real_size.py --size 256 --batch-sizes 2 --steps 2 --repeats 3 \
        --out runs/bench_real_size_cpu.json
    # one GPU: 512x512, bf16/fp16 (MMD math in float32), VAE slicing, batch sizes up to memory, OOM advice check
    python benchmarks/bench_real_size.py --size 512 --batch-sizes 1,4,8,16,32 --steps 30 --repeats 3 --dit --oom-check \
        --out runs/bench_real_size_gpu.json
    # the test suite: tiny networks of the same kinds (not SD 1.5's sizes), 64x64, 2 steps, a real pilot; seconds
    python benchmarks/bench_real_size.py --smoke --out /tmp/bench_real_size_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from guidance.kernels import median_pairwise_distance
from pipeline.checks.pilot import FALLBACK_STRENGTH, run_pilot
from pipeline.checks.reference import ReferenceBundle, build_target
from pipeline.config import AugmentConfig
from pipeline.integrations.diffusers_callback import MMDGuidanceCallback, encode_references
from pipeline.jobs.worker import JobContext
from pipeline.models.adapters import DiTAdapter, UNet2DConditionAdapter
from pipeline.models.generation import make_guidance
from pipeline.models.loading import LoadedModel, resolve_device, resolve_dtype
from pipeline.models.sampling import sample_latents

REPO = Path(__file__).resolve().parent.parent

# ---- Stable Diffusion 1.5's published configs (unet/, vae/, text_encoder/, scheduler/ config.json) ----------
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT = (
    dict(  # CLIP ViT-L/14 text tower; the vocabulary is the benchmark's small one (the table size costs nothing)
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
    )
)
SD15_DDIM = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
# DiT-XL/2 (facebook/DiT-XL-2-256 transformer/config.json; sample_size = latent side)
DIT_XL2 = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    patch_size=2,
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_zero",
    norm_elementwise_affine=False,
    dropout=0.0,
    activation_fn="gelu-approximate",
    attention_bias=True,
    upcast_attention=False,
    norm_num_groups=32,
)

# ---- `--smoke`: tiny networks of the same classes (seconds on a CPU; the numbers mean nothing) -------------
SMOKE_SHAPES = dict(
    unet=dict(
        SD15_UNET,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ),
    vae=dict(SD15_VAE, block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64),
    text=dict(
        SD15_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32
    ),
    dit=dict(DIT_XL2, num_attention_heads=2, attention_head_dim=8, num_layers=2, norm_num_groups=8),
)
SD15_SHAPES = dict(unet=SD15_UNET, vae=SD15_VAE, text=SD15_TEXT, dit=DIT_XL2)


# ---- measurement helpers ------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timed:
    """Wraps a callable and accumulates its wall time (synchronising the GPU around it)."""

    def __init__(self, fn: Callable[..., Any], device: torch.device):
        self.fn, self.device, self.seconds, self.calls = fn, device, 0.0, 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        synchronize(self.device)
        t = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            synchronize(self.device)
            self.seconds += time.perf_counter() - t


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = _status_kib("VmHWM")
    return None if kib is None else kib / 1024


# ---- the models ---------------------------------------------------------------------------------------------


def char_tokenizer(folder: Path, max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer over lower-case characters (no vocabulary download; no merges), padded to `max_length`
    tokens (77, SD's), with its vocab.json and merges.txt written to `folder`."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def build_sd15(
    tmp: Path, device: torch.device, dtype: torch.dtype, size: int, shapes: dict[str, dict] = SD15_SHAPES
) -> StableDiffusionPipeline:
    """SD 1.5's modules (or `shapes`' smaller ones) with random weights. The UNet's `sample_size` (a default
    resolution, no weight depends on it) is set to `size` / 8, so the stock pipeline and the job's adapter both
    generate at `size`."""
    torch.manual_seed(0)
    tokenizer = char_tokenizer(tmp / "tokenizer")
    text = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1, **shapes["text"])
    )
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**shapes["vae"]),
        text_encoder=text,
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**{**shapes["unet"], "sample_size": size // 8}),
        scheduler=DDIMScheduler(**SD15_DDIM),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    if device.type == "cuda":
        pipe.enable_vae_slicing()
    return pipe


def write_references(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """Smooth random RGB images (bicubic-upsampled 8x8 noise), PNG."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        small = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8), mode="RGB")
        small.resize((size, size), Image.BICUBIC).save(folder / f"ref_{i:03d}.png")
    return folder


def parameters_m(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


# ---- the runs -----------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path):
        self.args = args
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.pipe = build_sd15(tmp, self.device, self.dtype, args.size, args.shapes)
        self.refs = write_references(tmp / "refs", args.references, args.size)
        self.cache = tmp / "cache"
        self.unet_timer = Timed(self.pipe.unet.forward, self.device)
        self.pipe.unet.forward = self.unet_timer
        self.decode_timer = Timed(self.pipe.vae.decode, self.device)
        self.pipe.vae.decode = self.decode_timer
        self.denoiser = UNet2DConditionAdapter(self.pipe.unet, self.pipe.text_encoder, self.pipe.tokenizer)
        self.loaded = LoadedModel(
            denoiser=self.denoiser,
            scheduler=self.pipe.scheduler,
            model_id="sd15-shaped-random",
            vae=self.pipe.vae,
            image_channels=3,
            image_size=args.size,
            device=self.device,
            dtype=self.dtype,
        )
        t = time.perf_counter()
        bundle, _ = encode_references(self.pipe, self.refs, height=args.size, width=args.size, cache_dir=self.cache)
        self.encode_seconds = time.perf_counter() - t
        self.bundle = bundle
        self.defaults = AugmentConfig(
            ref=str(self.refs),
            out=str(tmp / "job"),
            n=1,
            cache_dir=str(self.cache),
            model=self.loaded.model_id,  # not the shipped prior: the pilot scores in pixel features
            steps=args.steps,
            batch_size=min(max(args.batch_size_list), 8),
            strength=args.strength,
            **args.pilot_settings,
        )
        self.strength = self.resolve_strength()

    def resolve_strength(self) -> dict[str, Any]:
        """The guided runs' strength: `--strength` if a number; under 'auto' the job's pilot on these
        references and this model (its record's choice), or the pilot's fallback where it cannot run."""
        requested = self.args.strength
        if requested != "auto":
            return {"requested": requested, "chosen": float(requested), "by": "given", "reason": None, "seconds": 0.0}
        cfg = self.defaults
        ctx = JobContext(cfg, self.loaded, self.bundle, build_target(cfg, self.bundle, self.device), None, None)
        t = time.perf_counter()
        record = run_pilot(ctx)
        seconds = time.perf_counter() - t
        chosen, reason = float(record["chosen"]), record["reason"]
        by = "pilot" if record.get("candidates") else "fallback"
        if by == "fallback" and chosen != FALLBACK_STRENGTH:
            raise RuntimeError(f"pilot gave {chosen} without candidates ({reason})")
        if chosen == 0:  # a job would run unguided; what guidance costs needs it on
            by, chosen = "fallback", FALLBACK_STRENGTH
            reason = f"the pilot turned guidance off ({reason}): the guided rows use the fallback strength"
        return {
            "requested": "auto",
            "chosen": chosen,
            "by": by,
            "reason": reason,
            "pilot_chose": float(record["chosen"]),
            "seconds": seconds,
            "candidates": [c["strength"] for c in record.get("candidates", [])],
            "samples_generated": record.get("samples_generated", 0),
        }

    def guidance(self, mode: str):
        if mode == "none":
            return None
        cfg = self.defaults.model_copy(update={"guidance": mode})
        return make_guidance(cfg, build_target(cfg, self.bundle, self.device), self.strength["chosen"])

    def prompts(self, batch: int) -> list[str]:
        return [("a photo of a cat", "a painting of a dog")[i % 2] for i in range(batch)]

    def measure(self, run: Callable[[], Any]) -> dict[str, Any]:
        self.unet_timer.reset()
        self.decode_timer.reset()
        reset_peak(self.device)
        synchronize(self.device)
        t = time.perf_counter()
        extra = run() or {}
        synchronize(self.device)
        wall = time.perf_counter() - t
        return {
            "seconds": wall,
            "denoiser_seconds": self.unet_timer.seconds,  # forward passes only (not posterior's backward)
            "denoiser_forward_calls": self.unet_timer.calls,
            # the machine's speed during this run: compare it across rows before trusting a ratio
            "seconds_per_denoiser_forward": self.unet_timer.seconds / max(1, self.unet_timer.calls),
            "vae_seconds": self.decode_timer.seconds,
            "denoiser_share": self.unet_timer.seconds / wall,
            "vae_share": self.decode_timer.seconds / wall,
            "peak_memory_mib": peak_mib(self.device),
            **extra,
        }

    def job(self, mode: str, batch: int, batches: int) -> dict[str, Any]:
        guidance = self.guidance(mode)
        vae_batch = 1 if self.device.type == "cuda" else batch  # sliced on the GPU, as the stock pipeline

        def run():
            peaks = []
            for b in range(batches):
                seeds = list(range(b * batch, (b + 1) * batch))
                condition = self.denoiser.encode_prompts(self.prompts(batch))
                result = sample_latents(
                    self.denoiser,
                    self.pipe.scheduler,
                    seeds,
                    num_steps=self.args.steps,
                    condition=condition,
                    cfg_scale=self.args.cfg,
                    guidance=guidance,
                    eta=0.0,
                    device=self.device,
                )
                self.loaded.decode(result.latents, batch_size=vae_batch)
                peaks.append(peak_mib(self.device))
            return {"peak_memory_after_batch_mib": peaks, "denoiser_calls": result.denoiser_calls}

        out = self.measure(run)
        out["samples"] = batch * batches
        return out

    def stock(self, batch: int, callback: MMDGuidanceCallback | None) -> dict[str, Any]:
        def run():
            self.pipe(
                self.prompts(batch),
                num_inference_steps=self.args.steps,
                guidance_scale=self.args.cfg,
                generator=[torch.Generator().manual_seed(s) for s in range(batch)],
                output_type="pt",
                callback_on_step_end=callback,
            )

        out = self.measure(run)
        out["samples"] = batch
        return out

    def warmup(self, batch: int) -> None:
        x = torch.randn(2 * batch, 4, self.args.size // 8, self.args.size // 8, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            emb = self.denoiser.encode_prompts(self.prompts(2 * batch))
            self.pipe.unet(x, torch.tensor(999, device=self.device), encoder_hidden_states=emb)
            self.pipe.vae.decode(x[:1])


def run_batch(bench: Bench, batch: int, modes: list[str], callback: MMDGuidanceCallback) -> dict[str, Any]:
    bench.warmup(batch)
    rows: dict[str, Any] = {}
    names = [f"job/{mode}" for mode in modes] + ["stock", "stock+callback"]
    for rep in range(bench.args.repeats):
        trial = {}
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate: load drift spreads over rows
        for name in order:
            if name.startswith("job/"):
                mode = name.removeprefix("job/")
                # memory flat in the number of samples: the default-guidance run makes two batches, peak after each
                batches = 2 if mode == bench.defaults.guidance and bench.args.flat_check else 1
                trial[name] = bench.job(mode, batch, batches)
            else:
                trial[name] = bench.stock(batch, callback if name == "stock+callback" else None)
        for name in names:
            row = trial[name]
            best = rows.get(name)
            row["samples_per_second"] = row["samples"] / row["seconds"]
            print(
                f"[batch {batch} rep {rep}] {name:16s} {row['samples_per_second']:8.4f} samples/s  "
                f"denoiser {row['denoiser_share']:5.1%}  vae {row['vae_share']:5.1%}  "
                f"peak {row['peak_memory_mib'] or float('nan'):9.0f} MiB  "
                f"{row['seconds_per_denoiser_forward']:6.2f} s/forward",
                flush=True,
            )
            if best is None or row["samples_per_second"] > best["samples_per_second"]:
                rows[name] = row
    base_job = rows["job/none"]["samples_per_second"]
    for name, row in rows.items():
        if name.startswith("job/"):
            row["ratio_to_unguided"] = row["samples_per_second"] / base_job
    rows["stock+callback"]["ratio_to_unguided"] = (
        rows["stock+callback"]["samples_per_second"] / rows["stock"]["samples_per_second"]
    )
    rows["stock"]["ratio_to_unguided"] = 1.0
    default = rows[f"job/{bench.defaults.guidance}"]
    peaks = default["peak_memory_after_batch_mib"] if bench.args.flat_check else []
    return {
        "runs": rows,
        "targets": {
            "default_guidance_vs_unguided_job (>= 0.97)": default["ratio_to_unguided"],
            "unguided_job_vs_stock (>= 0.95)": base_job / rows["stock"]["samples_per_second"],
            "callback_vs_stock (>= 0.97)": rows["stock+callback"]["ratio_to_unguided"],
            "peak_memory_batch2_vs_batch1 (flat: ~1.00)": (peaks[-1] / peaks[0]) if len(peaks) > 1 else None,
        },
    }


def dit_runs(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, batch: int, strength: float
) -> dict[str, Any]:
    """The job's loop on a DiT-XL/2-shaped transformer (class labels, CFG), none / default / posterior, guided
    at `strength` (the SD runs' strength: random reference latents give a pilot nothing to choose by)."""
    torch.manual_seed(0)
    latent = args.size // 8
    model = DiTTransformer2DModel(sample_size=latent, **args.shapes["dit"])
    model = model.to(device, dtype).eval().requires_grad_(False)
    timer = Timed(model.forward, device)
    model.forward = timer
    denoiser = DiTAdapter(model)
    scheduler = DDIMScheduler(**{**SD15_DDIM, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02})
    refs = torch.randn(args.references, 4, latent, latent, generator=torch.Generator().manual_seed(1))
    bundle = ReferenceBundle(
        latents=refs,
        labels=None,
        class_names=None,
        bandwidth=median_pairwise_distance(refs.flatten(1)),
        content_hash="random",
        model_id="dit-xl2-shaped-random",
        files=[],
    )
    defaults = AugmentConfig(ref="random", out="", n=1)
    rows = {"parameters_m": parameters_m(model)}
    labels = torch.arange(batch, device=device) % 1000
    for mode in ("none", defaults.guidance, "posterior"):
        guidance = None
        if mode != "none":
            cfg = defaults.model_copy(update={"guidance": mode})
            guidance = make_guidance(cfg, build_target(cfg, bundle, device), strength)
        timer.seconds = 0.0
        reset_peak(device)
        synchronize(device)
        t = time.perf_counter()
        sample_latents(
            denoiser,
            scheduler,
            list(range(batch)),
            num_steps=args.steps,
            condition=labels,
            cfg_scale=args.cfg,
            guidance=guidance,
            eta=0.0,
            device=device,
        )
        synchronize(device)
        wall = time.perf_counter() - t
        rows[f"job/{mode}"] = {
            "seconds": wall,
            "samples_per_second": batch / wall,
            "denoiser_share": timer.seconds / wall,
            "peak_memory_mib": peak_mib(device),
        }
        print(f"[DiT-XL/2 batch {batch}] job/{mode:10s} {batch / wall:8.4f} samples/s", flush=True)
    for mode in ("none", defaults.guidance, "posterior"):
        rows[f"job/{mode}"]["ratio_to_unguided"] = (
            rows[f"job/{mode}"]["samples_per_second"] / rows["job/none"]["samples_per_second"]
        )
    return rows


def oom_check(bench: Bench, tmp: Path) -> dict[str, Any]:
    """Provoke an out-of-memory error through the `augment` CLI (a batch far beyond memory) and record its advice."""
    folder = tmp / "sd15-random"
    bench.pipe.unet.forward = bench.unet_timer.fn  # save the plain modules
    bench.pipe.vae.decode = bench.decode_timer.fn
    bench.pipe.save_pretrained(folder)
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "--model",
        str(folder),
        "--ref",
        str(bench.refs),
        "--n",
        "100000",
        "--batch-size",
        str(bench.args.oom_batch),
        "--shard-size",
        "100000",
        "--steps",
        "2",
        "--strength",  # the OOM is the point, not the pilot
        repr(bench.strength["chosen"]),
        "--out",
        str(tmp / "oom-out"),
        "--cache-dir",
        str(tmp / "oom-cache"),
        "--device",
        str(bench.device),
        "--dtype",
        bench.args.dtype,
        "--progress",
        "quiet",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1800)
    message = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    return {
        "batch_size": bench.args.oom_batch,
        "returncode": done.returncode,
        "message": message,
        "advice_ok": done.returncode == 2 and "lower --batch-size" in message,
    }


def parse_strength(value: str) -> float | str:
    return value if value == "auto" else float(value)


def parse_pilot_samples(value: str) -> int | str:
    return value if value == "auto" else int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default: 512 on CUDA, 256 on CPU)")
    ap.add_argument("--batch-sizes", default=None, help="comma list (default: 1,4,8,16,32 on CUDA, 2 on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 30 on CUDA, 4 on CPU)")
    ap.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (SD's default)")
    ap.add_argument(
        "--modes", default="none,default,posterior", help="job guidance modes to time (default = the job's default)"
    )
    ap.add_argument(
        "--strength",
        type=parse_strength,
        default=AugmentConfig.model_fields["strength"].default,
        help="guidance strength of every guided run, or auto (the job's default): the job's pilot chooses it, "
        f"or its fallback {FALLBACK_STRENGTH:g} where the pilot cannot run (too few references)",
    )
    ap.add_argument(
        "--pilot-samples",
        type=parse_pilot_samples,
        default="auto",
        help="--strength auto: the pilot's samples per candidate",
    )
    ap.add_argument(
        "--flat-check",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default-guidance run makes two batches and compares peak memory (default: on CUDA only)",
    )
    ap.add_argument("--references", type=int, default=None, help="reference images (default: 32 on CUDA, 8 on CPU)")
    ap.add_argument("--repeats", type=int, default=1, help="best of this many (the run order rotates per repeat)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto = float32 on CPU, bfloat16 (else float16) on CUDA")
    ap.add_argument("--dit", action="store_true", help="also time the job's loop on a DiT-XL/2-shaped transformer")
    ap.add_argument("--oom-check", action="store_true", help="CUDA: provoke an OOM through the CLI, check its advice")
    ap.add_argument("--oom-batch", type=int, default=4096)
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny networks (not SD 1.5's sizes), 64x64, batch 2, 2 steps, 24 references (a real pilot), --dit; "
        "seconds (the test suite)",
    )
    args = ap.parse_args(argv)
    cuda = resolve_device(args.device).type == "cuda"
    args.shapes, args.pilot_settings = SD15_SHAPES, {"pilot_samples": args.pilot_samples}
    if args.smoke:
        args.shapes = SMOKE_SHAPES
        args.size, args.batch_sizes, args.steps, args.references, args.repeats = 64, "2", 2, 24, 1
        args.flat_check, args.dit, args.oom_check = True, True, False  # tiny networks cannot run out of memory
        # a short ladder of few samples, half the references held out: the pilot runs, in seconds
        args.pilot_settings = {"pilot_samples": 8, "pilot_max_strength": 0.04, "pilot_holdout": 0.5}
    args.size = args.size or (512 if cuda else 256)
    args.steps = args.steps or (30 if cuda else 4)
    args.references = args.references or (32 if cuda else 8)
    args.batch_size_list = [int(b) for b in (args.batch_sizes or ("1,4,8,16,32" if cuda else "2")).split(",")]
    args.flat_check = cuda if args.flat_check is None else args.flat_check
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cuda = resolve_device(args.device).type == "cuda"
    batch_sizes = args.batch_size_list
    default = AugmentConfig(ref="x", out="", n=1).guidance
    modes = list(
        dict.fromkeys(["none", *(default if m.strip() == "default" else m.strip() for m in args.modes.split(","))])
    )
    settings = {k: v for k, v in vars(args).items() if k not in ("shapes", "batch_size_list")}
    settings |= {"networks": "smoke (tiny)" if args.smoke else "sd15-shaped"}

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        t = time.perf_counter()
        bench = Bench(args, tmp)
        build = time.perf_counter() - t
        strength = bench.strength
        print(
            f"strength {strength['requested']}: {strength['chosen']:g} by {strength['by']}"
            + (f" ({strength['reason']}, {strength['seconds']:.1f} s)" if strength["reason"] else ""),
            flush=True,
        )
        callback = MMDGuidanceCallback.from_references(
            bench.pipe,
            bench.refs,
            height=args.size,
            width=args.size,
            cache_dir=bench.cache,
            strength=strength["chosen"],
        )
        report: dict[str, Any] = {
            "settings": settings | {"batch_sizes": batch_sizes, "modes": modes, "default_guidance": default},
            "strength": strength,
            "device": {
                "type": bench.device.type,
                "name": torch.cuda.get_device_name(bench.device)
                if cuda
                else platform.processor() or platform.machine(),
                "cpu_threads": torch.get_num_threads(),
                "dtype": str(bench.dtype).removeprefix("torch."),
                "torch": torch.__version__,
            },
            "models": {
                "unet_parameters_m": parameters_m(bench.pipe.unet),
                "vae_parameters_m": parameters_m(bench.pipe.vae),
                "text_encoder_parameters_m": parameters_m(bench.pipe.text_encoder),
                "build_seconds": build,
                "reference_encode_seconds": bench.encode_seconds,
            },
            "batches": {},
        }
        print(json.dumps(report["models"]), flush=True)
        for batch in batch_sizes:
            try:
                report["batches"][str(batch)] = run_batch(bench, batch, modes, callback)
            except torch.OutOfMemoryError as exc:
                report["batches"][str(batch)] = {"out_of_memory": str(exc).splitlines()[0]}
                print(f"[batch {batch}] out of memory: stopping the batch sweep", flush=True)
                torch.cuda.empty_cache()
                break
        if args.dit:
            report["dit_xl2"] = dit_runs(args, bench.device, bench.dtype, batch_sizes[0], strength["chosen"])
        if args.oom_check:
            if cuda:
                report["oom_check"] = oom_check(bench, tmp)
            else:
                report["oom_check"] = {"skipped": "CPU: an out-of-memory error would take the whole machine's memory"}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
