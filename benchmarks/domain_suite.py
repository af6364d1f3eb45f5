"""The domain suite (issue 13): does the data help on domains nobody tuned for?

Nine target domains (`pipeline/evaluation/domains.py`), each one documented shift of the shipped prior's
held-out MNIST rows (`prior_data.mnist_split`: 1,000 rows the prior's training split excludes): thicker,
thinner, slanted, low-resolution, low-contrast, small/off-centre, elastic, noisy digits, and a class
subset with imbalance. Each has about 100 labelled references; the rest of its classes' rows are its
test images (disjoint from the references). Per domain, one `augment` run per arm (defaults, unguided, a
few fixed strengths; `--arms`), and for each run, against the domain's test images:

- alignment: MMD² (RBF, median bandwidth, unbiased) and KID in the shipped classifier's features,
  precision / recall / coverage (k = 5);
- garbage: kept samples farther from every real image (test images ∪ the plain held-out digits) than any
  real image is from its nearest other one (`metrics.garbage`);
- class histogram: kept samples per target class against the plan (largest deviation, points), and the
  histogram of the classes the shipped classifier sees;
- label agreement: the shipped classifier's class = the target class; and a 5-NN vote among the
  domain's *test* images in the classifier's features (judged in the domain's own style); the
  classifier's accuracy on the real test images is its ceiling;
- downstream utility (`pipeline/evaluation/utility.py`): the same small CNN trained on the references
  alone, references + synthetic, synthetic alone; accuracy on the test images, mean ± std over seeds;
- the pilot's choice and cost (runs with `strength auto`).

Then a table, the floors of issue 13 per domain, and sample grids go into docs/results.md §5 (between
markers; `--results` elsewhere for smoke runs). Runs resume (rerun the same command to continue).

    python benchmarks/domain_suite.py                  # the full suite: ~3 h on a free 2-core CPU
    python benchmarks/domain_suite.py --domains thick noise --n 64 --seeds 1 --steps 20 \
        --utility-steps 100 --out runs/suite-smoke --results runs/suite-smoke/results.md   # smoke, minutes

The decision suite (`--decision`, issue 24 item 3): which defaults to ship. Six domains (thick thin slant
lowres elastic noise; `--domains`), each with its references twice: labelled (refs/, class folders) and
unlabelled (refs_flat/, the same images in one folder). Labelled arms (`--labelled-arms`) run on the
first, unlabelled arms (`--unlabelled-arms`) on the second, each for `--gen-seeds` generation seeds (the
config's `seed`), 200 kept samples each (`--n`). Per run: MMD² to the test images and its ratio to the
variant's unguided baseline of the same seed (`BASELINE_ARM`), KID, precision / recall / coverage,
garbage, the classes the shipped classifier reads in the kept samples against those it reads in the
references (worst share ratio), label agreement (labelled), the pilot's choice and cost, seconds. For
labelled arms the small CNN (`--train-seeds` seeds, `--utility-steps` steps) trained by three recipes
(`pipeline.evaluation.utility.train_recipe`: mix, balanced, finetune; `--recipes`) and some of them on top
of affine augmentation of the references (`--affine-recipes`), against the references alone and with
affine augmentation. Every run's numbers are cached under <out>/metrics/<domain>/<variant>/<arm>/seed<k>.json
as soon as computed (rerun the same command to resume). The decision table, issue 24's floors per arm and
a per-domain table go to <out>/decision.md and between the decision-suite markers of docs/results.md
(§6); seed-0 sample grids to docs/results/decision/<domain>-<variant>.png.

    python benchmarks/domain_suite.py --decision               # the full decision suite (see docs/results.md §6)
    python benchmarks/domain_suite.py --decision --steps 20    # the same at 20 sampling steps
    python benchmarks/domain_suite.py --decision --domains thick noise --n 16 --steps 4 --gen-seeds 1 \
        --train-seeds 1 --utility-steps 20 --out runs/decision-smoke --results runs/decision-smoke/results.md
    python benchmarks/domain_suite.py --smoke --out /tmp/suite-smoke   # the test suite: the decision suite on
        # one domain, one arm per variant, 8 samples, 2 steps, a short pilot, a CNN of width 8 for 5 steps
        # (results.md and the grids go into --out; without --out, a temp folder)

The prior that ships today trained on 500 of these 1,000 rows (its own held-out split was the other 500):
until the retrained prior lands, its numbers are optimistic for those rows (unshifted versions seen).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from pydantic import ValidationError

from pipeline.config import AugmentConfig
from pipeline.evaluation.domains import DOMAINS, make_domain
from pipeline.evaluation.report import grids_figure
from pipeline.evaluation.run_eval import compare_sets
from pipeline.evaluation.utility import (
    RECIPES,
    LabelledImages,
    folder_images,
    run_samples,
    train_and_test,
    train_recipe,
)
from pipeline.jobs.job import run_job
from pipeline.measures import metrics as M
from pipeline.measures.features import classifier_extractor, extract, load_shipped_classifier
from pipeline.models.prior_data import load_mnist_arrays, mnist_split, pad_mnist
from storage.eval_io import read_samples

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ARMS = ["default", "unguided", "latent@0.005", "latent@0.02", "latent@0.05", "noisy@auto"]
START, END = "<!-- domain-suite:start -->", "<!-- domain-suite:end -->"


def arm_settings(arm: str) -> dict[str, Any]:
    """Config overrides of an arm: "default", "unguided" or "<guidance>@<strength|auto>", then optional
    ",key=value" settings (JSON values), e.g. "default,cfg_scale=2" or "default,label_filter=true"."""
    base, *extras = arm.split(",")
    if base == "default":
        out: dict[str, Any] = {}
    elif base == "unguided":
        out = {"guidance": "none"}
    else:
        mode, _, strength = base.partition("@")
        if not strength:
            raise SystemExit(f"arm {arm!r}: use default, unguided or <guidance>@<strength|auto>, then ,key=value")
        out = {"guidance": mode, "strength": strength if strength == "auto" else float(strength)}
    for extra in extras:
        key, sep, value = extra.partition("=")
        if not sep:
            raise SystemExit(f"arm {arm!r}: {extra!r} is not key=value")
        out[key] = json.loads(value)
    return out


def arm_slug(arm: str) -> str:
    """A folder name for an arm ("noisy@auto,cfg_scale=2" -> "noisy-auto-cfg_scale-2")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", arm).strip("-")


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> None:
    for img, label, row in zip(images, labels, rows, strict=True):
        (root / str(int(label))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(root / str(int(label)) / f"mnist{int(row):04d}.png")


def prepare_data(out: Path, names: list[str]) -> tuple[dict[str, Path], torch.Tensor]:
    """Write each domain's refs/ and test/ folders (once); return them and the plain held-out digits."""
    x, y = load_mnist_arrays()
    _, held = mnist_split()
    folders = {}
    for name in names:
        root = out / "data" / name
        if not (root / "done").is_file():
            d = make_domain(DOMAINS[name], x, y, held)
            write_folder(root / "refs", d.ref_images, d.ref_labels, d.ref_rows)
            write_folder(root / "test", d.test_images, d.test_labels, d.test_rows)
            (root / "done").write_text(json.dumps({"refs": len(d.ref_rows), "test": len(d.test_rows)}))
        folders[name] = root
    return folders, pad_mnist(x[held])


def to_digits(labels: torch.Tensor, classes: list[str]) -> torch.Tensor:
    return torch.tensor([int(classes[int(c)]) for c in labels])


def judge_digits(classifier: Any, features: Any, images: torch.Tensor) -> torch.Tensor:
    """The shipped classifier's digit for each image [n, 1, 32, 32] in [-1, 1]."""
    with torch.no_grad():
        return torch.cat([classifier.fc(features.fn(c)).argmax(1) for c in images.split(256)])


def _set_metrics(
    record: dict[str, Any],
    images: torch.Tensor,
    f_syn: torch.Tensor,
    test: LabelledImages,
    f_test: torch.Tensor,
    f_real: torch.Tensor,
    n_permutations: int,
) -> dict[str, Any]:
    """What every run gets, labelled or not: counts, alignment to the test images, garbage, pilot, time."""
    sets = compare_sets(f_syn, f_test, n_permutations=n_permutations, k=5)
    summary = record["summary"]
    return {
        "strength": summary.get("strength"),
        "kept": len(images),
        "generated": summary["num_generated"],
        "rejected": summary.get("rejected", {}),
        "shortfall": summary.get("shortfall", 0),
        "mmd2": sets["mmd"].get("mmd2"),
        "mmd2_pixels": M.mmd2_permutation_test(images.flatten(1), test.images.flatten(1), n_permutations=0)["mmd2"],
        "mmd2_p": sets["mmd"].get("p_value"),
        "kid": sets["kid"].get("kid"),
        "precision": sets["prdc"].get("precision"),
        "recall": sets["prdc"].get("recall"),
        "coverage": sets["prdc"].get("coverage"),
        "garbage": M.garbage(f_syn, f_real)["rate"],
        "pilot": _pilot_summary(record.get("pilot")),
        "seconds": summary.get("seconds", {}).get("total"),
    }


def evaluate_arm(
    run_dir: Path,
    refs: LabelledImages,
    test: LabelledImages,
    f_test: torch.Tensor,
    f_real: torch.Tensor,
    classifier: Any,
    features: Any,
    planned: torch.Tensor,
    n_permutations: int,
    ref_digits: torch.Tensor | None = None,
) -> tuple[dict[str, Any], LabelledImages]:
    """Metrics of a labelled run (its kept samples, labelled by class name) against the domain's test images;
    with `ref_digits` (the classifier's digits of the references) also the class-share ratios."""
    syn = run_samples(run_dir, refs.classes)
    record = json.loads((run_dir / "run.json").read_text())
    f_syn = extract(features, syn.images)
    digits = judge_digits(classifier, features, syn.images)
    target_digits = to_digits(syn.labels, refs.classes)
    classes = [int(c) for c in refs.classes]
    judged = torch.tensor([classes.index(int(d)) if int(d) in classes else -1 for d in digits])
    knn = M.knn_predict(f_syn, f_test, test.labels, k=5)
    out = _set_metrics(record, syn.images, f_syn, test, f_test, f_real, n_permutations)
    out |= {
        "histogram": M.class_histogram(syn.labels, planned),
        "judged_histogram": M.class_histogram(judged, planned),
        "label_agreement": float((digits == target_digits).double().mean()),
        "label_agreement_knn_test": float((knn == syn.labels).double().mean()),
    }
    if ref_digits is not None:
        out["class_share"] = class_share_ratio(digits, ref_digits)
    return out, syn


def evaluate_unlabelled(
    run_dir: Path,
    test: LabelledImages,
    f_test: torch.Tensor,
    f_real: torch.Tensor,
    classifier: Any,
    features: Any,
    ref_digits: torch.Tensor,
    n_permutations: int,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Metrics of an unlabelled run: alignment, garbage, and the classes the shipped classifier sees in the
    kept samples against those it sees in the references. Returns (metrics, images, judged digits)."""
    images = run_images(run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    f_syn = extract(features, images)
    digits = judge_digits(classifier, features, images)
    out = _set_metrics(record, images, f_syn, test, f_test, f_real, n_permutations)
    out["class_share"] = class_share_ratio(digits, ref_digits)
    return out, images, digits


def run_images(run_dir: Path) -> torch.Tensor:
    """Kept samples of a run (labelled or not, manifest order) as [n, C, H, W] in [-1, 1]."""
    record = json.loads((run_dir / "run.json").read_text())
    table = pq.read_table(run_dir / "manifest.parquet", columns=["key", "shard", "kept"])
    rows = [r for r in table.to_pylist() if r["kept"]]
    _, pixels, _ = read_samples(run_dir, record["config"]["prefix"], [(r["shard"], r["key"]) for r in rows])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def class_share_ratio(digits: torch.Tensor, ref_digits: torch.Tensor, num_classes: int = 10) -> dict[str, Any]:
    """Share of each class among the judged `digits` of the kept samples over its share among the judged
    `ref_digits` of the references; a class the references (as judged) lack counts as half a reference
    (share 0.5 / len(ref_digits)), so a mode the references do not have still shows as a large ratio.
    `max_ratio` is the worst class (the floor: <= 1.5)."""
    kept = torch.bincount(digits.long(), minlength=num_classes).double() / max(len(digits), 1)
    ref = torch.bincount(ref_digits.long(), minlength=num_classes).double() / max(len(ref_digits), 1)
    ratios = kept / ref.clamp(min=0.5 / max(len(ref_digits), 1))
    worst = int(ratios.argmax())
    return {
        "kept_shares": kept.tolist(),
        "reference_shares": ref.tolist(),
        "ratios": ratios.tolist(),
        "max_ratio": float(ratios[worst]),
        "worst_class": worst,
    }


def _pilot_summary(pilot: dict | None) -> dict | None:
    if not pilot:
        return None
    return {
        "chosen": pilot.get("chosen"),
        "reason": pilot.get("reason"),
        "seconds": pilot.get("seconds"),
        "candidates": [(c["strength"], c["mmd2"], c["feasible"]) for c in pilot.get("candidates", [])],
        "cost_fraction_of_job": pilot.get("cost_fraction_of_job"),
        "samples": pilot.get("samples_generated"),
    }


def utility(refs: LabelledImages, syn: LabelledImages | None, test: LabelledImages, seeds: int, steps: int) -> dict:
    """Held-out accuracy (mean, std over seeds) of the references alone, or with / replaced by `syn`."""

    def arm(train: LabelledImages) -> dict[str, float]:
        acc = np.array([train_and_test(train, test, seed, steps=steps)["accuracy"] for seed in range(seeds)])
        return {"mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if seeds > 1 else 0.0}

    if syn is None:
        return {"real": arm(refs)}
    both = LabelledImages(torch.cat([refs.images, syn.images]), torch.cat([refs.labels, syn.labels]), refs.classes)
    return {"real_plus_synthetic": arm(both), "synthetic": arm(syn)}


def run_domain(name: str, root: Path, plain: torch.Tensor, args: argparse.Namespace, clf: Any) -> dict[str, Any]:
    refs = folder_images(root / "refs", channels=1, size=32)
    test = folder_images(root / "test", channels=1, size=32)
    features = classifier_extractor(clf)
    f_test = extract(features, test.images)
    f_real = torch.cat([f_test, extract(features, plain)])
    counts = torch.bincount(refs.labels, minlength=len(refs.classes)).double()
    planned = counts / counts.sum()
    with torch.no_grad():
        test_digits = torch.cat([clf.fc(features.fn(c)).argmax(1) for c in test.images.split(256)])
    result: dict[str, Any] = {
        "domain": name,
        "shift": DOMAINS[name].description,
        "references": len(refs.labels),
        "test_images": len(test.labels),
        "classifier_on_test": float((test_digits == to_digits(test.labels, test.classes)).double().mean()),
        "arms": {},
    }
    t = time.perf_counter()
    result["utility_real"] = utility(refs, None, test, args.train_seeds, args.utility_steps)["real"]
    print(
        f"{name}: references alone {result['utility_real']['mean']:.3f} ({time.perf_counter() - t:.0f} s)", flush=True
    )
    grids = [("references", refs.images[_by_class(refs.labels)]), ("test images", test.images[_by_class(test.labels)])]
    for arm in args.arms:
        t = time.perf_counter()
        overrides = dict(arm_settings(arm))
        if args.steps is not None:
            overrides["steps"] = args.steps
        cfg = AugmentConfig(
            ref=str(root / "refs"),
            out=str(args.out / "runs" / name / arm_slug(arm)),
            n=args.n,
            shard_size=args.shard_size,
            cache_dir=str(args.out / "cache"),
            progress="quiet",
            **overrides,
        )
        run_job(cfg)
        metrics, syn = evaluate_arm(
            Path(cfg.out), refs, test, f_test, f_real, clf, features, planned, args.permutations
        )
        if arm in args.utility_arms:
            metrics["utility"] = utility(refs, syn, test, args.train_seeds, args.utility_steps)
        result["arms"][arm] = metrics
        grids.append((f"{arm} (s={_fmt(metrics['strength'])})", syn.images[_by_class(syn.labels)]))
        print(f"{name} {arm}: {_line(metrics)} ({time.perf_counter() - t:.0f} s)", flush=True)
    args.grids.mkdir(parents=True, exist_ok=True)
    (args.grids / f"{name}.png").write_bytes(grids_figure(grids, ncol=8, max_images=32))
    result["floors"] = floors(result)
    return result


def _by_class(labels: torch.Tensor, count: int = 32) -> torch.Tensor:
    """`count` indices spread evenly over the images sorted by class (every class shown)."""
    order = torch.argsort(labels, stable=True)
    return order[torch.linspace(0, len(order) - 1, min(count, len(order))).round().long()]


def floors(result: dict[str, Any]) -> dict[str, bool] | None:
    """Issue 13's floors for the defaults against unguided (None if either arm is missing)."""
    arms = result["arms"]
    if "default" not in arms or "unguided" not in arms:
        return None
    d, u = arms["default"], arms["unguided"]
    out = {
        "garbage <= 1%": d["garbage"] <= 0.01,
        "histogram within 2 points": d["histogram"]["max_deviation"] <= 0.02,
        "MMD² <= 0.5 x unguided": d["mmd2"] <= 0.5 * u["mmd2"],
        "precision >= unguided": d["precision"] >= u["precision"],
        "coverage >= 0.9 x unguided": d["coverage"] >= 0.9 * u["coverage"],
        "label agreement >= 90%": d["label_agreement"] >= 0.9,
    }
    if "utility" in d:
        out["real + synthetic >= real"] = d["utility"]["real_plus_synthetic"]["mean"] >= result["utility_real"]["mean"]
    return out


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}g}"


