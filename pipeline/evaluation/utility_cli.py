"""`augment utility RUN --real DIR`: what the synthetic data is worth to a downstream classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def utility_command(
    run: Annotated[Path, typer.Argument(help="A labelled `augment` run (output folder).")],
    real: Annotated[Path, typer.Option(help="Real labelled images (class sub-folders).")],
    real_test: Annotated[
        Path | None, typer.Option(help="Held-out real images (default: a stratified part of --real).")
    ] = None,
    unguided_run: Annotated[
        Path | None, typer.Option(help="A `--guidance none` run of the same settings, for arm (d).")
    ] = None,
    test_fraction: Annotated[float, typer.Option(help="Part of --real held out when --real-test is absent.")] = 0.4,
    seeds: Annotated[int, typer.Option(help="Training seeds per arm.")] = 3,
    steps: Annotated[
        int | None, typer.Option(help="Training steps per classifier (default: the converged judge's).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Use at most this many synthetic samples.")] = None,
    recipe: Annotated[
        str,
        typer.Option(
            help="How the samples join the real images in arms (b) and (d): mix, balanced, finetune, pretrain."
        ),
    ] = "mix",
    affine: Annotated[
        str, typer.Option(help="Random-affine augmentation of: none, real (the real images), all (real and synthetic).")
    ] = "none",
    anchors: Annotated[
        Path | None,
        typer.Option(
            help="More real labelled images (class sub-folders, not the test images): also report the judge's "
            "anchors (real alone, real + augmentation, real + these), its flags, and each arm against them."
        ),
    ] = None,
) -> None:
    """Train one small classifier per arm — (a) real, (b) real + synthetic, (c) synthetic, (d) real +
    unguided — and report held-out accuracy; writes RUN/utility.json and adds the tables to the run's
    eval.json and report.html when `augment eval` has run (a later `augment eval` picks utility.json up).
    The classifier is the converged judge (`pipeline.evaluation.utility.JUDGE`); `--anchors DIR` checks that
    it can tell data from none on this target (augmentation must help, more real data more) and reports
    arm (b) relative to those anchors (points over real alone and over real + augmentation, share of the gap
    to the oracle closed)."""
    from storage.atomic import atomic_write_json
    from storage.errors import InputError
    from storage.eval_io import (
        EVAL_FILE,
        UTILITY_FILE,
        read_optional_json,
        read_report_html,
        write_eval_json,
        write_report_html,
    )

    from .report import with_utility_section
    from .utility import format_table, utility_eval

    try:
        result = utility_eval(
            run,
            real,
            unguided_run=unguided_run,
            real_test=real_test,
            test_fraction=test_fraction,
            seeds=seeds,
            steps=steps,
            limit=limit,
            recipe=recipe,
            affine=affine,
            anchors_real=anchors,
        )
        record = read_optional_json(run / EVAL_FILE)
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    atomic_write_json(run / UTILITY_FILE, result)
    if record is not None:  # an earlier `augment eval`: add the tables to its eval.json and report.html
        record["utility"] = result
        write_eval_json(run, record)
        report = read_report_html(run)
        if report is not None:
            write_report_html(run, with_utility_section(report, result))
    typer.echo(format_table(result))
