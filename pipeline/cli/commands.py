"""`augment`'s commands: the job (the app's callback), `demo`, `eval` and `utility`; a thin shell over
`pipeline.jobs.job`.

The job's options are generated from `AugmentConfig` (`pipeline.cli.options`). The `augment` entry point
is `flows.cli:main`, which adds the Prefect sub-command `flow` to the app `make_app` builds here (this
package imports neither `flows` nor Prefect). `python -m pipeline.cli` runs everything but `flow`.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError

from .. import __version__
from ..config import AugmentConfig
from ..jobs.exit_codes import EXIT_BAD_INPUT, EXIT_CODES, EXIT_FINISHED_SHORT  # README, "Exit codes"
from .options import config_values, describe_errors, keyword_option, option_parameters

EXAMPLE_REFS = Path(__file__).resolve().parents[2] / "examples" / "thick_digits"

APP_HELP = (
    "Generate synthetic training data that follows a small reference sample, with MMD-guided diffusion.\n\n"
    "  augment --ref ./xray_samples --n 100000 --out ./synthetic"
)

#: The help's closing paragraph (`\b`: printed as written, not re-wrapped).
EXIT_CODES_EPILOG = "\b\nExit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())

#: Seconds per sample and step of the shipped prior, unguided: 86 ms per sample at 50 DDIM steps
#: (model card, 2-core CPU).
SECONDS_PER_SAMPLE_STEP = 0.086 / 50


def fail(message: str, code: int = EXIT_BAD_INPUT, *, as_json: bool = False) -> NoReturn:
    """Print one line naming the problem on stderr (`error: ...`, or a JSON event line with the exit code
    under `--progress json`) and exit with `code` (`EXIT_CODES`; default 2: bad input or settings)."""
    if as_json:
        typer.echo(json.dumps({"event": "error", "message": message, "exit_code": code}), err=True)
    else:
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def setup_logging(progress: str) -> None:
    """Log to stderr: INFO (WARNING under quiet), as JSON lines under `--progress json` (warnings too)."""
    level = logging.WARNING if progress == "quiet" else logging.INFO
    logging.captureWarnings(True)
    if progress == "json":
        logging.basicConfig(level=level, stream=sys.stderr, format="%(message)s")
        for handler in logging.getLogger().handlers:
            handler.setFormatter(_JsonFormatter())
    else:
        logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"level": record.levelname, "logger": record.name, "message": record.getMessage()})


def build_config(config_file: Path | None, values: dict[str, Any]) -> AugmentConfig:
    """The validated config from an optional file plus the flags that were given (None = not given)."""
    given = config_values(values)
    try:
        if config_file is not None:
            return AugmentConfig.from_file(config_file, **given)
        return AugmentConfig(**given)
    except ValidationError as exc:
        fail(f"invalid settings: {describe_errors(exc)}")
    except (OSError, ValueError) as exc:
        fail(f"--config {config_file}: {exc}")


def seconds_per_sample_estimate(cfg: AugmentConfig) -> float:
    """Rough seconds per generated sample of the shipped prior on a 2-core CPU: steps × the guidance
    method's denoiser cost per step (`guidance.denoiser_cost`) × 2 with classifier-free guidance."""
    from guidance import denoiser_cost, make_guidance_method

    method = None if cfg.guidance == "none" else make_guidance_method(cfg.guidance, lookahead_steps=cfg.lookahead_steps)
    cfg_factor = 2 if cfg.cfg_scale != 1 else 1  # auto: 2 on the shipped prior
    return SECONDS_PER_SAMPLE_STEP * cfg.steps * denoiser_cost(method, cfg.steps) * cfg_factor


