"""Side-by-side short UNet runs of the shipped prior's recipe: one setting changed per arm.

Every arm starts from the same finished VAE, classifier and training latents (copied from a finished
`python -m pipeline.training` work dir, so only the UNet stage runs), trains `--steps` UNet steps with the
recipe's own warm-up and cosine decay over that length, and is probed by the learning-curve probe at the
end (class accuracy without CFG, null-class samples recognised with p > 0.9, largest class share;
the preset's `curve_samples`, 25 DDIM steps, judged by the run's classifier). Same seeds in every arm.

    python benchmarks/prior_ablation.py --work train_work --steps 1500 \\
        --arm "logsnr, dropout 0.3:" --arm "uniform t:--timestep-sampling uniform" \\
        --arm "dropout 0.2:--label-dropout 0.2"
    python benchmarks/prior_ablation.py --smoke          # the test suite: a few steps on the smoke preset

An arm is "NAME:EXTRA FLAGS" (flags of `python -m pipeline.training`). Results print as a Markdown table
and go to `--json`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.training.cli import main as train_main

PREREQUISITES = ("config.json", "vae.done.json", "classifier.done.json", "latents.done.json", "latents.safetensors")


def prepare_arm(source: Path, dest: Path) -> None:
    """A work dir holding `source`'s finished VAE, classifier and latents, and no UNet state."""
    missing = [p for p in PREREQUISITES if not (source / p).exists()] + (
        [] if (source / "final" / "vae").is_dir() else ["final/vae"]
    )
    if missing:
        raise SystemExit(f"{source}: not a finished training work dir (missing {', '.join(missing)})")
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "final").mkdir(parents=True)
    for name in PREREQUISITES:
        shutil.copy2(source / name, dest / name)
    for sub in ("vae", "classifier"):
        if (source / "final" / sub).is_dir():
            shutil.copytree(source / "final" / sub, dest / "final" / sub)


def run_arm(source: Path, root: Path, name: str, flags: list[str], steps: int, preset: str) -> dict:
    work = root / "".join(c if c.isalnum() else "-" for c in name)
    prepare_arm(source, work)
    argv = ["--preset", preset, "--device", "cpu", "--work", str(work), "--out", str(work / "model"), "--resume"]
    argv += ["--unet-steps", str(steps), "--curve-every", str(steps), "--until", "unet", *flags]
    t0 = time.perf_counter()
    code = train_main(argv)
    if code != 0:
        raise SystemExit(f"arm {name!r} failed with exit code {code}")
    info = json.loads((work / "unet.done.json").read_text())
    point = info["learning_curve"][-1]
    return {"arm": name, "flags": flags, "seconds": time.perf_counter() - t0, **point}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("train_work"), help="a finished training work dir")
    ap.add_argument("--out", type=Path, default=Path("runs/prior-ablation"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--arm", action="append", default=None, help='"NAME:EXTRA FLAGS"')
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="train a smoke prior in a temp dir, 2 arms x 4 steps")
    args = ap.parse_args(argv)
    arms = [a.partition(":") for a in (args.arm or ["recipe:", "uniform t:--timestep-sampling uniform"])]
    if args.smoke:
        tmp = Path(tempfile.mkdtemp(prefix="prior-ablation-"))
        if train_main(["--smoke", "--device", "cpu", "--work", str(tmp / "base"), "--out", str(tmp / "m")]) != 0:
            raise SystemExit("smoke base training failed")
        args.work, args.out, args.steps, args.preset = tmp / "base", tmp / "arms", 4, "smoke"
    results = []
    for name, _, flags in arms:
        extra = shlex.split(flags)
        results.append(run_arm(args.work, args.out, name, extra, args.steps, args.preset))
    lines = ["| arm | flags | UNet steps | minutes | class accuracy, no CFG | null recognised | largest class share |"]
    lines.append("|---|---|---|---|---|---|---|")
    for r in results:
        lines.append(
            f"| {r['arm']} | `{' '.join(r['flags']) or '(recipe)'}` | {r['step']} | {r['seconds'] / 60:.1f} |"
            f" {r['class_accuracy']:.3f} | {r['null_confident_fraction']:.3f} | {r['null_largest_class_share']:.3f} |"
        )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
