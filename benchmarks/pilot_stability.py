"""Does `--strength auto` choose the same strength whatever the seed? (issue 24, floor: within a factor 2)

For each reference folder and arm, the pilot alone (no job) runs with run seeds 0..K-1 (each seed gives the
pilot its own split of the references and its own samples); the table lists the chosen strengths, their
max/min ratio, and, where the record has them, what each rule would have chosen from the same scores.

    python benchmarks/pilot_stability.py --refs runs/decision/data/thick/refs --seeds 3 \
        --arms latent noisy,cfg_scale=2 --out runs/pilot-stability.json
    python benchmarks/pilot_stability.py --smoke       # a tiny model, seconds (the test suite runs it)

Runs against whatever `pipeline` is importable, so the previous pilot can be measured from a checkout of
an older commit (`PYTHONPATH=<checkout> python benchmarks/pilot_stability.py ...`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.config import AugmentConfig
from pipeline.jobs.job import build_context


def arm_overrides(arm: str) -> dict[str, Any]:
    """ "noisy,cfg_scale=2" -> {"guidance": "noisy", "cfg_scale": 2} (values are JSON)."""
    mode, *extras = arm.split(",")
    out: dict[str, Any] = {"guidance": mode, "strength": "auto"}
    for extra in extras:
        key, sep, value = extra.partition("=")
        if not sep:
            raise SystemExit(f"arm {arm!r}: {extra!r} is not key=value")
        out[key] = json.loads(value)
    return out


def choices(refs: str, arm: str, seeds: int, n: int, work: Path, **settings: Any) -> dict[str, Any]:
    """The pilot's record summary for each seed of one (references, arm)."""
    rows = []
    for seed in range(seeds):
        cfg = AugmentConfig(
            ref=refs,
            out=str(work / f"seed{seed}"),
            n=n,
            seed=seed,
            cache_dir=str(work / "cache"),
            progress="quiet",
            reach_check=False,
            **settings,
            **arm_overrides(arm),
        )
        t = time.perf_counter()
        pilot = build_context(cfg).pilot or {}
        rows.append(
            {
                "seed": seed,
                "chosen": pilot.get("chosen"),
                "choices": pilot.get("choices"),
                "candidates": [(c["strength"], c["mmd2"], c["feasible"]) for c in pilot.get("candidates", [])],
                "samples": pilot.get("samples_generated"),
                "seconds": round(time.perf_counter() - t, 1),
            }
        )
        print(f"{refs} {arm} seed {seed}: chose {rows[-1]['chosen']} ({rows[-1]['seconds']} s)", flush=True)
    chosen = [r["chosen"] for r in rows if r["chosen"]]
    ratio = max(chosen) / min(chosen) if len(chosen) == len(rows) else None
    return {"refs": refs, "arm": arm, "runs": rows, "ratio": ratio, "within_factor_2": ratio is not None and ratio <= 2}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| references | arm | chosen per seed | max/min | within x2 |", "|---|---|---|---|---|"]
    for r in results:
        picks = ", ".join(f"{x['chosen']:.3g}" if x["chosen"] is not None else "–" for x in r["runs"])
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.3g}"
        lines.append(f"| {r['refs']} | {r['arm']} | {picks} | {ratio} | {'yes' if r['within_factor_2'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refs", nargs="+", default=[])
    ap.add_argument("--arms", nargs="+", default=["latent", "noisy,cfg_scale=2"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n", type=int, default=1000, help="the job's size (sets the pilot's budget)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="JSON results")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model and references, seconds")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings: dict[str, Any] = {} if args.steps is None else {"steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        refs = list(args.refs)
        if args.smoke:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from tiny_models import save_tiny_dit, write_reference_folder

            refs = [str(write_reference_folder(work / "refs", count=40, classes=("a", "b")))]
            settings = {"model": str(save_tiny_dit(work / "dit")), "steps": 2, "pilot_samples": 8, "batch_size": 8}
            settings["pilot_max_strength"] = 0.04
            args.seeds, args.n, args.arms = 2, 8, ["latent"]
        if not refs:
            raise SystemExit("give --refs FOLDER [FOLDER ...] (or --smoke)")
        results = [
            choices(r, arm, args.seeds, args.n, work / f"{i}-{j}", **settings)
            for i, r in enumerate(refs)
            for j, arm in enumerate(args.arms)
        ]
    print(table(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