def _line(m: dict[str, Any]) -> str:
    return (
        f"s={_fmt(m['strength'])} MMD² {m['mmd2']:.4f} KID {m['kid']:.4f} P {m['precision']:.2f} "
        f"R {m['recall']:.2f} C {m['coverage']:.2f} garbage {m['garbage']:.3f} "
        f"hist {100 * m['histogram']['max_deviation']:.1f} pts, labels {m['label_agreement']:.3f}"
    )


def render(results: list[dict[str, Any]], args: argparse.Namespace, seconds: float) -> str:
    """The Markdown section: setup, command, table, floors, grids."""
    grid_dir = _relative(args.grids, args.results.parent)
    lines = [
        START,
        "",
        f"`{args.command}` ({seconds / 60:.0f} min on this machine; "
        f"{args.n} samples per run, {args.train_seeds} seed(s) of the utility classifier, {args.utility_steps} steps)",
        "",
        "Features: the shipped classifier's penultimate layer (meaningless where the classifier cannot read the "
        "domain's real test images: see its accuracy below); MMD² px: the same MMD² on the 32x32 pixels. "
        "MMD² and KID against each domain's test images; "
        "garbage = kept samples farther from every real image (test images and plain held-out digits) than any "
        "real image is from its nearest other one; hist = largest deviation of the kept class shares from the "
        "plan (points); labels = shipped classifier agrees with the target class (kNN: 5-NN vote among the test "
        "images); utility = accuracy on the test images of a small CNN trained on the ~100 references alone "
        "(real), with the run's samples added (+syn), or on the samples alone (syn).",
        "",
        "| domain | arm | s | MMD² ↓ | KID ↓ | MMD² px ↓ | precision ↑ | recall ↑ | coverage ↑ | garbage ↓ "
        "| hist (pts) ↓ | labels ↑ | labels kNN ↑ | real | real + syn | syn |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for arm, m in r["arms"].items():
            u = m.get("utility", {})
            cells = [
                r["domain"],
                arm,
                _fmt(m["strength"]),
                f"{m['mmd2']:.4f}",
                f"{m['kid']:.4f}",
                f"{m['mmd2_pixels']:.4f}",
                f"{m['precision']:.2f}",
                f"{m['recall']:.2f}",
                f"{m['coverage']:.2f}",
                f"{100 * m['garbage']:.1f}%",
                f"{100 * m['histogram']['max_deviation']:.1f}",
                f"{m['label_agreement']:.3f}",
                f"{m['label_agreement_knn_test']:.3f}",
                f"{r['utility_real']['mean']:.3f}" if arm == next(iter(r["arms"])) else "",
                _acc(u.get("real_plus_synthetic")),
                _acc(u.get("synthetic")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Domains, the shipped classifier's accuracy on their real test images (its ceiling), the pilot:", ""]
    lines += ["| domain | shift | refs / test | classifier on test | default's pilot: s chosen (candidates), cost |"]
    lines += ["|---|---|---|---|---|"]
    for r in results:
        p = r["arms"].get("default", {}).get("pilot")
        pilot = "–"
        if p:
            tried = ", ".join(f"{s:.3g}{'' if ok else '✗'}" for s, _, ok in p["candidates"])
            pilot = f"{_fmt(p['chosen'])} ({tried}); {p['seconds']:.0f} s"
        lines.append(
            f"| {r['domain']} | {r['shift']} | {r['references']} / {r['test_images']} | "
            f"{r['classifier_on_test']:.3f} | {pilot} |"
        )
    checks = [r["floors"] for r in results if r.get("floors")]
    if checks:
        names = list(checks[0])
        lines += ["", "Issue 13's floors, defaults against unguided (✓ met, ✗ not):", ""]
        lines += ["| domain | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for r in results:
            if r.get("floors"):
                lines.append(f"| {r['domain']} | " + " | ".join("✓" if r["floors"][k] else "✗" for k in names) + " |")
    lines += ["", "Sample grids (references, test images, then each arm's kept samples, by class):", ""]
    lines += [f"![{r['domain']}]({grid_dir}/{r['domain']}.png)" for r in results]
    lines += ["", END]
    return "\n".join(lines)


def _acc(u: dict | None) -> str:
    return "" if not u else f"{u['mean']:.3f} ± {u['std']:.3f}"


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def write_section(
    path: Path, section: str, start: str = START, end: str = END, heading: str = "## 5. Domain suite"
) -> None:
    """Replace the text between the markers `start` and `end` in `path` (append a `heading` with them if
    absent)."""
    text = path.read_text() if path.is_file() else ""
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n{heading}\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ----------------------------------------------------------------------------------------------------------
# The decision suite (issue 24, item 3): which defaults to ship, for labelled and for unlabelled references
# ----------------------------------------------------------------------------------------------------------

DECISION_DOMAINS = ["thick", "thin", "slant", "lowres", "elastic", "noise"]
DECISION_LABELLED = [
    "default",
    "latent@auto,cfg_scale=2,label_filter=true",
    "noisy@auto,cfg_scale=2,label_filter=true",
    "noisy@auto,cfg_scale=1.5,label_filter=true",
    "noisy@auto,cfg_scale=1,label_filter=true",
    "unguided,cfg_scale=2,label_filter=true",
]
DECISION_UNLABELLED = [
    "default",
    "unguided,pseudo_classes=false",
    "noisy@auto,pseudo_classes=false",
    "noisy@auto,pseudo_classes=true,cfg_scale=2,label_filter=true",
    "latent@auto,pseudo_classes=true,cfg_scale=2,label_filter=true",
]
VARIANTS = ("labelled", "unlabelled")
#: Each variant's references: the class folders, or the same images in one flat folder.
REF_FOLDER = {"labelled": "refs", "unlabelled": "refs_flat"}
#: The arm a variant's MMD² ratios are taken against (same domain, same generation seed).
BASELINE_ARM = {"labelled": "unguided,cfg_scale=2,label_filter=true", "unlabelled": "unguided,pseudo_classes=false"}
#: The references-alone baselines of the downstream CNN (per domain).
REAL, REAL_AFFINE = "real", "real+affine"
DEC_START, DEC_END = "<!-- decision-suite:start -->", "<!-- decision-suite:end -->"
DEC_HEADING = "## 6. Decision suite"


@dataclass(frozen=True)
class Floors:
    """Issue 24's floors. Unlabelled: MMD² ratio to unguided, garbage, class share; labelled: label agreement,
    downstream change (points); both: the pilot's choices over generation seeds within a factor."""

    mmd_ratio: float = 0.15
    garbage: float = 0.01
    class_share: float = 1.5
    label_agreement: float = 0.98
    downstream_mean: float = 0.0
    downstream_min: float = -1.0
    pilot_factor: float = 2.0


FLOORS = Floors()


@dataclass(frozen=True)
class RunKey:
    """One generation run of the decision suite."""

    domain: str
    variant: str  # "labelled" | "unlabelled"
    arm: str
    seed: int  # the run's config seed


def decision_plan(domains: list[str], labelled: list[str], unlabelled: list[str], gen_seeds: int) -> list[RunKey]:
    """Every run, in the order the suite makes them: per domain, the labelled arms then the unlabelled ones
    (each variant's unguided baseline first, so the others' progress lines can give their MMD² ratios), each
    for generation seeds 0..gen_seeds-1."""

    def baseline_first(variant: str, names: list[str]) -> list[str]:
        return sorted(names, key=lambda a: a != BASELINE_ARM[variant])  # stable: the rest keep their order

    arms = {"labelled": baseline_first("labelled", labelled), "unlabelled": baseline_first("unlabelled", unlabelled)}
    return [
        RunKey(domain, variant, arm, seed)
        for domain in domains
        for variant in VARIANTS
        for arm in arms[variant]
        for seed in range(gen_seeds)
    ]


def cache_path(out: Path, key: RunKey) -> Path:
    """Where a run's metrics and downstream accuracies are kept (written as soon as each is computed)."""
    return out / "metrics" / key.domain / key.variant / arm_slug(key.arm) / f"seed{key.seed}.json"


def run_folder(out: Path, key: RunKey) -> Path:
    return out / "runs" / key.domain / key.variant / arm_slug(key.arm) / f"seed{key.seed}"


def run_settings(key: RunKey, n: int, steps: int | None) -> dict[str, Any]:
    """What a cached run must match to be reused (else the suite stops: use another --out)."""
    return {"variant": key.variant, "arm": key.arm, "seed": key.seed, "n": n, "steps": steps}


def utility_keys(recipes: list[str], affine_recipes: list[str]) -> list[str]:
    """The downstream trainings of a labelled run: each recipe, then those also run on top of the affine
    augmentation of the references ("<recipe>+affine")."""
    return [*recipes, *(f"{r}+affine" for r in affine_recipes)]


def pending_trainings(entry: dict[str, Any], keys: list[str], train_seeds: int, steps: int) -> list[tuple[str, int]]:
    """(key, train seed) pairs of `keys` that `entry` ({key: {"steps", "by_seed": {seed: accuracy}}}) lacks at
    these `steps` (a block trained with other steps counts as missing)."""
    todo = []
    for key in keys:
        block = entry.get(key) or {}
        done = block.get("by_seed", {}) if block.get("steps") == steps else {}
        todo += [(key, seed) for seed in range(train_seeds) if str(seed) not in done]
    return todo


def record_training(entry: dict[str, Any], key: str, seed: int, steps: int, accuracy: float) -> None:
    """Add one training's accuracy to `entry` (replacing a block trained with other steps)."""
    block = entry.get(key)
    if not block or block.get("steps") != steps:
        block = entry[key] = {"steps": steps, "by_seed": {}}
    block["by_seed"][str(seed)] = accuracy


def mean_accuracy(block: dict[str, Any] | None, train_seeds: int, steps: int) -> float | None:
    """Mean accuracy over train seeds 0..train_seeds-1 of a block (None unless all are there at `steps`)."""
    if not block or block.get("steps") != steps:
        return None
    values = [block["by_seed"].get(str(s)) for s in range(train_seeds)]
    return None if any(v is None for v in values) else float(np.mean(values))


def train_key(
    key: str,
    refs: LabelledImages,
    syn: LabelledImages | None,
    test: LabelledImages,
    seed: int,
    steps: int,
    width: int = 32,
) -> float:
    """Test accuracy of one training: `key` is a recipe ("mix", "balanced+affine", ...) or a baseline."""
    recipe, _, augmentation = key.partition("+")
    recipe = "mix" if recipe == REAL else recipe
    affine = augmentation == "affine"
    return train_recipe(recipe, refs, syn, test, seed, steps=steps, affine=affine, width=width)["accuracy"]


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, data: Any) -> None:
    """Write atomically (a crash leaves the old file or the new one, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def prepare_flat(root: Path) -> Path:
    """The unlabelled variant of a domain's references: the images of refs/<class>/ in one flat folder
    refs_flat/ beside it (written once; file names are unique: mnist<row>.png)."""
    flat, marker = root / "refs_flat", root / "refs_flat.done"
    if not marker.is_file():
        files = sorted((root / "refs").glob("*/*.png"))
        if len({f.name for f in files}) != len(files):
            raise RuntimeError(f"{root / 'refs'}: file names repeat across classes, cannot flatten")
        flat.mkdir(exist_ok=True)
        for f in files:
            shutil.copyfile(f, flat / f.name)
        marker.write_text(json.dumps({"refs": len(files)}))
    return flat


@dataclass
class DomainData:
    """A domain's references and test images with what every run is compared against."""

    name: str
    root: Path
    refs: LabelledImages
    test: LabelledImages
    features: Any
    f_test: torch.Tensor
    f_real: torch.Tensor  # test images ∪ plain held-out digits (the garbage threshold's real set)
    planned: torch.Tensor  # the references' class proportions (labels)
    ref_digits: torch.Tensor  # the shipped classifier's digit for each reference
    info: dict[str, Any]


def load_domain(name: str, root: Path, plain: torch.Tensor, clf: Any) -> DomainData:
    refs = folder_images(root / "refs", channels=1, size=32)
    test = folder_images(root / "test", channels=1, size=32)
    features = classifier_extractor(clf)
    f_test = extract(features, test.images)
    counts = torch.bincount(refs.labels, minlength=len(refs.classes)).double()
    ref_digits = judge_digits(clf, features, refs.images)
    test_digits = judge_digits(clf, features, test.images)
    info = {
        "shift": DOMAINS[name].description,
        "references": len(refs.labels),
        "test_images": len(test.labels),
        "classifier_on_test": float((test_digits == to_digits(test.labels, test.classes)).double().mean()),
        "classifier_on_references": float((ref_digits == to_digits(refs.labels, refs.classes)).double().mean()),
        "reference_digit_shares": (torch.bincount(ref_digits, minlength=10).double() / len(ref_digits)).tolist(),
    }
    f_real = torch.cat([f_test, extract(features, plain)])
    return DomainData(name, root, refs, test, features, f_test, f_real, counts / counts.sum(), ref_digits, info)


def arm_config(key: RunKey, root: Path, args: argparse.Namespace) -> AugmentConfig:
    """The `augment` config of a run (raises pydantic's ValidationError for an arm the config rejects)."""
    overrides = dict(arm_settings(key.arm))
    if "seed" in overrides:
        raise SystemExit(f"arm {key.arm!r}: the generation seed comes from --gen-seeds, not the arm")
    if args.steps is not None:
        overrides.setdefault("steps", args.steps)
    return AugmentConfig(
        ref=str(root / REF_FOLDER[key.variant]),
        out=str(run_folder(args.out, key)),
        n=args.n,
        shard_size=args.shard_size,
        cache_dir=str(args.out / "cache"),
        progress="quiet",
        seed=key.seed,
        **overrides,
    )


def check_arms(args: argparse.Namespace, root: Path) -> None:
    """Stop before any work when an arm's settings fail the config's validation (e.g. a field not there yet)."""
    bad = []
    for variant, arms in (("labelled", args.labelled_arms), ("unlabelled", args.unlabelled_arms)):
        for arm in arms:
            try:
                arm_config(RunKey("check", variant, arm, 0), root, args)
            except ValidationError as exc:
                why = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                bad.append(f"  {variant} {arm!r}: {why}")
    if bad:
        raise SystemExit(
            "arms the config rejects (drop them with --labelled-arms / --unlabelled-arms):\n" + "\n".join(bad)
        )


def decision_run(
    key: RunKey, d: DomainData, args: argparse.Namespace, clf: Any
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Make one run (`run_job` resumes a run folder it finds) and measure it. Returns (metrics, kept images,
    their labels (labelled) or the classifier's digits (unlabelled))."""
    t = time.perf_counter()
    cfg = arm_config(key, d.root, args)
    run_job(cfg)
    job_seconds = time.perf_counter() - t
    if key.variant == "labelled":
        metrics, syn = evaluate_arm(
            Path(cfg.out), d.refs, d.test, d.f_test, d.f_real, clf, d.features, d.planned, args.permutations,
            ref_digits=d.ref_digits,
        )  # fmt: skip
        images, labels = syn.images, syn.labels
    else:
        metrics, images, labels = evaluate_unlabelled(
            Path(cfg.out), d.test, d.f_test, d.f_real, clf, d.features, d.ref_digits, args.permutations
        )
    metrics["job_seconds"] = job_seconds
    metrics["run_seconds"] = time.perf_counter() - t
    return metrics, images, labels


def domain_baselines(d: DomainData, args: argparse.Namespace) -> dict[str, float | None]:
    """The CNN on the references alone and with affine augmentation (mean over train seeds; cached)."""
    path = args.out / "metrics" / d.name / "baselines.json"
    entry = read_json(path) or {}
    for key, seed in pending_trainings(entry, [REAL, REAL_AFFINE], args.train_seeds, args.utility_steps):
        t = time.perf_counter()
        acc = train_key(key, d.refs, None, d.test, seed, args.utility_steps, args.cnn_width)
        record_training(entry, key, seed, args.utility_steps, acc)
        write_json(path, entry)
        print(f"{d.name}: {key} seed {seed}: {acc:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    return {k: mean_accuracy(entry.get(k), args.train_seeds, args.utility_steps) for k in (REAL, REAL_AFFINE)}


def run_decision(args: argparse.Namespace) -> str:
    """The decision suite: every run of `decision_plan`, resumed from the cache; returns the section."""
    t0 = time.perf_counter()
    folders, plain = prepare_data(args.out, args.domains)
    for name in args.domains:
        prepare_flat(folders[name])
    check_arms(args, folders[args.domains[0]])
    clf = load_shipped_classifier()
    plan = decision_plan(args.domains, args.labelled_arms, args.unlabelled_arms, args.gen_seeds)
    keys = utility_keys(args.recipes, args.affine_recipes)
    results: dict[str, Any] = {
        "settings": {
            "n": args.n,
            "steps": args.steps,
            "gen_seeds": args.gen_seeds,
            "train_seeds": args.train_seeds,
            "utility_steps": args.utility_steps,
            "utility_keys": keys,
            "labelled_arms": args.labelled_arms,
            "unlabelled_arms": args.unlabelled_arms,
        },
        "domains": {},
        "failures": [],
    }
    fresh: list[float] = []  # seconds of the runs this invocation computed (for the ETA)
    for k, key in enumerate(plan, 1):
        if key.domain not in results["domains"]:
            d = load_domain(key.domain, folders[key.domain], plain, clf)
            dom = results["domains"][key.domain] = dict(d.info, baselines={}, runs={v: {} for v in VARIANTS})
            if any(a in args.utility_arms for a in args.labelled_arms) and keys:
                dom["baselines"] = domain_baselines(d, args)
            grids: dict[str, list] = {
                "labelled": [("references", d.refs.images[_by_class(d.refs.labels)])],
                "unlabelled": [("references (by judged digit)", d.refs.images[_by_class(d.ref_digits)])],
            }
        t = time.perf_counter()
        path = cache_path(args.out, key)
        cached = read_json(path)
        expected = run_settings(key, args.n, args.steps)
        if cached is not None and cached["settings"] != expected:
            raise SystemExit(f"{path}: cached with {cached['settings']}, now {expected}: use another --out")
        was_cached, images, labels = cached is not None, None, None
        try:
            if cached is None:
                metrics, images, labels = decision_run(key, d, args, clf)
                cached = {"settings": expected, "metrics": metrics, "utility": {}}
                write_json(path, cached)
            todo = []
            if key.variant == "labelled" and key.arm in args.utility_arms:
                todo = pending_trainings(cached["utility"], keys, args.train_seeds, args.utility_steps)
            if todo or (key.seed == 0 and images is None):
                images, labels = _run_images(key, d, args, clf)
            for name, seed in todo:
                syn = LabelledImages(images, labels, d.refs.classes)
                acc = train_key(name, d.refs, syn, d.test, seed, args.utility_steps, args.cnn_width)
                record_training(cached["utility"], name, seed, args.utility_steps, acc)
                write_json(path, cached)
        except Exception as exc:  # one failing run must not end hours of the others; a rerun retries it
            traceback.print_exc()
            results["failures"].append(f"{key.domain} {key.variant} `{key.arm}` seed {key.seed}: {exc}")
            print(f"[{k}/{len(plan)}] {key.domain} {key.variant} {key.arm} seed {key.seed}: FAILED ({exc})", flush=True)
            continue
        m = dict(cached["metrics"])
        if key.variant == "labelled" and key.arm in args.utility_arms:
            m["downstream"] = {
                name: mean_accuracy(cached["utility"].get(name), args.train_seeds, args.utility_steps) for name in keys
            }
        dom["runs"][key.variant].setdefault(key.arm, {})[str(key.seed)] = m
        if key.seed == 0 and images is not None:
            order = _by_class(labels)
            title = f"{key.arm.replace(',', chr(10))}\n(s={_fmt(m['strength'], 3)})"  # one setting a line
            grids[key.variant].append((title, images[order]))
        seconds = time.perf_counter() - t
        if not was_cached or todo:
            fresh.append(seconds)
        left = sum(fresh) / len(fresh) * (len(plan) - k) if fresh else None
        eta = "" if left is None else f"; ~{left / 3600:.1f} h left at this pace"
        print(
            f"[{k}/{len(plan)}] {key.domain} {key.variant} {key.arm} seed {key.seed}: {_decision_line(dom, key)} "
            f"({seconds:.0f} s{', cached' if was_cached and not todo else ''}{eta})",
            flush=True,
        )
        if k == len(plan) or plan[k].domain != key.domain:
            args.grids.mkdir(parents=True, exist_ok=True)
            for variant, panels in grids.items():
                if len(panels) > 1:
                    png = grids_figure(panels, ncol=8, max_images=32)
                    (args.grids / f"{key.domain}-{variant}.png").write_bytes(png)
            write_json(args.out / "decision.json", results)
    write_json(args.out / "decision.json", results)
    grid_dir = _relative(args.grids, args.results.parent)
    return render_decision(results, args.command, time.perf_counter() - t0, grid_dir)


def _run_images(key: RunKey, d: DomainData, args: argparse.Namespace, clf: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A finished run's kept images and their labels (labelled) or judged digits (unlabelled)."""
    folder = run_folder(args.out, key)
    if key.variant == "labelled":
        syn = run_samples(folder, d.refs.classes)
        return syn.images, syn.labels
    images = run_images(folder)
    return images, judge_digits(clf, d.features, images)


def _decision_line(dom: dict[str, Any], key: RunKey) -> str:
    """The progress line's metrics of one run (ratio once the baseline run of its seed is there)."""
    m = dom["runs"][key.variant][key.arm][str(key.seed)]
    base = dom["runs"][key.variant].get(BASELINE_ARM[key.variant], {}).get(str(key.seed))
    ratio = _ratio(m, base)
    p = m.get("pilot") or {}
    pilot = f" (pilot {p['seconds']:.0f} s, {p.get('samples')} samples)" if p.get("seconds") is not None else ""
    parts = [
        f"s={_fmt(m['strength'], 3)}{pilot}",
        f"MMD² {m['mmd2']:.4f}" + ("" if ratio is None else f" ({ratio:.2f}x unguided)"),
        f"garbage {100 * m['garbage']:.1f}%",
        f"class share max {m['class_share']['max_ratio']:.2f}x",
    ]
    if "label_agreement" in m:
        parts.append(f"labels {m['label_agreement']:.3f}")
    real = dom["baselines"].get(REAL)
    for name, acc in m.get("downstream", {}).items():
        if acc is not None and real is not None:
            parts.append(f"{name} {100 * (acc - real):+.1f} pts")
    return ", ".join(parts)


def _ratio(m: dict[str, Any], base: dict[str, Any] | None) -> float | None:
    if base is None or m.get("mmd2") is None or not base.get("mmd2") or base["mmd2"] <= 0:
        return None
    return m["mmd2"] / base["mmd2"]


def _mean(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def pilot_stable(strengths: list[float | None], factor: float = FLOORS.pilot_factor) -> bool | None:
    """The pilot's choices over generation seeds are within `factor` of each other (None: fewer than two
    choices, or a run without a pilot)."""
    if len(strengths) < 2 or any(s is None for s in strengths):
        return None
    lo, hi = min(strengths), max(strengths)
    if hi <= 0:
        return True
    return lo > 0 and hi / lo <= factor


def domain_stats(dom: dict[str, Any], variant: str, arm: str, floors: Floors = FLOORS) -> dict[str, Any] | None:
    """One arm on one domain, each number the mean over generation seeds (None: no run of it)."""
    runs = dom["runs"].get(variant, {}).get(arm)
    if not runs:
        return None
    base = dom["runs"].get(variant, {}).get(BASELINE_ARM[variant], {})
    seeds = sorted(runs, key=int)
    ms = [runs[s] for s in seeds]
    pilots = [m.get("pilot") for m in ms]
    strengths = [p.get("chosen") if p else None for p in pilots]
    stats: dict[str, Any] = {
        "seeds": [int(s) for s in seeds],
        "mmd2": _mean([m["mmd2"] for m in ms]),
        "mmd_ratio": _mean([_ratio(runs[s], base.get(s)) for s in seeds]),
        "kid": _mean([m["kid"] for m in ms]),
        "precision": _mean([m["precision"] for m in ms]),
        "recall": _mean([m["recall"] for m in ms]),
        "coverage": _mean([m["coverage"] for m in ms]),
        "garbage": _mean([m["garbage"] for m in ms]),
        "class_share": _mean([m["class_share"]["max_ratio"] for m in ms]),
        "label_agreement": _mean([m.get("label_agreement") for m in ms]),
        "strengths": [m["strength"] for m in ms],
        "pilot_choices": strengths,
        "pilot_stable": pilot_stable(strengths, floors.pilot_factor) if all(pilots) else None,
        "pilot_time_fraction": _mean(
            [
                p["seconds"] / m["run_seconds"] if p and p.get("seconds") and m.get("run_seconds") else None
                for p, m in zip(pilots, ms, strict=True)
            ]
        ),  # fmt: skip
        "pilot_sample_fraction": _mean([p.get("cost_fraction_of_job") if p else None for p in pilots]),
        "run_seconds": _mean([m.get("run_seconds") for m in ms]),
        "downstream": {},
    }
    names = sorted({name for m in ms for name in m.get("downstream", {})})
    for name in names:
        accs = [m.get("downstream", {}).get(name) for m in ms]
        stats["downstream"][name] = {
            base_name: None if dom["baselines"].get(base_name) is None or None in accs
            else float(np.mean([100 * (a - dom["baselines"][base_name]) for a in accs]))
            for base_name in (REAL, REAL_AFFINE)
        }  # fmt: skip
    return stats


def arm_summary(results: dict[str, Any], variant: str, arm: str, floors: Floors = FLOORS) -> dict[str, Any] | None:
    """One arm over the domains: means and the worst domain of each number (None: no run of it)."""
    per = {n: domain_stats(dom, variant, arm, floors) for n, dom in results["domains"].items()}
    per = {n: s for n, s in per.items() if s is not None}
    if not per:
        return None
    stats = list(per.values())

    def col(name: str) -> list[float]:
        return [s[name] for s in stats if s[name] is not None]

    def agg(name: str, how: Any) -> float | None:
        values = col(name)
        return float(how(values)) if values and len(values) == len(stats) else None

    most_seeds = max(len(s["seeds"]) for s in stats)
    by_seed = [
        _median([s["pilot_choices"][i] for s in stats if i < len(s["pilot_choices"])]) for i in range(most_seeds)
    ]
    stable = [s["pilot_stable"] for s in stats]
    downstream: dict[str, dict[str, dict[str, float | None]]] = {}
    for name in sorted({n for s in stats for n in s["downstream"]}):
        downstream[name] = {}
        for base_name in (REAL, REAL_AFFINE):
            values = [s["downstream"].get(name, {}).get(base_name) for s in stats]
            ok = None not in values
            downstream[name][base_name] = {
                "mean": float(np.mean(values)) if ok else None,
                "min": float(np.min(values)) if ok else None,
            }
    return {
        "domains": list(per),
        "per_domain": per,
        "mmd_ratio_mean": agg("mmd_ratio", np.mean),
        "mmd_ratio_max": agg("mmd_ratio", np.max),
        "garbage_mean": agg("garbage", np.mean),
        "garbage_max": agg("garbage", np.max),
        "class_share_max": agg("class_share", np.max),
        "label_agreement_min": agg("label_agreement", np.min),
        "pilot_by_seed": by_seed,
        "pilot_stable": None if None in stable else all(stable),
        "pilot_time_fraction": _mean(col("pilot_time_fraction")),
        "pilot_sample_fraction": _mean(col("pilot_sample_fraction")),
        "run_seconds": _mean(col("run_seconds")),
        "downstream": downstream,
    }


def _median(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def downstream_baseline(name: str) -> str:
    """The baseline a recipe's floor compares with: references + affine for "+affine" recipes, else alone."""
    return REAL_AFFINE if name.endswith("+affine") else REAL


def arm_floors(summary: dict[str, Any], variant: str, floors: Floors = FLOORS) -> dict[str, bool | None]:
    """Issue 24's floors for one arm's `arm_summary` (None: not measured). Unlabelled: MMD² ratio to
    unguided and garbage on every domain, no class above its share among the references times
    `floors.class_share`; labelled: label agreement on every domain, and per recipe the downstream change
    (vs the references alone; "+affine" recipes vs the references + affine) on average and on the worst
    domain; both: the pilot's choices within a factor over seeds on every domain."""

    tol = 1e-9  # a number on the floor meets it (accuracies are fractions: 100·(0.79 − 0.80) < −1 in floats)

    def at_most(value: float | None, limit: float) -> bool | None:
        return None if value is None else value <= limit + tol

    out: dict[str, bool | None] = {}
    if variant == "unlabelled":
        out[f"MMD² <= {floors.mmd_ratio:g}x unguided"] = at_most(summary["mmd_ratio_max"], floors.mmd_ratio)
        out[f"garbage <= {100 * floors.garbage:g}%"] = at_most(summary["garbage_max"], floors.garbage)
        out[f"no class > {floors.class_share:g}x its share"] = at_most(summary["class_share_max"], floors.class_share)
    else:
        agreement = summary["label_agreement_min"]
        out[f"labels >= {floors.label_agreement:g}"] = (
            None if agreement is None else agreement >= floors.label_agreement - tol
        )
        for name, by_base in summary["downstream"].items():
            d = by_base[downstream_baseline(name)]
            out[f"downstream {name}"] = (
                None
                if d["mean"] is None
                else d["mean"] >= floors.downstream_mean - tol and d["min"] >= floors.downstream_min - tol
            )
    out[f"pilot within {floors.pilot_factor:g}x"] = summary["pilot_stable"]
    return out


def floors_met(checks: dict[str, bool | None]) -> bool | None:
    """All floors of an arm: every measured one met, the downstream ones by at least one recipe (a
    practitioner uses one); None if nothing was measured."""
    down = [v for k, v in checks.items() if k.startswith("downstream") and v is not None]
    rest = [v for k, v in checks.items() if not k.startswith("downstream") and v is not None]
    if not down and not rest:
        return None
    return all(rest) and (any(down) if down else True)


def _pts(x: float | None) -> str:
    return "–" if x is None else f"{x:+.1f}"


def _mark(x: bool | None) -> str:
    return "–" if x is None else ("✓" if x else "✗")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _ok(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def render_decision(results: dict[str, Any], command: str, seconds: float, grid_dir: str | None) -> str:
    """The decision suite's Markdown section: the decision table per arm, the floors, per-domain numbers."""
    st = results["settings"]
    keys = st["utility_keys"]
    arms = [("labelled", a) for a in st["labelled_arms"]] + [("unlabelled", a) for a in st["unlabelled_arms"]]
    summaries = {va: arm_summary(results, *va) for va in arms}
    summaries = {va: s for va, s in summaries.items() if s is not None}
    domains = list(results["domains"])
    lines = [
        DEC_START,
        "",
        f"`{command}` ({seconds / 3600:.1f} h on this machine; domains {', '.join(domains)}; {st['n']} kept samples "
        f"per run, sampling steps {st['steps'] or 'the config default'}, {st['gen_seeds']} generation seed(s); "
        f"downstream CNN {st['utility_steps']} steps, {st['train_seeds']} train seed(s))",
        "",
        "Each labelled arm runs on the domain's class folders, each unlabelled arm on the same images in one flat "
        "folder. MMD² ratio: MMD² (shipped classifier's features, to the domain's test images) over the unguided "
        f"baseline's of the same variant and seed (labelled `{BASELINE_ARM['labelled']}`, unlabelled "
        f"`{BASELINE_ARM['unlabelled']}`); per domain the mean over seeds, then mean / max over domains. Class "
        "share: the largest ratio, over digits, of a digit's share among the kept samples to its share among the "
        "references, both as the shipped classifier reads them. Labels: the classifier agrees with the target "
        "class (min over domains). s: the pilot's choice per seed (median over domains); pilot stable: on every "
        "domain the seeds' choices are within 2x; pilot cost: its seconds / the run's, its samples / the job's.",
        "",
        "### Decision table",
        "",
        "| variant | arm | MMD² ratio mean | max | garbage mean | max | class share max | labels min "
        "| s per seed | pilot stable | pilot cost (time / samples) | run seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (variant, arm), s in summaries.items():
        by_seed = " / ".join(_fmt(x, 3) for x in s["pilot_by_seed"]) or "–"
        cost = (
            "–"
            if s["pilot_time_fraction"] is None
            else f"{100 * s['pilot_time_fraction']:.0f}% / {100 * (s['pilot_sample_fraction'] or 0):.0f}%"
        )
        lines.append(
            f"| {variant} | `{arm}` | {_ok(s['mmd_ratio_mean'], '.3f')} | {_ok(s['mmd_ratio_max'], '.3f')} | "
            f"{_pct(s['garbage_mean'])} | {_pct(s['garbage_max'])} | {_ok(s['class_share_max'], '.2f')} | "
            f"{_ok(s['label_agreement_min'], '.3f')} | {by_seed} | {_mark(s['pilot_stable'])} | {cost} | "
            f"{_ok(s['run_seconds'], '.0f')} |"
        )
    labelled = [(va, s) for va, s in summaries.items() if va[0] == "labelled" and s["downstream"]]
    if labelled and keys:
        lines += [
            "",
            "Downstream (labelled arms): the small CNN's test accuracy with the run's samples, change in points vs "
            "the references alone / vs the references + affine augmentation; each the mean over train seeds and "
            "generation seeds, then mean over domains (min over domains). mix: uniform over references ∪ samples; "
            "balanced: each batch half references, half samples; finetune: the mix, then 1/3 more steps on the "
            "references alone at 0.1x lr; +affine: the references augmented (rotation ±10°, translation ±2 px, "
            "scale 0.9-1.1, shear ±10°).",
            "",
            "| arm | " + " | ".join(f"{k} vs real | {k} vs real+affine" for k in keys) + " |",
            "|---|" + "---|---|" * len(keys),
        ]
        for (_, arm), s in labelled:
            cells = []
            for k in keys:
                for base_name in (REAL, REAL_AFFINE):
                    d = s["downstream"].get(k, {}).get(base_name, {"mean": None, "min": None})
                    cells.append("–" if d["mean"] is None else f"{_pts(d['mean'])} ({_pts(d['min'])})")
            lines.append(f"| `{arm}` | " + " | ".join(cells) + " |")
    for variant in VARIANTS:
        rows = [(arm, arm_floors(s, variant)) for (v, arm), s in summaries.items() if v == variant]
        if not rows:
            continue
        names = list(dict.fromkeys(n for _, checks in rows for n in checks))
        lines += [
            "",
            f"Issue 24's floors, {variant} (every domain; ✓ met, ✗ not, – not measured; **all**: every measured "
            "floor met, the downstream one by at least one recipe"
            + ("; each recipe vs the references alone, +affine recipes vs the references + affine" if variant
               == "labelled" else "") + "):",
            "",
            "| arm | " + " | ".join(names) + " | **all** |",
            "|---|" + "---|" * (len(names) + 1),
        ]  # fmt: skip
        for arm, checks in rows:
            name = f"**`{arm}`**" if arm == "default" else f"`{arm}`"
            lines.append(
                f"| {name} | " + " | ".join(_mark(checks.get(n)) for n in names) + f" | {_mark(floors_met(checks))} |"
            )
    lines += [
        "",
        "### Per domain",
        "",
        "| domain | shift | classifier on test / refs | CNN on refs alone | refs + affine |",
        "|---|---|---|---|---|",
    ]
    for name, dom in results["domains"].items():
        b = dom["baselines"]
        lines.append(
            f"| {name} | {dom['shift']} | {dom['classifier_on_test']:.3f} / {dom['classifier_on_references']:.3f} | "
            f"{_ok(b.get(REAL), '.3f')} | {_ok(b.get(REAL_AFFINE), '.3f')} |"
        )
    lines += [
        "",
        "Per domain and arm (means over generation seeds; Δ: points vs refs alone / vs refs + affine):",
        "",
        "| domain | variant | arm | s per seed | MMD² | ratio | KID | P | R | C | garbage | class share | labels | "
        + " | ".join(f"Δ {k}" for k in keys)
        + " |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(keys),
    ]
    for name, dom in results["domains"].items():
        for variant, arm in arms:
            s = domain_stats(dom, variant, arm)
            if s is None:
                continue
            down = [s["downstream"].get(k) for k in keys]
            lines.append(
                f"| {name} | {variant} | `{arm}` | {' / '.join(_fmt(x, 3) for x in s['strengths'])} | "
                f"{s['mmd2']:.4f} | {_ok(s['mmd_ratio'], '.3f')} | {s['kid']:.4f} | {s['precision']:.2f} | "
                f"{s['recall']:.2f} | {s['coverage']:.2f} | {100 * s['garbage']:.1f}% | {s['class_share']:.2f} | "
                f"{_ok(s['label_agreement'], '.3f')} | "
                + " | ".join("–" if d is None else f"{_pts(d[REAL])} / {_pts(d[REAL_AFFINE])}" for d in down)
                + " |"
            )
    if results.get("failures"):
        lines += ["", "Runs that failed (rerun the command to retry them):", ""]
        lines += [f"- {f}" for f in results["failures"]]
    if grid_dir is not None:
        lines += ["", "Sample grids, seed 0 (references, then each arm's kept samples, by class or judged digit):", ""]
        for name in domains:
            lines += [
                f"![{name} {v}]({grid_dir}/{name}-{v}.png)" for v in VARIANTS if results["domains"][name]["runs"][v]
            ]
    lines += ["", DEC_END]
    return "\n".join(lines)


#: `--smoke`'s arm, in both variants: the default config, with a pilot of 3 candidates x 8 samples.
SMOKE_ARM = "default,pilot_samples=8,pilot_max_strength=0.04"


def apply_smoke(args: argparse.Namespace) -> None:
    """`--smoke`: the decision suite on one domain, one arm per variant, tiny runs and trainings; its outputs
    (runs, results.md, grids) in --out, a temp folder unless given, never docs/."""
    args.decision, args.domains = True, ["thick"]
    args.labelled_arms, args.unlabelled_arms, args.utility_arms = [SMOKE_ARM], [SMOKE_ARM], None
    args.n, args.steps, args.gen_seeds, args.train_seeds, args.utility_steps = 8, 2, 1, 1, 5
    args.cnn_width, args.recipes, args.affine_recipes, args.permutations = 8, ["mix"], [], 20
    args.out = args.out or Path(tempfile.mkdtemp(prefix="domain-suite-smoke-"))
    args.results = args.results or args.out / "results.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The suite's options; those left unset take the mode's defaults (`--decision` or the domain suite)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decision", action="store_true", help="the decision suite (issue 24): see the top")
    ap.add_argument("--out", type=Path, default=None, help="default: runs/suite, with --decision runs/decision")
    ap.add_argument("--domains", nargs="+", default=None, choices=list(DOMAINS))
    ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, help="default | unguided | <guidance>@<strength|auto>")
    ap.add_argument("--labelled-arms", nargs="*", default=None, help="--decision: arms run on the class folders")
    ap.add_argument("--unlabelled-arms", nargs="*", default=None, help="--decision: arms run on the flat folder")
    ap.add_argument("--utility-arms", nargs="*", default=None, help="default: default unguided; --decision: all")
    ap.add_argument(
        "--recipes",
        nargs="*",
        default=["mix", "balanced", "finetune"],  # the decision suite's three (RECIPES has more since)
        choices=list(RECIPES),
        help="--decision",
    )
    ap.add_argument(
        "--affine-recipes", nargs="*", default=["balanced"], choices=list(RECIPES), help="--decision: also on affine"
    )
    ap.add_argument("--n", type=int, default=None, help="kept samples per run (default 1000; --decision 200)")
    ap.add_argument("--gen-seeds", type=int, default=None, help="--decision: generation seeds per arm (default 2)")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config default)")
    ap.add_argument("--seeds", "--train-seeds", dest="train_seeds", type=int, default=3, help="of the utility CNN")
    ap.add_argument("--cnn-width", type=int, default=32, help="--decision: the utility CNN's width (16: ~2.5x faster)")
    ap.add_argument("--utility-steps", type=int, default=None, help="default 600; --decision 300")
    ap.add_argument("--permutations", type=int, default=200, help="of the MMD² permutation test")
    ap.add_argument("--results", type=Path, default=None, help="default: docs/results.md (--smoke: <out>/results.md)")
    ap.add_argument("--grids", type=Path, default=None, help="default: <results folder>/results/suite (or decision)")
    ap.add_argument("--smoke", action="store_true", help="a decision suite of seconds (the test suite): see the top")
    args = ap.parse_args(argv)
    if args.smoke:
        apply_smoke(args)
    args.results = args.results or REPO / "docs" / "results.md"
    dec = args.decision
    args.out = args.out or REPO / "runs" / ("decision" if dec else "suite")
    args.domains = args.domains or (DECISION_DOMAINS if dec else list(DOMAINS))
    args.labelled_arms = DECISION_LABELLED if args.labelled_arms is None else args.labelled_arms
    args.unlabelled_arms = DECISION_UNLABELLED if args.unlabelled_arms is None else args.unlabelled_arms
    if args.utility_arms is None:
        args.utility_arms = list(args.labelled_arms) if dec else ["default", "unguided"]
    args.n = args.n if args.n is not None else (200 if dec else 1000)
    args.gen_seeds = args.gen_seeds if args.gen_seeds is not None else (2 if dec else 1)
    args.utility_steps = args.utility_steps if args.utility_steps is not None else (300 if dec else 600)
    args.grids = args.grids or args.results.parent / "results" / ("decision" if dec else "suite")
    args.command = "python benchmarks/domain_suite.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline.checks.pilot").setLevel(logging.INFO)
    if args.decision:
        # the evaluation's small-sample caveats (power, KID subsets, FD rank) would repeat on every run
        logging.getLogger("pipeline.evaluation.run_eval").setLevel(logging.ERROR)
        section = run_decision(args)
        write_section(args.results, section, DEC_START, DEC_END, DEC_HEADING)
        (args.out / "decision.md").write_text(section + "\n")
        print(section)
        return
    t0 = time.perf_counter()
    folders, plain = prepare_data(args.out, args.domains)
    clf = load_shipped_classifier()
    results = []
    for name in args.domains:
        results.append(run_domain(name, folders[name], plain, args, clf))
        (args.out / "suite.json").write_text(json.dumps(results, indent=2))
    section = render(results, args, time.perf_counter() - t0)
    write_section(args.results, section)
    print(section)


if __name__ == "__main__":
    main()
