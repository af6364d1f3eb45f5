"""MCLR fine-tuning of the shipped prior: maximise the likelihood ratio of the true class over mismatched ones.

    python -m pipeline.training.mclr --out pipeline/assets/mnist-ldm-mclr [--steps 300 --beta 2000 --weight 1.0]

Our reconstruction of MCLR (arXiv 2603.22364 has no public code; this is a reading of its abstract):

- ELBO surrogate: log p(x|c) ≈ −ℓ(x, c) + const with ℓ(x, c) = E_{t,ε} ‖ε_θ(x_t, t, c) − ε‖² (Ho et al.
  2020, eq. 14), so log p(x|c) − log p(x|c̃) ≈ ℓ(x, c̃) − ℓ(x, c), evaluated on the same (t, ε).
- Anchored to the frozen original θ₀: the gain is measured against θ₀'s own ratio,
  Δ = [ℓ₀(c) − ℓ_θ(c)] − [ℓ₀(c̃) − ℓ_θ(c̃)], and enters through a saturating −log σ(β·Δ)
  (Diffusion-DPO's form, Wallace et al. 2024, eq. 14): once θ prefers c over c̃ by a margin, raising
  ℓ_θ(c̃) further earns nothing, so the ratio cannot be inflated by breaking the mismatched branch.
  The mismatched label is also a *true* label of other images, whose plain denoising loss keeps it sound.
- Loss = ℓ_θ(x, c) (label dropout 10% to the null class, as in pre-training) + weight · (−log σ(β·Δ)).
- Negative sampling: c̃ uniform over the other classes (never the null class), one per image per step.

The folder written is a copy of the shipped prior with the UNet and IG head replaced, so it loads with
`--model <folder>` like the original; its model card records the settings.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.shipped import SHIPPED_MODEL_DIR, InternalGuidanceUNet, load_shipped


def mclr_loss(
    model: InternalGuidanceUNet,
    frozen: InternalGuidanceUNet,
    z0: torch.Tensor,
    labels: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    generator: torch.Generator,
    *,
    num_classes: int,
    null_class: int,
    beta: float,
    weight: float,
    label_dropout: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One MCLR training loss on a batch of clean latents z0 with true labels."""
    b = len(z0)
    t = torch.randint(0, len(alphas_cumprod), (b,), generator=generator)
    eps = torch.randn(z0.shape, generator=generator)
    a = alphas_cumprod[t].sqrt().view(b, 1, 1, 1)
    s = (1 - alphas_cumprod[t]).sqrt().view(b, 1, 1, 1)
    x_t = a * z0 + s * eps  # x_t = √ᾱ x0 + √(1−ᾱ) ε
    wrong = (labels + torch.randint(1, num_classes, (b,), generator=generator)) % num_classes  # c̃ ≠ c
    dropped = torch.rand(b, generator=generator) < label_dropout
    main_labels = torch.where(dropped, torch.full_like(labels, null_class), labels)

    def per_sample(out: torch.Tensor) -> torch.Tensor:  # ‖ε̂ − ε‖² per sample; the doubled batch repeats ε
        return ((out - eps.repeat(len(out) // b, 1, 1, 1)) ** 2).flatten(1).mean(1)

    main_out, head_out = model(x_t, t, main_labels)
    denoise = per_sample(main_out).mean() + 0.5 * per_sample(head_out).mean()  # as pre-training (IG head λ=0.5)
    both = torch.cat([labels, wrong])
    out_theta, _ = model(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
    with torch.no_grad():
        out_ref, _ = frozen(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
    l_theta_c, l_theta_w = per_sample(out_theta).chunk(2)
    l_ref_c, l_ref_w = per_sample(out_ref).chunk(2)
    delta = (l_ref_c - l_theta_c) - (l_ref_w - l_theta_w)  # gain in log-ratio over the frozen model
    ratio_loss = -F.logsigmoid(beta * delta).mean()
    loss = denoise + weight * ratio_loss
    stats = {
        "denoise": float(denoise),
        "ratio_loss": float(ratio_loss),
        "delta": float(delta.mean()),
        "theta_gap": float((l_theta_w - l_theta_c).mean()),
    }
    return loss, stats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(SHIPPED_MODEL_DIR))
    ap.add_argument("--out", default=str(SHIPPED_MODEL_DIR.parent / "mnist-ldm-mclr"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--beta", type=float, default=2000.0)
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a few steps on 64 images (tests)")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    base = Path(args.base)
    prior = load_shipped(base)
    info = prior.info
    num_classes, null_class = int(info["num_classes"]), int(info["null_class_id"])
    split = json.loads((base / "split.json").read_text())
    from ..models.prior_data import load_mnist

    data = load_mnist()
    held = set(int(i) for i in split["heldout_indices"])
    train_idx = np.array([i for i in range(len(data.labels)) if i not in held])
    if args.smoke:
        train_idx = train_idx[:64]
    images, labels = data.images[train_idx], data.labels[train_idx]
    with torch.no_grad():
        z0 = torch.cat([prior.encode(chunk) for chunk in images.split(256)])
    model = prior.unet
    model.train().requires_grad_(True)
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    alphas = prior.scheduler.alphas_cumprod.float()
    gen = torch.Generator().manual_seed(args.seed)
    steps = 3 if args.smoke else args.steps
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="mclr")
    for _ in bar:
        idx = torch.randint(0, len(z0), (args.batch_size,), generator=gen)
        loss, stats = mclr_loss(
            model,
            frozen,
            z0[idx],
            labels[idx],
            alphas,
            gen,
            num_classes=num_classes,
            null_class=null_class,
            beta=args.beta,
            weight=args.weight,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix({k: f"{v:.4f}" for k, v in stats.items()})
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("unet", "ig_head", "README.md"))
    model.eval()
    model.save_pretrained(tmp)
    shipped = json.loads((tmp / "shipped.json").read_text())
    shipped["model_id"] = shipped["model_id"] + "-mclr"
    shipped["mclr"] = {k: v for k, v in vars(args).items() if k not in ("base", "out")} | {"seconds": seconds}
    (tmp / "shipped.json").write_text(json.dumps(shipped, indent=2) + "\n")
    (tmp / "README.md").write_text(
        f"# {shipped['model_id']}\n\nThe shipped prior fine-tuned with MCLR (`python -m pipeline.training.mclr`): "
        f"{steps} steps, batch {args.batch_size}, lr {args.lr}, beta {args.beta}, weight {args.weight}, seed "
        f"{args.seed}, {seconds:.0f} s on CPU. Objective and evaluation: pipeline/training/mclr.py, docs/results.md.\n"
    )
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"wrote {out} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
