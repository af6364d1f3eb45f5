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

The prior that ships today trained on 500 of these 1,000 rows (its own held-out split was the other 500):
until the retrained prior lands, its numbers are optimistic for those rows (unshifted versions seen).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.config import AugmentConfig
from pipeline.evaluation import metrics as M
from pipeline.evaluation.domains import DOMAINS, make_domain
from pipeline.evaluation.features import classifier_extractor, extract, load_shipped_classifier
from pipeline.evaluation.report import grids_figure
from pipeline.evaluation.run_eval import compare_sets
from pipeline.evaluation.utility import LabelledImages, folder_images, run_samples, train_and_test
from pipeline.job import run_job
from pipeline.models.prior_data import load_mnist_arrays, mnist_split, pad_mnist

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
) -> tuple[dict[str, Any], LabelledImages]:
    syn = run_samples(run_dir, refs.classes)
    record = json.loads((run_dir / "run.json").read_text())
    f_syn = extract(features, syn.images)
    sets = compare_sets(f_syn, f_test, n_permutations=n_permutations, k=5)
    with torch.no_grad():
        digits = torch.cat([classifier.fc(features.fn(c)).argmax(1) for c in syn.images.split(256)])
    target_digits = to_digits(syn.labels, refs.classes)
    classes = [int(c) for c in refs.classes]
    judged = torch.tensor([classes.index(int(d)) if int(d) in classes else -1 for d in digits])
    knn = M.knn_predict(f_syn, f_test, test.labels, k=5)
    summary = record["summary"]
    return {
        "strength": summary.get("strength"),
        "kept": len(syn.labels),
        "generated": summary["num_generated"],
        "rejected": summary.get("rejected", {}),
        "shortfall": summary.get("shortfall", 0),
        "mmd2": sets["mmd"].get("mmd2"),
        "mmd2_pixels": M.mmd2_permutation_test(syn.images.flatten(1), test.images.flatten(1), n_permutations=0)["mmd2"],
        "mmd2_p": sets["mmd"].get("p_value"),
        "kid": sets["kid"].get("kid"),
        "precision": sets["prdc"].get("precision"),
        "recall": sets["prdc"].get("recall"),
        "coverage": sets["prdc"].get("coverage"),
        "garbage": M.garbage(f_syn, f_real)["rate"],
        "histogram": M.class_histogram(syn.labels, planned),
        "judged_histogram": M.class_histogram(judged, planned),
        "label_agreement": float((digits == target_digits).double().mean()),
        "label_agreement_knn_test": float((knn == syn.labels).double().mean()),
        "pilot": _pilot_summary(record.get("pilot")),
        "seconds": summary.get("seconds", {}).get("total"),
    }, syn


def _pilot_summary(pilot: dict | None) -> dict | None:
    if not pilot:
        return None
    return {
        "chosen": pilot.get("chosen"),
        "reason": pilot.get("reason"),
        "seconds": pilot.get("seconds"),
        "candidates": [(c["strength"], c["mmd2"], c["feasible"]) for c in pilot.get("candidates", [])],
        "cost_fraction_of_job": pilot.get("cost_fraction_of_job"),
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
    result["utility_real"] = utility(refs, None, test, args.seeds, args.utility_steps)["real"]
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
            out=str(args.out / "runs" / name / re.sub(r"[^A-Za-z0-9._-]+", "-", arm)),
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
            metrics["utility"] = utility(refs, syn, test, args.seeds, args.utility_steps)
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
        f"{args.n} samples per run, {args.seeds} seed(s) of the utility classifier, {args.utility_steps} steps)",
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


def write_section(path: Path, section: str) -> None:
    """Replace the text between the suite's markers in `path` (append a §5 with them if absent)."""
    text = path.read_text() if path.is_file() else ""
    if START in text and END in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n## 5. Domain suite\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "suite")
    ap.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, help="default | unguided | <guidance>@<strength|auto>")
    ap.add_argument("--utility-arms", nargs="+", default=["default", "unguided"])
    ap.add_argument("--n", type=int, default=1000, help="kept samples per run")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config default)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the utility classifier")
    ap.add_argument("--utility-steps", type=int, default=600)
    ap.add_argument("--permutations", type=int, default=200, help="of the MMD² permutation test")
    ap.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    ap.add_argument("--grids", type=Path, default=None, help="default: <results folder>/results/suite")
    args = ap.parse_args(argv)
    args.grids = args.grids or args.results.parent / "results" / "suite"
    args.command = "python benchmarks/domain_suite.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline.pilot").setLevel(logging.INFO)
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
