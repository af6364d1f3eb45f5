"""Throughput of the guidance modes and where an `augment` run spends its time.

Side by side in one process (absolute timings on a shared 2-core machine are noisy; compare ratios):
  1. sampling throughput (samples/s) for --guidance none | latent | noisy | posterior | lookahead(k=2),
     same seeds, batch 64, 50 DDIM steps, against 128 references;
  2. a whole `run_job` with latent guidance, with the denoiser and VAE wrapped in timers: the share of
     wall time spent in the networks (the rest is reading, filtering, PNG encoding and writing);
  3. MMD² to a held-out half of the references for unguided, latent- and noisy-guided samples.

    python benchmarks/bench_throughput.py [--ref examples/thick_digits] [--batch 64] [--steps 50] [--out bench.json]
    python benchmarks/bench_throughput.py --smoke --out /tmp/bench.json   # batch 4, 2 steps, a job of 8: seconds
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from guidance import MMDGuidance, MMDTarget, RBFKernel, StrengthSchedule, mmd2
from pipeline.checks.pilot import FALLBACK_STRENGTH
from pipeline.config import AugmentConfig
from pipeline.jobs.job import run_job, with_sampler
from pipeline.models.loading import load_model
from pipeline.models.sampling import sample_latents
from storage.references import read_references

REPO = Path(__file__).resolve().parent.parent


class Timed:
    """Wraps a callable and accumulates its wall time."""

    def __init__(self, fn):
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default=str(REPO / "examples" / "thick_digits"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--strength", type=float, default=None, help="default: the pilot's fallback strength (0.01)")
    ap.add_argument("--eta", type=float, default=None, help="DDIM eta; default: the config default")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--job-n", type=int, default=256)
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    ap.add_argument("--smoke", action="store_true", help="batch 4, 2 steps, 1 repeat, a job of 8 (the test suite)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.steps, args.repeats, args.job_n = 4, 2, 1, 8
    torch.manual_seed(0)
    defaults = AugmentConfig(ref="x", out="x", n=1)
    strength = args.strength if args.strength is not None else defaults.strength
    if strength == "auto":  # the pilot chooses per job; the throughput table uses the fixed fallback
        strength = FALLBACK_STRENGTH
    eta = args.eta if args.eta is not None else defaults.eta

    model = with_sampler(load_model(None, device="cpu"), "ddim")
    refs = read_references(args.ref, channels=model.image_channels, size=(model.image_size,) * 2)
    latents = model.encode(refs.images)
    perm = torch.randperm(len(latents), generator=torch.Generator().manual_seed(0))
    guide, held = latents[perm[: len(perm) // 2]], latents[perm[len(perm) // 2 :]]
    kernel = RBFKernel.from_median(latents.flatten(1))
    # 128 references for the throughput comparison (the guidance cost grows with M)
    refs128 = latents[torch.arange(128) % len(latents)]
    results: dict[str, dict] = {}
    seeds = list(range(args.batch))
    modes = {"none": None, "latent": "latent", "noisy": "noisy", "posterior": "posterior", "lookahead2": "lookahead"}
    for rep in range(args.repeats):
        for name, mode in modes.items():
            guidance = None
            if mode is not None:
                target = MMDTarget(refs128, kernel, unbiased=False)
                guidance = MMDGuidance(target, StrengthSchedule(strength), mode=mode, lookahead_steps=2)
            t = time.perf_counter()
            res = sample_latents(
                model.denoiser, model.scheduler, seeds, num_steps=args.steps, guidance=guidance, eta=eta
            )
            dt = time.perf_counter() - t
            r = results.setdefault(name, {"seconds": [], "calls_per_sample": res.denoiser_calls})
            r["seconds"].append(dt)
            print(f"[rep {rep}] {name:10s} {dt:7.2f} s  {args.batch / dt:6.2f} samples/s  calls {res.denoiser_calls}")
    base = min(results["none"]["seconds"])
    for r in results.values():
        r["best_seconds"] = min(r["seconds"])
        r["samples_per_second"] = args.batch / r["best_seconds"]
        r["throughput_vs_none"] = base / r["best_seconds"]

    # alignment: guided against the guidance half, measured on the held-out half
    target = MMDTarget(guide, kernel, unbiased=False)
    seeds2 = list(range(1000, 1000 + args.batch))
    alignment = {}
    for name in ("none", "latent", "noisy"):
        g = None if name == "none" else MMDGuidance(target, StrengthSchedule(strength), mode=name)
        x = sample_latents(model.denoiser, model.scheduler, seeds2, num_steps=args.steps, guidance=g, eta=eta).latents
        alignment[f"mmd2_heldout_{name}"] = float(mmd2(x, held, kernel))

    # whole job: share of wall time in the denoiser and the VAE
    job_model = with_sampler(load_model(None, device="cpu"), "ddim")
    net = Timed(job_model.denoiser.model.forward)
    job_model.denoiser.model.forward = net
    dec = Timed(job_model.vae.decode)
    job_model.vae.decode = dec
    enc = Timed(job_model.vae.encode)
    job_model.vae.encode = enc
    with tempfile.TemporaryDirectory() as tmp:
        cfg = AugmentConfig(
            ref=args.ref,
            n=args.job_n,
            out=str(Path(tmp) / "out"),
            batch_size=args.batch,
            steps=args.steps,
            cache_dir=str(Path(tmp) / "cache"),
            progress="quiet",
            shard_size=args.job_n,
            eta=eta,
            strength=strength,  # the job's own cost, without the pilot
        )
        t = time.perf_counter()
        summary = run_job(cfg, model=job_model)
        wall = time.perf_counter() - t
    network = net.seconds + dec.seconds + enc.seconds
    job = {
        "n_kept": summary.num_kept,
        "n_generated": summary.num_generated,
        "wall_seconds": wall,
        "denoiser_seconds": net.seconds,
        "vae_seconds": dec.seconds + enc.seconds,
        "network_share": network / wall,
    }
    report = {
        "settings": vars(args) | {"strength": strength, "eta": eta},
        "modes": results,
        "alignment": alignment,
        "job": job,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
