"""`augment flow ...`: run the job as a Prefect flow run, with exactly the config the CLI builds.

Wired into the `augment` command by one line at the end of `pipeline/cli.py`:

    from flows.cli import register; register(app)

This module imports Prefect only when the sub-command runs, so `augment` itself starts fast and
works without a Prefect server. The sub-command takes every option of `augment` (same names, same
meaning, same config file), plus the flow's own knobs:

    augment flow --ref ./xray_samples --n 100000 --out ./synthetic [--shards-per-task 4]

Options given before the sub-command (`augment --ref R --n 8 --out O flow`) count as well. With
`PREFECT_API_URL` set, the run shows up on that server (UI); otherwise Prefect starts a temporary
local server for the duration of the run.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any

import typer

#: Options of `augment` that make no sense for the sub-command.
_DROPPED = ("ctx", "version", "dry_run")


def run_flow(cfg, shards_per_task: int | None = None, per_run_output: bool = False) -> dict[str, Any]:
    """Run the `augment` flow for this config (a flow run on the configured Prefect API) and print
    the same summary lines as the plain CLI."""
    from flows.augment_flow import augment

    result = augment(config=cfg, shards_per_task=shards_per_task, per_run_output=per_run_output)
    typer.echo(
        f"kept {result['num_kept']} of {result['num_generated']} samples in {result['out']} "
        f"({result['shards_written']} shard(s) written, {result['shards_skipped']} already done; "
        f"{result['seconds']['total']:.1f} s, Prefect flow run)"
    )
    if result["mmd2_pool"] is not None:
        typer.echo(
            f"MMD² to references (latent space, mean over shards): pool {result['mmd2_pool']:.4f}, "
            f"kept {result['mmd2_kept']:.4f}"
        )
    return result


def register(app: typer.Typer) -> None:
    """Add the `flow` sub-command to the `augment` Typer app (see the module docstring)."""
    from pipeline import cli as base

    signature = inspect.signature(base.augment, eval_str=True)
    base_params = [p for name, p in signature.parameters.items() if name not in _DROPPED]
    extra = [
        inspect.Parameter(
            "ctx",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=typer.Context,
        ),
        inspect.Parameter(
            "shards_per_task",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                int | None,
                typer.Option(help="Shards per Prefect task (the unit of retry); default 1, or all with K workers."),
            ],
        ),
        inspect.Parameter(
            "per_run_output",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[
                bool, typer.Option("--per-run-output", help="Write into <out>/<run start time, UTC>.")
            ],
        ),
    ]
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in base_params] + extra

    def flow_command(**kwargs: Any) -> None:
        ctx: typer.Context = kwargs.pop("ctx")
        shards_per_task = kwargs.pop("shards_per_task")
        per_run_output = kwargs.pop("per_run_output")
        # options given before the sub-command (`augment --ref R flow`) fill what was not given after it
        parent = ctx.parent.params if ctx.parent is not None else {}
        for name, value in parent.items():
            if kwargs.get(name) is None and name in kwargs:
                kwargs[name] = value
        config_file = kwargs.pop("config")
        if kwargs.get("ref") is None and config_file is None:
            base._fail("give --ref/--n/--out (or --config FILE) for the flow run")
        cfg = base.build_config(config_file, kwargs)
        from storage.errors import InputError

        try:
            run_flow(cfg, shards_per_task=shards_per_task, per_run_output=per_run_output)
        except InputError as exc:
            base._fail(str(exc))

    flow_command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    flow_command.__doc__ = (
        "Run the job as a Prefect flow run (same options and samples as `augment`; "
        "retries, caching, UI). Uses PREFECT_API_URL, or a temporary local server."
    )
    app.command("flow")(flow_command)
