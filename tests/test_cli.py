"""The CLI is generated from `AugmentConfig`: every field is a flag (or config-file-only on purpose), every
value round-trips flag -> config -> run.json, every choice runs `--dry-run`, every input error is one line
with exit code 2 and nothing written."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
from tiny_models import save_tiny_dit, write_reference_folder
from typer.testing import CliRunner

import pipeline.jobs.job
from flows.cli import app
from pipeline.cli.commands import EXAMPLE_REFS
from pipeline.cli.options import flag, flag_fields
from pipeline.config import CONFIG_FILE_ONLY, AugmentConfig

#: A value for every field that differs from its default, as typed on the command line (test data:
#: a field added to AugmentConfig without an entry here fails `test_every_field_has_a_test_value`).
CLI_VALUES = {
    "ref": None,  # the example references
    "out": None,  # a temporary folder
    "n": "6",
    "model": "shipped",  # the shipped prior by name (it has the Internal-Guidance head --ig-scale needs)
    "prefix": "rt",
    "seed": "3",
    "holdout": "0.25",
    "cache_dir": None,  # a temporary folder
    "sampler": "ddpm",
    "steps": "3",
    "eta": "0.5",
    "batch_size": "4",
    "cfg_scale": "1.5",
    "prompt": "a chest x-ray",  # text-to-image models only (TEXT_MODEL_ONLY)
    "negative_prompt": "blurry",
    "class_prompt": "a photo of a {}",
    "resolution": "64",
    "ig_scale": "1.25",
    "ig_interval": "0.2,0.8",
    "guidance": "posterior",
    "lookahead_steps": "1",
    "kernel": "rbf-multi",
    "bandwidth_factors": "0.75,1.5",
    "rff_features": "32",
    "strength": "0.02",
    "schedule": "linear_decay",
    "schedule_start": "0.1",
    "schedule_end": "0.9",
    "normalization": "batch",
    "attraction_floor": "0.5",
    "memory": "3",
    "class_aware": False,
    "coupling": "sequential",
    "class_balance": "uniform",
    "pseudo_classes": False,
    "pseudo_labels": True,
    "pilot_samples": "16",
    "pilot_holdout": "0.4",
    "pilot_start": "0.005",
    "pilot_max_strength": "0.08",
    "pilot_budget": "0.1",
    "pilot_factor": "4.0",
    "pilot_rule": "weakest",
    "pilot_bootstrap": "50",
    "keep": "0.75",
    "support_radius": "4.5",
    "reserve": "0.5",
    "label_filter": "True",
    "shard_size": "4",
    "save_latents": True,
    "keep_rejected": True,
    "reach_check": False,
    "reach_samples": "16",
    "reach_steps": "4",
    "reach_refuse_share": "0.02",
    "reach_warn_share": "0.3",
    "force": True,
    "offload": True,
    "device": "cpu",
    "dtype": "float32",
    "processes": "2",
    "progress": "quiet",
    "allow_shortfall": True,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-cli")
    return {
        "root": root,
        "dit": str(save_tiny_dit(root / "dit")),
        "refs": str(write_reference_folder(root / "refs", classes=("a", "b"))),
        "cache": str(root / "cache"),
    }


def cli_args(values: dict[str, object]) -> list[str]:
    args: list[str] = []
    for name, value in values.items():
        if isinstance(value, bool):
            args.append(flag(name) if value else "--no-" + flag(name)[2:])
        else:
            args += [flag(name), str(value)]
    return args


#: Settings only a text-to-image model takes (the shipped prior refuses them; tests/test_families.py runs them).
TEXT_MODEL_ONLY = frozenset({"prompt", "negative_prompt", "class_prompt", "resolution"})


def full_values(tiny, out: Path, *, text_model: bool = True) -> dict[str, object]:
    paths = {"ref": str(EXAMPLE_REFS), "out": str(out), "cache_dir": tiny["cache"]}
    skip = () if text_model else TEXT_MODEL_ONLY
    return {name: paths.get(name, value) for name, value in CLI_VALUES.items() if name not in skip}


def invoke(args: list[str]):
    return CliRunner().invoke(app, args)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the job loads a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline.jobs.job, "load_model", refuse)


def test_every_field_has_a_flag_or_is_config_file_only_and_a_description():
    fields = AugmentConfig.model_fields
    assert set(flag_fields()) == set(fields) - CONFIG_FILE_ONLY
    for command in ([], ["flow"]):
        result = invoke([*command, "--help"])
        assert result.exit_code == 0
        text = " ".join(result.output.split())
        for name in flag_fields():
            assert f"{flag(name)} " in text or f"{flag(name)}/" in text, (command, name)
    assert [name for name, field in fields.items() if not field.description] == []
    help_text = " ".join(invoke(["--help"]).output.split())
    assert "[none|latent|posterior|lookahead|noisy]" in help_text  # choices from the Literal
    assert "--strength FLOAT|auto" in help_text and "[default: auto]" in help_text and "--eta FLOAT" in help_text


def test_every_field_has_a_test_value():
    assert set(CLI_VALUES) == set(AugmentConfig.model_fields)
    defaults = AugmentConfig(ref="r", out="o", n=1)
    for name, value in CLI_VALUES.items():
        if value is not None:
            parsed = AugmentConfig(**{"ref": "r", "out": "o", "n": 1, **_as_config_input(name, value)})
            assert getattr(parsed, name) != getattr(defaults, name), name


def _as_config_input(name: str, value: object) -> dict[str, object]:
    if isinstance(value, str) and "," in value:
        return {name: value.split(",")}
    return {name: value}


def test_every_flag_reaches_the_config(tiny, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("pipeline.cli.commands.dry_run", seen.append)
    values = full_values(tiny, tmp_path / "out")
    result = invoke([*cli_args(values), "--dry-run"])
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    expected = AugmentConfig(**{k: v for name, val in values.items() for k, v in _as_config_input(name, val).items()})
    assert cfg == expected
    for name, value in values.items():  # and each one is the value typed, not a default
        typed = getattr(cfg, name)
        assert str(value) in (str(typed), ",".join(f"{v:g}" for v in typed) if isinstance(typed, tuple) else ""), name


@pytest.mark.slow
def test_every_field_round_trips_flag_config_run_json(tiny, tmp_path):
    """All settings differ from their defaults at once, and run.json holds each of them."""
    out = tmp_path / "out"
    values = full_values(tiny, out, text_model=False)  # the shipped prior: --ig-scale needs its head
    result = invoke(cli_args(values))
    assert result.exit_code == 0, (result.output, result.exception)
    record = json.loads((out / "run.json").read_text())
    cfg = AugmentConfig.model_validate(record["config"])
    assert cfg == AugmentConfig(**{k: v for n, val in values.items() for k, v in _as_config_input(n, val).items()})
    assert set(record["config"]) == set(AugmentConfig.model_fields)
    assert record["config_hash"] == cfg.config_hash


LITERAL_CHOICES = [
    (name, choice)
    for name, field in AugmentConfig.model_fields.items()
    for member in (typing.get_args(field.annotation) or (field.annotation,))
    if typing.get_origin(member) is typing.Literal or typing.get_origin(field.annotation) is typing.Literal
    for choice in typing.get_args(member if typing.get_origin(member) is typing.Literal else field.annotation)
]


def test_literal_choices_are_listed():
    names = {name for name, _ in LITERAL_CHOICES}
    assert {"guidance", "sampler", "kernel", "schedule", "normalization", "dtype", "progress"} <= names
    assert ("guidance", "noisy") in LITERAL_CHOICES


@pytest.mark.parametrize("name, choice", LITERAL_CHOICES)
def test_every_choice_of_every_literal_field_dry_runs(tiny, tmp_path, no_model_loading, name, choice):
    out = tmp_path / "out"
    result = invoke(["--ref", tiny["refs"], "--n", "16", "--out", str(out), flag(name), str(choice), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "estimated time" in result.output and "config hash" in result.output
    assert not out.exists()


def test_none_sets_an_optional_field_to_none_over_a_config_file(tiny, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("pipeline.cli.commands.dry_run", seen.append)
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"ref": tiny["refs"], "n": 4, "out": str(tmp_path / "o"), "lookahead_steps": 3}))
    assert invoke(["--config", str(config), "--dry-run"]).exit_code == 0
    assert invoke(["--config", str(config), "--lookahead-steps", "none", "--dry-run"]).exit_code == 0
    assert [cfg.lookahead_steps for cfg in seen] == [3, None]
    assert "--lookahead-steps INTEGER|none" in " ".join(invoke(["--help"]).output.split())


def test_bare_augment_prints_the_help():
    result = invoke([])
    assert result.exit_code == 0 and "--ref" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n", "16", "--out", "{out}"], "error: invalid settings: --ref: missing"),
        (["--ref", "{refs}", "--n", "16", "--out", "{out}", "--strength", "nan"], "--strength nan: not a number"),
        (["--ref", "{refs}", "--n", "16", "--out", "{out}", "--strength", "inf"], "--strength inf: not a finite"),
        (["--ref", "{refs}", "--n", "0", "--out", "{out}"], "--n 0: Input should be greater than or equal to 1"),
        (["--ref", "{refs}", "--n", "x", "--out", "{out}"], "--n x: Input should be a valid integer"),
        (["--ref", "{refs}", "--n", "4", "--out", "{out}", "--guidance", "nope"], "--guidance nope: Input should be"),
        (["--ref", "{refs}", "--n", "4", "--out", "{out}", "--ig-interval", "0.9,0.1"], "ig_interval must satisfy"),
        (["--ref", "{missing}", "--n", "4", "--out", "{out}"], "reference folder does not exist"),
        (["--ref", "{missing}", "--n", "4", "--out", "{out}", "--dry-run"], "reference folder does not exist"),
        (["--config", "{config}"], "must hold an object of settings"),
        (["flow", "--n", "16", "--out", "{out}"], "error: invalid settings: --ref: missing"),
        (["flow", "--ref", "{missing}", "--n", "4", "--out", "{out}"], "reference folder does not exist"),
    ],
)
def test_input_errors_are_one_line_exit_2_and_write_nothing(tiny, tmp_path, no_model_loading, args, message):
    config = tmp_path / "job.json"
    config.write_text("[1, 2, 3]")
    out = tmp_path / "out"
    places = {"out": str(out), "refs": tiny["refs"], "missing": str(tmp_path / "nope"), "config": str(config)}
    result = invoke([a.format(**places) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not out.exists()


def test_input_errors_under_progress_json_are_json_lines(tiny, tmp_path, no_model_loading):
    result = invoke(["--ref", str(tmp_path / "nope"), "--n", "4", "--out", str(tmp_path / "o"), "--progress", "json"])
    assert result.exit_code == 2
    events = [json.loads(line) for line in result.output.strip().splitlines()]
    assert events[-1]["event"] == "error" and "reference folder does not exist" in events[-1]["message"]


def test_bad_references_are_reported_before_the_model_is_loaded(tiny, tmp_path, no_model_loading):
    refs = write_reference_folder(tmp_path / "refs", count=12)
    (refs / "broken.png").write_bytes(b"not a png")
    result = invoke(["--ref", str(refs), "--n", "4", "--out", str(tmp_path / "o"), "--model", tiny["dit"]])
    assert result.exit_code == 2 and "broken.png" in result.output and "model was loaded" not in result.output


def test_dry_run_estimate_is_total_over_the_guidance_methods():
    from pipeline.cli.commands import seconds_per_sample_estimate
    from pipeline.config import GuidanceName

    base = AugmentConfig(ref="r", out="o", n=1, steps=50, cfg_scale=1.0)
    costs = {
        g: seconds_per_sample_estimate(base.model_copy(update={"guidance": g})) for g in typing.get_args(GuidanceName)
    }
    assert costs["none"] == pytest.approx(0.086) and costs["latent"] == costs["noisy"] == costs["none"]
    assert costs["posterior"] == pytest.approx(3 * costs["none"])  # one forward + one backward pass
    assert costs["lookahead"] > costs["posterior"]
    with_cfg = seconds_per_sample_estimate(base.model_copy(update={"cfg_scale": 2.0}))
    assert with_cfg == pytest.approx(2 * costs["latent"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_the_shipped_prior_prints_no_warning(capfd, caplog, dtype):
    """The dtype is given at load (diffusers keeps float32 modules), not cast after it: no 'modules in
    AutoencoderKL that should be kept in float32' line before every run (it broke `--progress json`)."""
    import logging

    import torch

    from pipeline.models.loading import load_model

    with caplog.at_level(logging.WARNING):
        model = load_model(None, "cpu", dtype)
    assert model.vae.dtype == getattr(torch, dtype)
    printed = capfd.readouterr().err + caplog.text  # diffusers logs to stderr, or to the root logger
    assert "should be kept in float32" not in printed and "WARNING" not in printed, printed
