"""Why the shipped prior's unconditional (null-class) samples miss their floor, and what helps: a probe.

The model card's floor: >= 70% of null-class samples recognised by the classifier with probability > 0.9.
This script measures that fraction (and, for comparison, class-conditional samples without CFG) for
  - the shipped weights, with the card's sampler (50 DDIM steps, eta 1) and with more sampling steps;
  - real held-out images and their VAE reconstructions (what a perfect sampler would score);
  - optionally, the UNet trained further from the training run's checkpoint (`<work>/ckpt_unet.pt`, written
    by `python -m pipeline.train_prior`) with another label-dropout rate, to see what more training buys.

    python benchmarks/prior_null_class_probe.py [--samples 300] [--more-steps 600 --dropout 0.3 --lr 3e-4]
    python benchmarks/prior_null_class_probe.py --smoke   # tiny counts; --more-steps from the shipped UNet; seconds

Nothing it writes is shipped; results print as JSON lines (and go to `--json`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.models.prior_eval import class_summary, classify, sample_prior
from pipeline.models.shipped import SHIPPED_MODEL_DIR, load_shipped
from pipeline.training.config import TrainConfig
from pipeline.training.data import load_data
from pipeline.training.loop import EMA, Checkpointer, detached_state
from pipeline.training.stages import unet_losses


def confident(prior, labels: torch.Tensor | None, num_samples: int, steps: int = 50, eta: float = 1.0) -> dict:
    """Confident fraction (and class accuracy if `labels`) of samples; labels None = null class."""
    null_id = int(prior.info["null_class_id"])
    k = int(prior.info["num_classes"])
    lab = torch.full((num_samples,), null_id) if labels is None else labels[:num_samples]
    with torch.no_grad():
        run = sample_prior(prior, lab, seed=12345, num_steps=steps, eta=eta, batch_size=150)
        summary = class_summary(classify(prior.classifier, run.images)["probs"], labels, k)
    return {key: round(summary[key], 4) for key in ("confident_fraction", "class_accuracy") if key in summary}


def train_more(prior, work: Path, steps: int, dropout: float, lr: float, batch: int | None = None) -> None:
    """Continue the UNet from `work/ckpt_unet.pt` (raw weights + EMA) for `steps` steps (batch `batch`, default
    the recipe's); load the EMA."""
    cfg = TrainConfig() if batch is None else dataclasses.replace(TrainConfig(), unet_batch=batch)
    state = Checkpointer(work, "unet", every_s=float("inf"), interrupt=None).load()
    if state is None:
        raise SystemExit(f"{work / 'ckpt_unet.pt'} not found: run `python -m pipeline.train_prior` first")
    model = prior.unet
    model.load_state_dict(state["model"])
    model.train().requires_grad_(True)
    ema = EMA(model, cfg.ema_decay)
    ema.shadow = state["ema"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    stored = load_file(str(work / "latents.safetensors"))
    alphas = prior.scheduler.alphas_cumprod.to(torch.float32)
    null_id = int(prior.info["null_class_id"])
    first = int(state["step"])
    t0 = time.monotonic()
    for step in range(first, first + steps):
        main, head = unet_losses(model, cfg, stored["latents"], stored["labels"], alphas, null_id, step, dropout)
        loss = main + cfg.ig_loss_weight * head  # the training loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, step)
        if (step - first) % 100 == 0:
            print(f"step {step}: loss {loss.item():.4f} ({time.monotonic() - t0:.0f} s)", flush=True)
    model.load_state_dict(ema.shadow)
    model.eval().requires_grad_(False)


def smoke_work(prior, images: torch.Tensor, labels: torch.Tensor, work: Path) -> Path:
    """`--smoke`: a training work dir for `--more-steps` to continue the shipped UNet from: its weights as the
    UNet checkpoint (raw weights and EMA, written by the training's `Checkpointer`) and one view of the training
    latents of `images`, in the training stage's format."""
    work.mkdir(parents=True, exist_ok=True)
    weights = detached_state(prior.unet)
    state = {"model": weights, "ema": weights, "opt": {}, "elapsed": 0.0}
    Checkpointer(work, "unet", every_s=0.0, interrupt=None).maybe_save(1, 2, lambda: state)
    with torch.no_grad():
        latents = torch.cat([prior.encode(b) for b in images.split(250)])
    save_file({"latents": latents[None].contiguous(), "labels": labels.contiguous()}, str(work / "latents.safetensors"))
    return work


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHIPPED_MODEL_DIR))
    ap.add_argument("--work", default="train_work", help="the training run's work folder (for --more-steps)")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps of the card's sampler")
    ap.add_argument("--long-steps", type=int, default=250, help="DDIM steps of the 'more sampling steps' row")
    ap.add_argument("--real", type=int, default=0, help="held-out real images to score (0: all)")
    ap.add_argument("--more-steps", type=int, default=0, help="continue training this many UNet steps")
    ap.add_argument("--dropout", type=float, default=0.3, help="label dropout while training further")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--unet-batch", type=int, default=None, help="batch while training further (default: recipe's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="8 samples, 2 / 4 steps, 32 real images; 2 more UNet steps (batch 16) from the shipped weights, "
        "through a work dir made in a temp folder (the test suite)",
    )
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.work, args.samples, args.steps, args.long_steps, args.real = str(Path(tmp) / "work"), 8, 2, 4, 32
            args.more_steps, args.unet_batch = 2, 16
        else:
            torch.set_num_threads(2)  # the published numbers' setting (not in the test suite's process)
        rows = probe(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def probe(args: argparse.Namespace) -> list[dict]:
    prior = load_shipped(args.model)
    k = int(prior.info["num_classes"])
    cond = torch.arange(args.samples) % k
    rows = []

    def report(name: str, value: dict) -> None:
        rows.append({"setting": name, **value})
        print(json.dumps(rows[-1]), flush=True)

    split = load_data(TrainConfig())
    real = split.data.images[split.heldout]
    if args.real:
        real = real[: args.real]
    if args.smoke:
        train = split.train[: 4 * args.unet_batch]
        smoke_work(prior, split.data.images[train], split.data.labels[train], Path(args.work))
    with torch.no_grad():
        recon = torch.cat([prior.decode(prior.encode(b)) for b in real.split(250)])
    for name, images in (("real held-out", real), ("VAE reconstructions of held-out", recon)):
        summary = class_summary(classify(prior.classifier, images)["probs"], None, k)
        report(name, {"confident_fraction": round(summary["confident_fraction"], 4)})
    for steps in (args.steps, args.long_steps):
        report(f"shipped, null class, {steps} DDIM steps eta 1", confident(prior, None, args.samples, steps=steps))
    report("shipped, conditional no CFG", confident(prior, cond, args.samples, steps=args.steps))
    if args.more_steps:
        train_more(prior, Path(args.work), args.more_steps, args.dropout, args.lr, args.unet_batch)
        tag = f"+{args.more_steps} steps at label dropout {args.dropout:g}"
        report(f"{tag}, null class", confident(prior, None, args.samples, steps=args.steps))
        report(f"{tag}, conditional no CFG", confident(prior, cond, args.samples, steps=args.steps))
    return rows


if __name__ == "__main__":
    main()