def summary_lines(result: dict[str, Any], how: str = "") -> list[str]:
    """The closing lines of a run (counts, time, MMD² of pool and kept set) from a job summary's fields."""
    lines = [
        f"kept {result['num_kept']} of {result['num_generated']} samples in {result['out']} "
        f"({result['shards_written']} shard(s) written, {result['shards_skipped']} already done; "
        f"{result['seconds']['total']:.1f} s{how})"
    ]
    if result.get("mmd2_pool") is not None:
        lines.append(
            f"MMD² to references (latent space, mean over shards): pool {result['mmd2_pool']:.4f}, "
            f"kept {result['mmd2_kept']:.4f}"
        )
    return lines


def dry_run(cfg: AugmentConfig) -> None:
    """Every check the run makes before it loads the model (`Run.preflight`: the references at the model's
    size, `--out`, a changed setting), the references' warnings, and the plan; nothing is loaded or written."""
    from storage.errors import InputError

    from ..checks.pilot import describe_pilot
    from ..checks.pseudo import describe_pseudo
    from ..checks.reference import listed_bundle, split_holdout
    from ..jobs.job import Run
    from ..plan import plan_job

    try:
        refs = Run(cfg).preflight()
        bundle = split_holdout(listed_bundle(refs), cfg.holdout, cfg.seed)  # what the job guides with
    except InputError as exc:
        fail(str(exc), as_json=cfg.progress == "json")
    typer.echo(f"references: {len(refs)} images, {refs.source}")
    for line in refs.report:
        typer.echo(f"{'warning' if line in refs.warnings else 'references'}: {line}")
    pseudo = describe_pseudo(cfg, labelled=refs.labels is not None)
    if pseudo is not None:
        typer.echo(pseudo)
    typer.echo(plan_job(cfg).describe(seconds_per_sample=seconds_per_sample_estimate(cfg)))
    typer.echo(describe_pilot(cfg, bundle))
    if cfg.reach_check:
        typer.echo(
            f"reach check: at the start, {cfg.reach_samples} unguided samples at {min(cfg.steps, cfg.reach_steps)} "
            "steps are compared with the references and the job stops (exit 2) if the model cannot draw them "
            "(--dry-run --check-reach runs it now; --no-reach-check skips it)"
        )
    else:
        typer.echo("reach check: off (--no-reach-check)")
    typer.echo(f"config hash {cfg.config_hash}; output {cfg.out}")


def dry_run_reach(cfg: AugmentConfig) -> None:
    """`--dry-run --check-reach`: load the model, encode the references (into the cache, as the job does) and
    run the reach check now; one line and exit 2 when the model cannot draw them (unless --force)."""
    from storage.errors import InputError

    from ..checks.reach import shares_text
    from ..jobs.job import build_context

    try:
        record = build_context(cfg, check_reach=True, pilot=False).reach
    except InputError as exc:
        fail(str(exc), as_json=cfg.progress == "json")
    if record["verdict"] == "off":
        typer.echo("reach check: off (--no-reach-check)")
        return
    forced = " (going on: --force)" if record["verdict"] == "nil" else ""
    typer.echo(
        f"reach check: {record['verdict']}{forced}: the model draws {record['model']}; {shares_text(record)} "
        f"({record['seconds']:.1f} s)"
    )


def execute(cfg: AugmentConfig) -> None:
    """Run the job with a progress bar / quiet / JSON logs; input errors end as one line, exit 2; a run
    that kept fewer than --n prints its summary, then one line, exit 3 (unless --allow-shortfall)."""
    import torch

    from storage.errors import InputError

    from ..jobs.job import run_job
    from ..jobs.summary import FinishedShort, check_delivered

    bars = []  # the progress bar, opened at the first tick: after the inputs are checked

    def tick(count: int) -> None:
        if not bars:
            from tqdm.auto import tqdm

            bars.append(tqdm(total=cfg.n, unit="sample", desc="kept", dynamic_ncols=True))
        bars[0].update(count)

    def on_shard(result) -> None:
        if cfg.progress == "json":
            print(json.dumps({"event": "shard_done", **result.__dict__}), file=sys.stderr, flush=True)

    as_json = cfg.progress == "json"
    try:
        summary = run_job(cfg, progress=tick if cfg.progress == "bar" else None, on_shard=on_shard)
    except InputError as exc:
        fail(str(exc), as_json=as_json)
    except torch.OutOfMemoryError:
        fail(
            f"out of memory at --batch-size {cfg.batch_size} on {cfg.device}: lower --batch-size, add --offload (the "
            "model's parts on the GPU only while they run) or use --dtype float16/bfloat16 on a GPU; rerun the same "
            "command to resume",
            as_json=as_json,
        )
    finally:
        for bar in bars:
            bar.close()
    for line in summary_lines(summary.__dict__):
        typer.echo(line)
    try:
        check_delivered(cfg, summary)
    except FinishedShort as exc:
        fail(str(exc), EXIT_FINISHED_SHORT, as_json=as_json)


