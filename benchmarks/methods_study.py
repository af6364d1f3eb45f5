"""Every guidance method on the shipped prior, with numbers: the study behind docs/results.md.

    python benchmarks/methods_study.py --study all --out runs/study [--n 256 --seeds 3 --steps 50]
    python benchmarks/methods_study.py --smoke --out /tmp/study   # strength, kernels and rff studies, tiny; seconds

Each target domain's references are split (stratified, seeded) into a guidance half and a held-out half;
metrics compare generated samples with the HELD-OUT half, in the shipped classifier's penultimate feature
space (MMD² with RBF median bandwidth, KID, Fréchet distance, precision/recall/coverage) plus class
accuracy against each sample's intended class. Every row: mean ± std over seeds, network calls and
seconds per sample. Results go to <out>/<study>.json and are rendered as Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from guidance import MMDTarget, RandomFourierFeatures, RBFKernel, denoiser_cost, make_guidance_method, mmd2
from guidance.kernels import median_pairwise_distance
from pipeline.checks.reference import ReferenceBundle, build_target, split_holdout
from pipeline.config import AugmentConfig
from pipeline.jobs.job import with_sampler
from pipeline.jobs.worker import JobContext, filter_shard
from pipeline.measures import metrics as M
from pipeline.models.loading import LoadedModel, load_model
from pipeline.plan import class_proportions, shard_plan
from storage.references import read_references

REPO = Path(__file__).resolve().parent.parent
DOMAINS = {"thick": REPO / "examples" / "thick_digits", "slanted": REPO / "examples" / "slanted_digits"}


@dataclass
class Domain:
    name: str
    guide_latents: torch.Tensor
    guide_labels: torch.Tensor  # reference class index
    held_images: torch.Tensor
    held_features: torch.Tensor
    held_digits: torch.Tensor  # digit of each held-out image
    class_digits: list[int]  # reference class index -> digit (model label)
    bandwidth: float
    bundle: ReferenceBundle  # the guidance half, as the job's reference bundle


@dataclass
class Setting:
    """One row: how to sample (model condition, guidance) and what it costs."""

    name: str
    strength: float = 0.0
    mode: str = "latent"
    kernel: str = "rbf"
    class_aware: bool = True
    tell_model: bool = True  # pass the intended digit to the class-conditional model
    cfg_scale: float = 1.0
    ig_scale: float = 1.0
    ig_interval: tuple[float, float] | None = None
    lookahead_steps: int | None = 2
    steps: int | None = None
    sampler: str = "ddim"
    keep: float = 1.0
    normalization: str = "per_sample"
    coupling: str = "batch"
    unet: str | None = None  # alternative checkpoint (MCLR)
    n: int | None = None  # override --n (expensive rows)
    seeds: int | None = None  # override --seeds (expensive rows)


class Study:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.model = with_sampler(load_model(None, device="cpu"), "ddim")
        self.classifier = self.model.extras["classifier"]
        self.domains = {name: self._domain(name, path) for name, path in DOMAINS.items() if path.is_dir()}
        self._models: dict[str, LoadedModel] = {}

    # ------------------------------------------------------------------ data
    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.classifier.features(c) for c in images.split(256)]).double()

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.classifier(c).argmax(1) for c in images.split(256)])

    def _domain(self, name: str, path: Path) -> Domain:
        refs = read_references(str(path), channels=1, size=(32, 32))
        latents = self.model.encode(refs.images)
        bundle = ReferenceBundle(
            latents=latents,
            labels=refs.labels,
            class_names=refs.class_names,
            bandwidth=float(median_pairwise_distance(latents.flatten(1))),
            content_hash=refs.content_hash,
            model_id=self.model.model_id,
            files=refs.files,
        )
        guide = split_holdout(bundle, 0.5, seed=0)
        held_mask = torch.tensor([f in set(guide.heldout_files) for f in refs.files])
        held_images = refs.images[held_mask]
        return Domain(
            name=name,
            guide_latents=guide.latents,
            guide_labels=guide.labels,
            held_images=held_images,
            held_features=self.features(held_images),
            held_digits=torch.tensor([int(refs.class_names[int(c)]) for c in refs.labels[held_mask]]),
            class_digits=[int(c) for c in refs.class_names],
            bandwidth=bundle.bandwidth,
            bundle=guide,
        )

    # ------------------------------------------------------------------ sampling
    def model_for(self, s: Setting) -> LoadedModel:
        if s.unet is None:
            return self.model
        if s.unet not in self._models:
            self._models[s.unet] = with_sampler(load_model(s.unet, device="cpu"), "ddim")
        return self._models[s.unet]

    def config(self, s: Setting, seed: int) -> AugmentConfig:
        """The job's config of a row (what `augment` would run), at the study's size and seed."""
        n = s.n or self.args.n
        return AugmentConfig(
            ref=str(REPO),  # unused: the study hands the job its reference bundle directly
            out="",
            n=n,
            seed=seed,
            shard_size=n,
            batch_size=self.args.batch,
            steps=s.steps or self.args.steps,
            sampler=s.sampler,
            eta=self.args.eta,
            guidance=s.mode if s.strength > 0 else "none",
            strength=s.strength,
            kernel=s.kernel,
            class_aware=s.class_aware,
            cfg_scale=s.cfg_scale,
            ig_scale=s.ig_scale,
            ig_interval=s.ig_interval,
            lookahead_steps=s.lookahead_steps,
            normalization=s.normalization,
            coupling=s.coupling,
            memory=100 if s.coupling == "sequential" else 0,
            keep=s.keep,
            reserve=0.0 if s.keep >= 1.0 else 1.0,
            reach_check=False,
            progress="quiet",
        )

    def generate(self, s: Setting, d: Domain, seed: int) -> dict:
        """The job's shard steps (`pipeline.jobs.worker.filter_shard`: generate the planned pool with the job's
        seeds and class plan, judge support, score, keep) on this row's config; returns latents, labels, cost."""
        cfg = self.config(s, seed)
        model = with_sampler(self.model_for(s), s.sampler)
        bundle = d.bundle
        props = class_proportions(bundle.labels, len(d.class_digits), "reference")
        labels_map = dict(enumerate(d.class_digits)) if s.tell_model else None
        ctx = JobContext(cfg, model, bundle, build_target(cfg, bundle, model.device), props, labels_map)
        shard = shard_plan(cfg.n, cfg.shard_size, cfg.keep, 0)
        t0 = time.perf_counter()
        pool = filter_shard(ctx, shard)
        seconds = time.perf_counter() - t0
        keep = pool.kept.nonzero().flatten()
        method = (
            None if cfg.guidance == "none" else make_guidance_method(cfg.guidance, lookahead_steps=s.lookahead_steps)
        )
        calls = cfg.steps * denoiser_cost(method, cfg.steps) * (2 if s.cfg_scale != 1 else 1) * len(pool.latents)
        return {
            "latents": pool.latents[keep],
            "labels": pool.labels[keep],
            "calls": calls / cfg.n,
            "seconds": seconds / cfg.n,
        }

    # ------------------------------------------------------------------ metrics
    def evaluate(self, s: Setting, d: Domain, seed: int) -> dict:
        g = self.generate(s, d, seed)
        images = self.model.decode(g["latents"])
        feats = self.features(images)
        pred = self.predict(images)
        intended = torch.tensor([d.class_digits[int(c)] for c in g["labels"]])
        held = d.held_features
        bw = float(median_pairwise_distance(held.float()))
        row = {
            "mmd2": float(mmd2(feats.float(), held.float(), RBFKernel(bw), unbiased=True)),
            "kid": M.kid(feats, held, n_subsets=50, seed=seed)["kid"],
            "fd": M.frechet_distance(feats, held)["fd"],
            "class_acc": float((pred == intended).float().mean()),
            "latent_mmd2": float(mmd2(g["latents"], d.guide_latents, RBFKernel(d.bandwidth), unbiased=True)),
            "calls": g["calls"],
            "sec": g["seconds"],
        }
        row["class_mmd2"] = class_mmd2(feats.float(), intended, held.float(), d.held_digits, RBFKernel(bw))
        pr = M.prdc(feats, held, k=5)
        row.update({k: pr[k] for k in ("precision", "recall", "coverage")})
        return row

    def run(self, settings: list[Setting], domains: list[str] | None = None) -> list[dict]:
        rows = []
        for dname in domains or list(self.domains):
            d = self.domains[dname]
            for s in settings:
                if self.args.only and not any(part in s.name for part in self.args.only):
                    continue
                per_seed = [self.evaluate(s, d, seed) for seed in range(s.seeds or self.args.seeds)]
                agg = {"domain": dname, "setting": s.name}
                for key in per_seed[0]:
                    vals = np.array([r[key] for r in per_seed], dtype=float)
                    agg[key] = float(vals.mean())
                    agg[key + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
                rows.append(agg)
                print(_fmt_row(agg), flush=True)
        return rows


def class_mmd2(x: torch.Tensor, x_digits: torch.Tensor, y: torch.Tensor, y_digits: torch.Tensor, kernel) -> float:
    """Mean over classes of the unbiased MMD² between samples meant as class c and held-out images of c
    (the class-conditional alignment the product kernel targets; classes with < 2 of either skipped)."""
    per_class = [
        float(mmd2(x[x_digits == c], y[y_digits == c], kernel, unbiased=True))
        for c in y_digits.unique()
        if (x_digits == c).sum() >= 2 and (y_digits == c).sum() >= 2
    ]
    return float(np.mean(per_class)) if per_class else float("nan")


def _fmt_row(r: dict) -> str:
    return (
        f"{r['domain']:8s} {r['setting']:34s} mmd2 {r['mmd2']:.4f}±{r['mmd2_std']:.4f} kid {r['kid']:.4f} "
        f"fd {r['fd']:7.2f} P {r['precision']:.2f} R {r['recall']:.2f} C {r['coverage']:.2f} "
        f"acc {r['class_acc']:.3f} calls {r['calls']:.0f} {r['sec'] * 1000:.0f} ms/sample"
    )


# ---------------------------------------------------------------------- the studies
def strength_sweep(study: Study) -> list[dict]:
    mode = study.args.mode
    settings = [Setting("none (conditional prior)", strength=0.0)]
    settings += [Setting(f"{mode} s={s}", strength=s, mode=mode) for s in study.args.strengths]
    return study.run(settings)


def kernels(study: Study) -> list[dict]:
    s = study.args.default_strength
    return study.run(
        [Setting(f"{k} s={s}", strength=s, kernel=k) for k in ("rbf", "rbf-multi", "cubic", "rff")], domains=["thick"]
    )


def rff_accuracy_speed(study: Study) -> list[dict]:
    """RFF vs exact RBF: MMD² agreement and gradient time at large reference counts (synthetic latents)."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    d = 256
    x = torch.randn(64, d, generator=gen)
    for m in study.args.rff_references:
        y = torch.randn(m, d, generator=gen) * 1.1 + 0.1
        bw = float(median_pairwise_distance(y))
        exact, approx = RBFKernel(bw), RandomFourierFeatures(bw, d, num_features=2048, seed=0)
        row = {"references": m}
        for name, k in (("rbf", exact), ("rff", approx)):
            target = MMDTarget(y, k, unbiased=False)
            t = time.perf_counter()
            for _ in range(5):
                _, value = target.grad(x)
            row[f"{name}_grad_ms"] = (time.perf_counter() - t) / 5 * 1000
            row[f"{name}_mmd2"] = float(value)
        row["abs_error"] = abs(row["rff_mmd2"] - row["rbf_mmd2"])
        rows.append(row)
        print(row, flush=True)
    return rows


def modes(study: Study) -> list[dict]:
    s = study.args.default_strength
    steps = study.args.steps
    return study.run(
        [
            Setting(f"latent, {steps} steps", strength=s),
            Setting(f"posterior, {steps} steps", strength=s, mode="posterior"),
            Setting(f"lookahead k=2, {steps} steps", strength=s, mode="lookahead", lookahead_steps=2),
            Setting(f"lookahead k=4, {steps} steps", strength=s, mode="lookahead", lookahead_steps=4),
            Setting(f"latent, {steps // 2} steps", strength=s, steps=steps // 2),
            Setting(
                f"posterior, {steps // 3} steps (≈ latent-50 budget)", strength=s, mode="posterior", steps=steps // 3
            ),
            Setting("end-to-end, 8 steps", strength=s, mode="lookahead", lookahead_steps=None, steps=8),
            Setting("latent, 8 steps", strength=s, steps=8),
        ],
        domains=["thick"],
    )


def coupling(study: Study) -> list[dict]:
    s = study.args.default_strength
    return study.run(
        [
            Setting(f"joint batch, latent, RBF, s={s}", strength=s),
            Setting(  # the public scheme's every choice but the coupling: isolates joint vs sequential
                "joint batch, noisy, cubic, s=0.01",
                strength=0.01,
                mode="noisy",
                kernel="cubic",
                class_aware=False,
            ),
            Setting(
                "public scheme: sequential+memory(100), noisy, cubic, s=0.01",
                strength=0.01,
                mode="noisy",
                kernel="cubic",
                class_aware=False,
                coupling="sequential",
            ),
            *[
                Setting(
                    f"public scheme, 1000-step DDPM, s={label} (48 samples, 1 seed)",
                    strength=strength,
                    mode="noisy",
                    kernel="cubic",
                    class_aware=False,
                    coupling="sequential",
                    sampler="ddpm",
                    steps=1000,
                    n=48,  # 48,000 batch-1 network calls per seed: one seed, fewer samples
                    seeds=1,
                )
                for strength, label in ((0.01, "0.01"), (0.0005, "0.0005 = 0.01 x 50/1000"))
            ],
        ],
        domains=["thick"],
    )


def noisy_vs_latent(study: Study) -> list[dict]:
    """The gradient on the noisy x_t (the public code's) vs on x̂0, with RBF and cubic kernels, both domains."""
    s = study.args.default_strength
    return study.run(
        [
            Setting(f"{mode}, {kernel} s={s}", strength=s, mode=mode, kernel=kernel)
            for mode in ("latent", "noisy")
            for kernel in ("rbf", "cubic")
        ]
    )


def product_kernel(study: Study) -> list[dict]:
    s = study.args.default_strength
    return study.run(
        [
            Setting("unconditional prior, no guidance", tell_model=False, class_aware=False),
            *[
                Setting(f"unconditional + {name} kernel s={v}", strength=v, tell_model=False, class_aware=aware)
                for v in (s, 5 * s)  # the kernel alone must carry the class: also a stronger push
                for name, aware in (("plain", False), ("product", True))
            ],
            Setting(f"conditional + plain kernel s={s}", strength=s, class_aware=False),
            Setting(f"conditional + product kernel s={s}", strength=s, class_aware=True),
        ]
    )


def cfg(study: Study) -> list[dict]:
    return study.run([Setting(f"CFG w={w}", cfg_scale=w) for w in (1.0, 1.5, 2.0, 3.0)], domains=["thick"])


def internal_guidance(study: Study) -> list[dict]:
    settings = [Setting(f"IG w={w}", ig_scale=w, tell_model=False, class_aware=False) for w in (1.0, 1.25, 1.5, 2.0)]
    settings += [
        Setting(
            "IG w=2 high/mid noise only [0, 0.6)",
            ig_scale=2.0,
            ig_interval=(0.0, 0.6),
            tell_model=False,
            class_aware=False,
        ),
        Setting("IG w=1.5 + CFG 2 (conditional)", ig_scale=1.5, cfg_scale=2.0),
        Setting("CFG 2 alone (conditional)", cfg_scale=2.0),
    ]
    return study.run(settings, domains=["thick"])


def filter_study(study: Study) -> list[dict]:
    s = study.args.default_strength
    settings = []
    for strength in (0.0, s):
        for keep in (1.0, 0.9, 0.75, 0.5):
            settings.append(Setting(f"s={strength} keep={keep}", strength=strength, keep=keep, mode=study.args.mode))
    return study.run(settings, domains=["thick"])


def mclr(study: Study) -> list[dict]:
    path = REPO / "pipeline" / "assets" / "mnist-ldm-mclr"
    if not (path / "shipped.json").is_file():
        print(f"no MCLR checkpoint at {path}; run `python -m pipeline.training.mclr` first")
        return []
    return study.run(
        [
            Setting("original, no CFG", cfg_scale=1.0),
            Setting("original, CFG 2", cfg_scale=2.0),
            Setting("MCLR-tuned, no CFG", cfg_scale=1.0, unet=str(path)),
        ],
        domains=["thick"],
    )


STUDIES: dict[str, Callable[[Study], list[dict]]] = {
    "strength": strength_sweep,
    "kernels": kernels,
    "rff": rff_accuracy_speed,
    "modes": modes,
    "coupling": coupling,
    "noisy": noisy_vs_latent,
    "product": product_kernel,
    "cfg": cfg,
    "ig": internal_guidance,
    "filter": filter_study,
    "mclr": mclr,
}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="all", help=f"comma-separated from {list(STUDIES)} or 'all'")
    ap.add_argument("--out", default=str(REPO / "runs" / "study"))
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05, 0.1])
    ap.add_argument("--default-strength", type=float, default=0.01)
    ap.add_argument("--eta", type=float, default=1.0, help="DDIM eta (1 = the pipeline default, ancestral)")
    ap.add_argument("--mode", default="latent", help="guidance mode of the strength and filter studies")
    ap.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="run only the settings whose name contains one of these; their rows replace or join those in "
        "an existing <out>/<study>.json (the other rows are kept)",
    )
    ap.add_argument("--rff-references", type=int, nargs="+", default=[1000, 4000, 16000], help="of the rff study")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="the strength, kernels and rff studies (or --study's): 8 samples, 2 seeds, 2 steps, one strength, "
        "small rff sizes (the test suite)",
    )
    args = ap.parse_args(argv)
    if args.smoke:
        args.study = "strength,kernels,rff" if args.study == "all" else args.study  # a --study given is kept
        args.n, args.batch, args.seeds, args.steps = 8, 8, 2, 2
        args.strengths, args.rff_references = [args.default_strength], [100, 400]
    else:
        torch.set_num_threads(2)  # the published timings' setting (not in the test suite's process)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    study = Study(args)
    names = list(STUDIES) if args.study == "all" else args.study.split(",")
    records = {}
    for name in names:
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        rows = STUDIES[name](study)
        record = {"study": name, "settings": vars(args), "rows": rows, "seconds": time.perf_counter() - t}
        path = out / f"{name}.json"
        if args.only and path.is_file():
            record = merge_rows(json.loads(path.read_text()), record)
        path.write_text(json.dumps(record, indent=2))
        records[name] = record
    return records


def merge_rows(previous: dict, update: dict) -> dict:
    """`previous` with `update`'s rows replacing those of the same (domain, setting) in place, new ones
    appended; seconds add up, and the settings are the previous run's (plus the flags of this one)."""
    new = {(r["domain"], r["setting"]): r for r in update["rows"]}
    rows = [new.pop((r["domain"], r["setting"]), r) for r in previous["rows"]] + list(new.values())
    settings = {**previous["settings"], "rerun": {k: v for k, v in update["settings"].items() if k != "out"}}
    return {**previous, "rows": rows, "settings": settings, "seconds": previous["seconds"] + update["seconds"]}


if __name__ == "__main__":
    main()
