"""`augment eval RUN`: the typer command over :func:`pipeline.evaluation.run_eval.evaluate_run`.

Registered in `pipeline/cli/commands.py` with

    from .evaluation.cli import eval_command
    app.command("eval")(eval_command)
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["eval_command", "summary_lines"]


def _num(x: Any, spec: str = ".4g") -> str:
    return "–" if x is None else format(x, spec)


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A few human-readable lines of an eval result (what the command prints)."""
    lines = [f"features: {result['settings']['feature_description']}"]
    lines.append(f"held-out references: {result['settings']['heldout_source']}")
    for name, title in (("kept", "kept"), ("generated", "all generated"), ("guidance_references", "real baseline")):
        metrics = result["sets"].get(name)
        if not metrics:
            continue
        mmd, kid, fd, prdc = (metrics.get(g, {}) for g in ("mmd", "kid", "fd", "prdc"))
        lines.append(
            f"{title:>14}: MMD² {_num(mmd.get('mmd2'))} (p={_num(mmd.get('p_value'), '.3g')})  "
            f"KID {_num(kid.get('kid'))} ± {_num(kid.get('kid_std'), '.2g')}  FD {_num(fd.get('fd'))}  "
            f"P/R/D/C {_num(prdc.get('precision'), '.2f')}/{_num(prdc.get('recall'), '.2f')}/"
            f"{_num(prdc.get('density'), '.2f')}/{_num(prdc.get('coverage'), '.2f')}"
        )
    for space, mem in result.get("memorisation", {}).items():
        if "num_copies" in mem:
            lines.append(f"near-copies of guidance references ({space}): {mem['num_copies']} of {mem['n']}")
    for name, acc in result.get("class_accuracy", {}).items():
        lines.append(f"class accuracy ({name}): {_num(acc.get('accuracy'), '.3f')} over {acc.get('n')} samples")
    if result.get("warnings"):
        lines.append(f"{len(result['warnings'])} warning(s): see eval.json / report.html")
    return lines


def eval_command(
    run: Annotated[Path, typer.Argument(help="Output folder of an `augment` run (run.json, manifest, shards/).")],
    heldout: Annotated[
        str | None,
        typer.Option(
            help="Folder of held-out references (default: the run's --holdout split, else the guidance refs)."
        ),
    ] = None,
    features: Annotated[
        str, typer.Option(help="Feature space: auto | classifier | vae | pixels | 'pkg.mod:fn' (fn(images) -> [n, F]).")
    ] = "auto",
    max_samples: Annotated[int, typer.Option(min=2, help="Evaluate at most this many kept samples.")] = 2000,
    max_references: Annotated[int, typer.Option(min=2, help="Use at most this many references per set.")] = 2000,
    permutations: Annotated[int, typer.Option(min=0, help="Permutations of the MMD² test.")] = 1000,
    kid_subsets: Annotated[int, typer.Option(min=1, help="Random subsets KID is averaged over.")] = 100,
    k: Annotated[int, typer.Option(min=1, help="Neighbours k of precision/recall/density/coverage.")] = 5,
    copy_ratio: Annotated[
        float, typer.Option(min=0.0, help="Near-copy if NN distance < ratio × median reference NN distance.")
    ] = 0.5,
    classifier: Annotated[
        str | None, typer.Option(help="'pkg.mod:fn' with fn(images) -> logits over the run's classes.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the subsets and permutations.")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | ... (feature extractors).")] = "auto",
    out: Annotated[Path | None, typer.Option(help="Where eval.json and report.html go (default: the run).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="Print only the output paths.")] = False,
) -> None:
    """Evaluate a finished run: MMD²/KID/FD/precision-recall to held-out references, memorisation, class
    accuracy and filter scores; writes eval.json and a self-contained report.html."""
    from storage.errors import InputError

    from .run_eval import evaluate_run

    logging.basicConfig(
        level=logging.ERROR if quiet else logging.WARNING, stream=sys.stderr, format="warning: %(message)s"
    )
    try:
        result = evaluate_run(
            run,
            heldout=heldout,
            features=features,
            max_samples=max_samples,
            seed=seed,
            max_references=max_references,
            n_permutations=permutations,
            kid_subsets=kid_subsets,
            k=k,
            copy_ratio=copy_ratio,
            classifier=classifier,
            device=device,
            out_dir=out,
        )
    except (InputError, ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    target = out if out is not None else run
    if not quiet:
        for line in summary_lines(result):
            typer.echo(line)
    typer.echo(f"eval.json: {target / 'eval.json'}  report: {target / 'report.html'}")