def job_command_signature(*extra: inspect.Parameter) -> inspect.Signature:
    """The signature of a command that takes the job's options (`augment`, `augment flow`): the typer
    context, `--config FILE`, one option per config field, then `extra`."""
    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    config = keyword_option("config", Path | None, None, help="JSON/TOML config file; flags override it.")
    return inspect.Signature([context, config, *option_parameters(), *extra])


def augment(ctx: typer.Context, **values: Any) -> None:
    """Run (or resume) the job; options: see `augment --help`."""
    if values.pop("version"):
        typer.echo(f"mmd-augment {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is not None:
        return
    is_dry_run = values.pop("dry_run")
    check_reach_now = values.pop("check_reach")
    config_file = values.pop("config")
    if config_file is None and all(v is None for v in values.values()):
        typer.echo(ctx.get_help())  # bare `augment`: the help
        raise typer.Exit()
    cfg = build_config(config_file, values)
    setup_logging(cfg.progress)
    if check_reach_now and not is_dry_run:
        fail("--check-reach goes with --dry-run (a job runs the reach check at its start unless --no-reach-check)")
    if is_dry_run:
        dry_run(cfg)
        if check_reach_now:
            dry_run_reach(cfg)
    else:
        execute(cfg)


augment.__signature__ = job_command_signature(  # type: ignore[attr-defined]
    keyword_option("dry_run", bool, False, "--dry-run", help="Check the references, print the plan and exit."),
    keyword_option(
        "check_reach",
        bool,
        False,
        "--check-reach",
        help="With --dry-run: also load the model and run the reach check now (seconds; caches the references' "
        "encoding as the job would).",
    ),
    keyword_option("version", bool, False, "--version", help="Print the version and exit."),
)


def demo(
    out: Annotated[str, typer.Option(help="Output folder.")] = "./out/demo",
    n: Annotated[int, typer.Option(help="Samples to keep.")] = 256,
) -> None:
    """Run the job on the shipped example references with the shipped prior."""
    if not EXAMPLE_REFS.is_dir():
        fail(f"{EXAMPLE_REFS}: the example references are missing from this checkout")
    cfg = build_config(None, {"ref": str(EXAMPLE_REFS), "n": n, "out": out, "shard_size": 128})
    setup_logging(cfg.progress)
    execute(cfg)
    typer.echo(f"shards: {out}/shards/  manifest: {out}/manifest.parquet  run record: {out}/run.json")


def make_app() -> typer.Typer:
    """The `augment` app with the pipeline's commands (the entry point `flows.cli` adds `flow`)."""
    from ..evaluation.cli import eval_command  # light: imports its heavy parts lazily
    from ..evaluation.utility_cli import utility_command

    app = typer.Typer(
        add_completion=False,
        no_args_is_help=False,
        invoke_without_command=True,
        help=APP_HELP,
        epilog=EXIT_CODES_EPILOG,
        rich_markup_mode=None,
    )
    app.callback()(augment)
    app.command()(demo)
    app.command("eval")(eval_command)
    app.command("utility")(utility_command)
    return app


app = make_app()
