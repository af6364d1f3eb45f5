"""The `augment` entry point: the pipeline's commands plus `augment flow`, the job as a Prefect flow run.

This module is the one place the app is put together (`make_app`): `pipeline.cli` builds the
pipeline's commands and knows nothing of Prefect; this adds the `flow` sub-command. Prefect is
imported only when the sub-command runs, so `augment` itself starts fast and works without a Prefect
server. The sub-command takes every option of `augment` (same names, same meaning, same config
file, generated from `AugmentConfig`), plus the flow's own knobs:

    augment flow --ref ./xray_samples --n 100000 --out ./synthetic [--shards-per-task 4]

Options given before the sub-command (`augment --ref R --n 8 --out O flow`) count as well. With
`PREFECT_API_URL` set, the run shows up on that server (UI); otherwise Prefect starts a temporary
local server for the duration of the run.
"""

from __future__ import annotations

from typing import Any

import typer

from pipeline import cli as pipeline_cli
from pipeline.cli.options import keyword_option


def run_flow(cfg, shards_per_task: int | None = None, per_run_output: bool = False) -> dict[str, Any]:
    """Run the `augment` flow for this config (a flow run on the configured Prefect API) and print
    the same summary lines as the plain CLI."""
    from flows.augment_flow import augment

    result = augment(config=cfg, shards_per_task=shards_per_task, per_run_output=per_run_output)
    for line in pipeline_cli.summary_lines(result, how=", Prefect flow run"):
        typer.echo(line)
    return result


def flow_command(ctx: typer.Context, **values: Any) -> None:
    """Run the job as a Prefect flow run (same options and samples as `augment`; retries, caching, UI).
    Uses PREFECT_API_URL, or a temporary local server. Same exit codes as `augment`: a run that kept
    fewer than --n ends Failed and exits 3 (unless --allow-shortfall)."""
    from dataclasses import asdict

    from pipeline.checks.reference import check_references
    from pipeline.jobs.summary import FinishedShort
    from storage.errors import InputError

    shards_per_task = values.pop("shards_per_task")
    per_run_output = values.pop("per_run_output")
    # options given before the sub-command (`augment --ref R flow`) fill what was not given after it
    parent = ctx.parent.params if ctx.parent is not None else {}
    for name, value in parent.items():
        if name in values and values[name] is None:
            values[name] = value
    config_file = values.pop("config")
    if config_file is None and all(v is None for v in values.values()):
        pipeline_cli.fail("give --ref/--n/--out (or --config FILE) for the flow run")
    cfg = pipeline_cli.build_config(config_file, values)
    try:
        check_references(cfg)  # before a Prefect server starts or a model loads: input errors come first
        run_flow(cfg, shards_per_task=shards_per_task, per_run_output=per_run_output)
    except InputError as exc:
        pipeline_cli.fail(str(exc), as_json=cfg.progress == "json")
    except FinishedShort as exc:  # the flow run wrote what it kept, then ended Failed
        for line in pipeline_cli.summary_lines(asdict(exc.summary), how=", Prefect flow run"):
            typer.echo(line)
        pipeline_cli.fail(str(exc), pipeline_cli.EXIT_FINISHED_SHORT, as_json=cfg.progress == "json")


flow_command.__signature__ = pipeline_cli.job_command_signature(  # type: ignore[attr-defined]
    keyword_option(
        "shards_per_task",
        int | None,
        None,
        help="Shards per Prefect task (the unit of retry); default 1, or all with K workers.",
    ),
    keyword_option("per_run_output", bool, False, "--per-run-output", help="Write into <out>/<run start time, UTC>."),
)


def make_app() -> typer.Typer:
    """The whole `augment` app: the pipeline's commands and `flow`."""
    app = pipeline_cli.make_app()
    app.command("flow", epilog=pipeline_cli.EXIT_CODES_EPILOG)(flow_command)
    return app


app = make_app()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
