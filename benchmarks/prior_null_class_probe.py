"""Why the shipped prior's unconditional (null-class) samples miss their floor, and what helps: a probe.

The model card's floor: >= 70% of null-class samples recognised by the classifier with probability > 0.9.
This script measures that fraction (and, for comparison, class-conditional samples without CFG) for
  - the shipped weights, with the card's sampler (50 DDIM steps, eta 1) and with more sampling steps;
  - real held-out images and their VAE reconstructions (what a perfect sampler would score);
  - optionally, the UNet trained further from the training run's checkpoint (`<work>/ckpt_unet.pt`, written
    by `python -m pipeline.train_prior`) with another label-dropout rate, to see what more training buys.

    python benchmarks/prior_null_class_probe.py [--samples 300] [--more-steps 600 --dropout 0.3 --lr 3e-4]

Nothing it writes is shipped; results print as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.models.prior_eval import class_summary, classify, generate
from pipeline.models.shipped import SHIPPED_MODEL_DIR, load_shipped
from pipeline.training.config import TrainConfig
from pipeline.training.data import load_data
from pipeline.training.loop import EMA, Checkpointer
from pipeline.training.stages import unet_losses


def confident(prior, labels: torch.Tensor | None, num_samples: int, steps: int = 50, eta: float = 1.0) -> dict:
    """Confident fraction (and class accuracy if `labels`) of samples; labels None = null class."""
    null_id = int(prior.info["null_class_id"])
    k = int(prior.info["num_classes"])
    lab = torch.full((num_samples,), null_id) if labels is None else labels[:num_samples]
    with torch.no_grad():
        run = generate(prior, lab, seed=12345, num_steps=steps, eta=eta, batch_size=150)
        summary = class_summary(classify(prior.classifier, run.images)["probs"], labels, k)
    return {key: round(summary[key], 4) for key in ("confident_fraction", "class_accuracy") if key in summary}


def train_more(prior, work: Path, steps: int, dropout: float, lr: float) -> None:
    """Continue the UNet from `work/ckpt_unet.pt` (raw weights + EMA) for `steps` steps; load the EMA."""
    cfg = TrainConfig()
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHIPPED_MODEL_DIR))
    ap.add_argument("--work", default="train_work", help="the training run's work folder (for --more-steps)")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--more-steps", type=int, default=0, help="continue training this many UNet steps")
    ap.add_argument("--dropout", type=float, default=0.3, help="label dropout while training further")
    ap.add_argument("--lr", type=float, default=3e-4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    prior = load_shipped(args.model)
    k = int(prior.info["num_classes"])
    cond = torch.arange(args.samples) % k

    def report(name: str, value: dict) -> None:
        print(json.dumps({"setting": name, **value}), flush=True)

    split = load_data(TrainConfig())
    real = split.data.images[split.heldout]
    with torch.no_grad():
        recon = torch.cat([prior.decode(prior.encode(b)) for b in real.split(250)])
    for name, images in (("real held-out", real), ("VAE reconstructions of held-out", recon)):
        summary = class_summary(classify(prior.classifier, images)["probs"], None, k)
        report(name, {"confident_fraction": round(summary["confident_fraction"], 4)})
    report("shipped, null class, 50 DDIM steps eta 1", confident(prior, None, args.samples))
    report("shipped, null class, 250 DDIM steps eta 1", confident(prior, None, args.samples, steps=250))
    report("shipped, conditional no CFG", confident(prior, cond, args.samples))
    if args.more_steps:
        train_more(prior, Path(args.work), args.more_steps, args.dropout, args.lr)
        tag = f"+{args.more_steps} steps at label dropout {args.dropout:g}"
        report(f"{tag}, null class", confident(prior, None, args.samples))
        report(f"{tag}, conditional no CFG", confident(prior, cond, args.samples))


if __name__ == "__main__":
    main()
