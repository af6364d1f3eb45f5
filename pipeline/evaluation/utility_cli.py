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
    steps: Annotated[int, typer.Option(help="Training steps per classifier.")] = 600,
    limit: Annotated[int | None, typer.Option(help="Use at most this many synthetic samples.")] = None,
) -> None:
    """Train one small classifier per arm — (a) real, (b) real + synthetic, (c) synthetic, (d) real +
    unguided — and report held-out accuracy; writes RUN/utility.json and adds the tables to the run's
    eval.json and report.html when `augment eval` has run (a later `augment eval` picks utility.json up)."""
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
