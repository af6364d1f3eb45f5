"""The utility evidence of docs/results.md (section 4): what guided synthetic data is worth to a classifier.

For each target domain made by `examples/make_utility_domains.py` (120 labelled references, 280 shifted
real test images, all from the prior's held-out rows): one guided `augment` run and one unguided run
(`--guidance none --keep 1`, plain prior samples in the references' class proportions) of `--n` samples,
then the utility evaluation (arms (a)-(d), 3 seeds) on the first 1,000 and on all `--n` kept samples.
Runs are resumable (rerun to continue).

    python examples/make_utility_domains.py --out runs/utility-data
    python benchmarks/utility_evidence.py --data runs/utility-data --out runs/utility [--n 5000]
    python benchmarks/utility_evidence.py --smoke --out /tmp/utility   # the data made in --out, tiny runs; seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipeline.config import AugmentConfig
from pipeline.evaluation.utility import utility_eval
from pipeline.jobs.job import run_job

REPO = Path(__file__).resolve().parent.parent


#: `--smoke`: both runs' settings (2 sampling steps, a short pilot ladder of few samples, a cache in --out).
SMOKE_RUN = {"steps": 2, "pilot_samples": 8, "pilot_max_strength": 0.04}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "runs" / "utility-data")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "utility")
    ap.add_argument("--domains", nargs="+", default=["thick", "slanted"])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument(
        "--guided", default="{}", help="JSON of AugmentConfig overrides for the guided run, e.g. '{\"strength\": 0.02}'"
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="make the domains into <out>/data, thick only, 8 samples, 2 steps, 1 seed, 5 train steps (the test suite)",
    )
    args = ap.parse_args(argv)
    overrides = json.loads(args.guided)
    common: dict = {}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        sys.path.insert(0, str(REPO / "examples"))
        import make_utility_domains

        args.data = args.out / "data"
        make_utility_domains.main(["--out", str(args.data)])
        args.domains, args.n, args.sizes, args.seeds, args.train_steps = ["thick"], 8, [8], 1, 5
        common = {**SMOKE_RUN, "cache_dir": str(args.out / "cache")}
    results = []
    for domain in args.domains:
        refs, test = args.data / domain / "refs", args.data / domain / "test"
        runs = {
            "guided": AugmentConfig(
                ref=str(refs), n=args.n, out=str(args.out / f"{domain}-guided"), **{**common, **overrides}
            ),
            "unguided": AugmentConfig(
                ref=str(refs), n=args.n, out=str(args.out / f"{domain}-unguided"), guidance="none", keep=1.0, **common
            ),
        }
        for name, cfg in runs.items():
            t = time.perf_counter()
            summary = run_job(cfg)
            print(f"{domain} {name}: {summary.num_kept} kept in {time.perf_counter() - t:.0f} s", flush=True)
        for size in args.sizes:
            t = time.perf_counter()
            res = utility_eval(
                runs["guided"].out,
                refs,
                unguided_run=runs["unguided"].out,
                real_test=test,
                seeds=args.seeds,
                steps=args.train_steps,
                limit=size,
            )
            res["domain"] = domain
            res["guided_config"] = runs["guided"].model_dump(mode="json")
            results.append(res)
            arms = "  ".join(f"{k} {v['accuracy_mean']:.3f}±{v['accuracy_std']:.3f}" for k, v in res["arms"].items())
            print(f"{domain} n={size}: {arms}  ({time.perf_counter() - t:.0f} s)", flush=True)
            (args.out / "utility_evidence.json").write_text(json.dumps(results, indent=2))
    print(render(results))
    return results


def render(results: list[dict]) -> str:
    """Markdown: one row per (domain, synthetic count), arms as columns, then per-class accuracy."""
    arms = ["a_real", "b_real_plus_synthetic", "c_synthetic", "d_real_plus_unguided"]
    lines = [
        "| domain | synthetic n | (a) real | (b) real + guided | (c) guided alone | (d) real + unguided | (b) − (a) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        a = r["arms"]
        cells = [f"{a[k]['accuracy_mean']:.3f} ± {a[k]['accuracy_std']:.3f}" if k in a else "–" for k in arms]
        delta = a["b_real_plus_synthetic"]["accuracy_mean"] - a["a_real"]["accuracy_mean"]
        lines.append(f"| {r['domain']} | {r['settings']['n_synthetic']} | {' | '.join(cells)} | {delta:+.3f} |")
    lines += ["", "Per-class held-out accuracy (mean over seeds):", ""]
    for r in results:
        classes = r["settings"]["classes"]
        lines.append(f"{r['domain']}, n = {r['settings']['n_synthetic']}:")
        lines.append("")
        lines.append("| arm | " + " | ".join(classes) + " |")
        lines.append("|---|" + "---|" * len(classes))
        for k, v in r["arms"].items():
            lines.append(f"| {k} | " + " | ".join(f"{v['per_class'][c]:.3f}" for c in classes) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
