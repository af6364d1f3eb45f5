"""Reach of a prior: how much of each suite domain's real test images can it draw, unguided?

For each prior (the new one and the one it replaces, side by side in one run): `--samples` class-conditional
samples, balanced over the ten digits, without CFG (the unguided prior), 50 DDIM steps and the pipeline's
default eta, one seed per sample (`pipeline.models.prior_eval.sample_prior`). Then, per domain of the suite
(`pipeline/evaluation/domains.py`), the samples of the domain's classes against the domain's real test
images, in the judge classifier's penultimate features (the new prior's classifier unless `--judge`):

- recall (Kynkäänniemi et al. 2019): share of test images inside the samples' k-NN balls;
- coverage (Naeem et al. 2020): share of test images whose own k-NN ball holds a sample (k = 5).

Also class accuracy of the same samples (no CFG) and, with `--cfg-samples`, with CFG 2, by the judge.
The result goes to `--json`, and with `--card MODEL_DIR` into MODEL_DIR/metrics.json["reach"] (the model
card renders it: `python -m pipeline.training --card-only --out MODEL_DIR`).

    python benchmarks/prior_reach.py --new runs/mnist-ldm-v3 --old pipeline/assets/mnist-ldm \\
        --card runs/mnist-ldm-v3                                   # ~4 min on a 2-core CPU
    python benchmarks/prior_reach.py --smoke --json /tmp/reach.json   # seconds (the test suite)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.evaluation.domains import DOMAINS, make_domain
from pipeline.measures import metrics as M
from pipeline.models.prior_data import load_mnist_arrays, mnist_split
from pipeline.models.prior_eval import classify, sample_prior
from pipeline.models.shipped import load_shipped

REPO = Path(__file__).resolve().parent.parent


def domain_test_images(names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each domain's real test images [n, 1, 32, 32] in [-1, 1] and their digit labels."""
    x, y = load_mnist_arrays()
    _, held = mnist_split()
    out = {}
    for name in names:
        d = make_domain(DOMAINS[name], x, y, held)
        images = torch.as_tensor(d.test_images, dtype=torch.float32)[:, None] / 127.5 - 1.0
        out[name] = (images, torch.as_tensor(d.test_labels))
    return out


def prior_samples(folder: Path, n: int, steps: int, cfg_scale: float, seed: int) -> dict[str, Any]:
    prior = load_shipped(folder)
    labels = torch.arange(n) % int(prior.info["num_classes"])
    t0 = time.perf_counter()
    run = sample_prior(prior, labels, seed=seed, num_steps=steps, cfg_scale=cfg_scale, batch_size=250, eta=1.0)
    return {
        "model_id": prior.info.get("model_id"),
        "images": run.images,
        "labels": labels,
        "ms_per_sample": 1000 * (time.perf_counter() - t0) / n,
    }


def reach(
    samples: dict[str, Any], judge: Any, tests: dict[str, tuple[torch.Tensor, torch.Tensor]], k: int
) -> dict[str, Any]:
    judged = classify(judge, samples["images"])
    labels = samples["labels"]
    out: dict[str, Any] = {
        "model_id": samples["model_id"],
        "class_accuracy": float((judged["probs"].argmax(1) == labels).float().mean()),
        "ms_per_sample": samples["ms_per_sample"],
        "domains": {},
    }
    for name, (images, test_labels) in tests.items():
        classes = test_labels.unique()
        mine = torch.isin(labels, classes)
        f_test = classify(judge, images)["features"]
        scores = M.prdc(judged["features"][mine], f_test, k=k)
        out["domains"][name] = {"recall": float(scores["recall"]), "coverage": float(scores["coverage"])}
    return out


def markdown(new: dict[str, Any], old: dict[str, Any] | None) -> str:
    head = f"| domain | recall {new['model_id']} | coverage {new['model_id']} |"
    rule = "|---|---|---|"
    if old:
        head += f" recall {old['model_id']} | coverage {old['model_id']} |"
        rule += "---|---|"
    lines = [head, rule]
    for name, r in new["domains"].items():
        row = f"| {name} | {r['recall']:.3f} | {r['coverage']:.3f} |"
        if old:
            o = old["domains"][name]
            row += f" {o['recall']:.3f} | {o['coverage']:.3f} |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", type=Path, default=REPO / "pipeline" / "assets" / "mnist-ldm", help="prior folder")
    ap.add_argument("--old", type=Path, default=None, help="the prior it replaces (side by side)")
    ap.add_argument("--judge", type=Path, default=None, help="model folder whose classifier judges (default --new)")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--cfg-samples", type=int, default=0, help="also class accuracy with CFG 2 on this many")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--card", type=Path, default=None, help="write into MODEL_DIR/metrics.json['reach']")
    ap.add_argument("--smoke", action="store_true", help="20 samples, 3 steps, two domains (seconds)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.samples, args.steps, args.k, args.domains = 20, 3, 3, ["thick", "subset"]
        args.cfg_samples = min(args.cfg_samples, 10)
    judge = load_shipped(args.judge or args.new).classifier
    if judge is None:
        raise SystemExit(f"{args.judge or args.new}: no classifier/ to judge with")
    tests = domain_test_images(args.domains)
    result: dict[str, Any] = {
        "samples": args.samples,
        "ddim_steps": args.steps,
        "eta": 1.0,
        "k": args.k,
        "judge": str(args.judge or args.new),
        "command": "python benchmarks/prior_reach.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    for role, folder in (("new", args.new), ("old", args.old)):
        if folder is None:
            continue
        r = reach(prior_samples(folder, args.samples, args.steps, 1.0, args.seed), judge, tests, args.k)
        if args.cfg_samples:
            s = prior_samples(folder, args.cfg_samples, args.steps, 2.0, args.seed)
            predicted = classify(judge, s["images"])["probs"].argmax(1)
            r["class_accuracy_cfg2"] = float((predicted == s["labels"]).float().mean())
        result[role] = r
        print(f"{role} {r['model_id']}: class accuracy {r['class_accuracy']:.3f}, {r['ms_per_sample']:.0f} ms/sample")
    table = markdown(result["new"], result.get("old"))
    result["table"] = table
    print(table)
    if result.get("old"):
        new, old = result["new"]["domains"], result["old"]["domains"]
        better = [n for n in args.domains if new[n]["recall"] > old[n]["recall"]]
        result["higher_recall_on"] = better
        print(f"higher recall than the old prior on {len(better)}/{len(args.domains)} domains")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.card:
        path = args.card / "metrics.json"
        report = json.loads(path.read_text())
        report["metrics"]["reach"] = result
        path.write_text(json.dumps(report, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
