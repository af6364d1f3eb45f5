"""Every text-to-image family end to end through `augment`, with prompts, class prompts and captions.

Tiny random pipelines of each family (`tiny_families`, saved from configs, offline). A random model draws
nothing in particular, so these tests check the plumbing and the steering, not the pictures: the prompt
reaches the model (another prompt, other images), every sample carries its prompt (json, manifest, `.txt`),
CFG's negative branch acts, class prompts and captions drive both the model and the product kernel, resume
is byte-identical, and what the job cannot drive is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image
from tiny_families import FAMILIES, save_tiny_pipeline
from tiny_models import TINY_SUPPORT_RADIUS, shard_bytes, write_reference_folder
from typer.testing import CliRunner

from flows.cli import app
from guidance import DeltaKernel, EmbeddingKernel, ProductKernel
from pipeline.config import AugmentConfig
from pipeline.jobs.job import build_context, run_job
from pipeline.models.loading import load_model

#: Sana's pipeline wants multiples of 32 pixels (its tiny DC-AE has scale factor 4); the others 16x16.
RESOLUTION = {"sana": 32}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    models = {family: str(save_tiny_pipeline(family, root / family)) for family in FAMILIES}
    settings = root / "tiny.json"  # random models draw far from any reference: keep every sample
    settings.write_text(json.dumps({"support_radius": TINY_SUPPORT_RADIUS}))
    return {
        "root": root,
        "models": models,
        "refs": str(write_reference_folder(root / "refs", count=12, size=16)),
        "classes": str(write_reference_folder(root / "classes", count=12, size=16, classes=("cat", "dog", "fox"))),
        "captioned": str(_captioned_references(root / "captioned")),
        "settings": str(settings),
        "cache": str(root / "cache"),
    }


def _captioned_references(root: Path, count: int = 16) -> Path:
    """Two groups of RGB references that differ (red or blue), captioned in a Hugging Face `metadata.jsonl`."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    rows = []
    for i in range(count):
        caption = ("a red square", "a blue square")[i % 2]
        arr = (rng.random((16, 16, 3)) * 60).astype(np.uint8)
        arr[..., 0 if "red" in caption else 2] += 190
        Image.fromarray(arr, mode="RGB").save(root / f"img_{i:03d}.png")
        rows.append(json.dumps({"file_name": f"img_{i:03d}.png", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def augment(world, family: str, out: Path, *extra: str, ref: str | None = None, n: int = 6):
    args = ["--ref", ref or world["refs"], "--n", str(n), "--out", str(out), "--model", world["models"][family]]
    args += ["--steps", "3", "--shard-size", "6", "--batch-size", "6", "--strength", "0.1", "--no-reach-check"]
    args += ["--resolution", str(RESOLUTION.get(family, 16)), "--cache-dir", world["cache"], "--progress", "quiet"]
    args += ["--config", world["settings"], *extra]
    return CliRunner().invoke(app, args)


def samples(out: Path) -> list[dict]:
    found = []
    for tar in sorted((out / "shards").glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            found.append({"txt": sample["txt"].decode(), "json": json.loads(sample["json"]), "png": sample["png"]})
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_with_a_prompt_and_writes_it_with_every_sample(world, family, tmp_path):
    red, blue = tmp_path / "red", tmp_path / "blue"
    result = augment(world, family, red, "--prompt", "a red square")
    assert result.exit_code == 0, (result.output, result.exception)
    kept = samples(red)
    assert len(kept) == 6
    assert {s["txt"] for s in kept} == {s["json"]["prompt"] for s in kept} == {"a red square"}
    manifest = pq.read_table(red / "manifest.parquet")
    assert set(manifest["prompt"].to_pylist()) == {"a red square"}
    record = json.loads((red / "run.json").read_text())
    assert record["model"]["family"] == ("sd" if family in ("sd1", "sd2") else family)
    assert record["prompts"]["source"] == "prompt"
    assert augment(world, family, blue, "--prompt", "a blue square").exit_code == 0
    assert [s["png"] for s in samples(blue)] != [s["png"] for s in kept]  # the prompt reaches the model


def test_sd2_is_v_prediction_and_flow_models_keep_their_own_scheduler(world):
    assert load_model(world["models"]["sd2"], "cpu").denoiser.prediction_type == "v_prediction"
    for family, scheduler in [("sd3", "FlowMatchEuler"), ("flux", "FlowMatchEuler"), ("sana", "DPMSolverMultistep")]:
        model = load_model(world["models"][family], "cpu", resolution=RESOLUTION.get(family, 16))
        assert model.flow_matching and type(model.scheduler).__name__.startswith(scheduler)


def test_cfg_with_a_negative_prompt_differs_from_cfg_without(world, tmp_path):
    plain = augment(world, "sd1", tmp_path / "plain", "--prompt", "red", "--cfg-scale", "7.5")
    negative = augment(
        world, "sd1", tmp_path / "neg", "--prompt", "red", "--cfg-scale", "7.5", "--negative-prompt", "blue"
    )
    off = augment(world, "sd1", tmp_path / "off", "--prompt", "red", "--cfg-scale", "1")
    assert plain.exit_code == negative.exit_code == off.exit_code == 0
    pngs = {name: [s["png"] for s in samples(tmp_path / name)] for name in ("plain", "neg", "off")}
    assert pngs["plain"] != pngs["neg"] and pngs["plain"] != pngs["off"]
    meta = samples(tmp_path / "plain")[0]["json"]["guidance"]
    assert meta["cfg_scale"] == 7.5


def test_cfg_auto_is_the_familys_scale_and_flux_gets_it_as_its_guidance_input(world, tmp_path):
    assert augment(world, "sdxl", tmp_path / "xl", "--prompt", "red").exit_code == 0
    assert samples(tmp_path / "xl")[0]["json"]["guidance"]["cfg_scale"] == 5.0
    auto = augment(world, "flux", tmp_path / "auto", "--prompt", "red")
    other = augment(world, "flux", tmp_path / "other", "--prompt", "red", "--cfg-scale", "6")
    assert auto.exit_code == other.exit_code == 0
    assert samples(tmp_path / "auto")[0]["json"]["guidance"]["cfg_scale"] == 3.5
    assert [s["png"] for s in samples(tmp_path / "auto")] != [s["png"] for s in samples(tmp_path / "other")]


def test_class_prompts_drive_the_model_and_the_class_kernel_with_one_encoding_per_prompt(world, tmp_path):
    cfg = AugmentConfig(
        ref=world["classes"],
        out=str(tmp_path / "out"),
        n=24,
        model=world["models"]["sd1"],
        class_prompt="a photo of a {}",
        steps=2,
        shard_size=12,
        batch_size=6,
        strength=0.1,
        reach_check=False,
        resolution=16,
        support_radius=TINY_SUPPORT_RADIUS,
        cache_dir=world["cache"],
        progress="quiet",
    )
    model = load_model(cfg.model, "cpu", resolution=16)
    ctx = build_context(cfg, model)
    assert isinstance(ctx.target.kernel, ProductKernel)
    assert isinstance(ctx.target.kernel.condition_kernel, DeltaKernel)
    run_job(cfg, model=model)
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert {r["prompt"] for r in rows} == {f"a photo of a {c}" for c in ("cat", "dog", "fox")}
    assert all(r["prompt"] == f"a photo of a {r['class_name']}" for r in rows)
    assert {s["txt"] for s in samples(tmp_path / "out")} == {f"a photo of a {c}" for c in ("cat", "dog", "fox")}
    # 3 class prompts and the empty negative prompt (CFG 7.5): each encoded once for 24+ samples
    assert model.denoiser.encodings == 4


def test_captions_drive_the_prompts_in_proportion_and_steer_samples_to_their_group(world, tmp_path):
    cfg = AugmentConfig(
        ref=world["captioned"],
        out=str(tmp_path / "out"),
        n=24,
        model=world["models"]["sd1"],
        steps=10,  # unguided, these random samples are far from every reference (kernel 0.000 to both groups)
        shard_size=24,
        batch_size=24,
        strength=0.3,
        cfg_scale=1.0,
        reach_check=False,
        resolution=16,
        support_radius=TINY_SUPPORT_RADIUS,
        cache_dir=world["cache"],
        progress="quiet",
        save_latents=True,
        keep=1.0,
    )
    model = load_model(cfg.model, "cpu", resolution=16)
    ctx = build_context(cfg, model)
    kernel = ctx.target.kernel
    assert isinstance(kernel, ProductKernel) and isinstance(kernel.condition_kernel, EmbeddingKernel)
    run_job(cfg, model=model)
    kept = samples(tmp_path / "out")
    prompts = [s["txt"] for s in kept]
    assert set(prompts) == {"a red square", "a blue square"} and 6 <= prompts.count("a red square") <= 18
    latents = torch.stack([torch.from_numpy(_latent(tmp_path / "out", s["json"]["key"])) for s in kept]).flatten(1)
    refs = ctx.bundle.latents.flatten(1)
    groups = {c: torch.tensor([cap == c for cap in ctx.bundle.captions]) for c in ("a red square", "a blue square")}
    sample_kernel = kernel.sample_kernel
    for caption, other in (("a red square", "a blue square"), ("a blue square", "a red square")):
        mine = torch.tensor([p == caption for p in prompts])
        near_own = sample_kernel.matrix(latents[mine], refs[groups[caption]]).mean()
        near_other = sample_kernel.matrix(latents[mine], refs[groups[other]]).mean()
        assert near_own > near_other, (caption, float(near_own), float(near_other))


def _latent(out: Path, key: str) -> np.ndarray:
    for tar in (out / "shards").glob("*.tar"):
        for sample in wds.WebDataset(str(tar), shardshuffle=False).decode():
            if sample["__key__"] == key:
                return sample["latent.npy"]
    raise KeyError(key)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_resume_is_byte_identical(world, family, tmp_path):
    out = tmp_path / "out"
    assert augment(world, family, out, "--prompt", "red", n=12).exit_code == 0
    before = shard_bytes(out)
    manifest = (out / "manifest.parquet").read_bytes()
    for path in [out / "shards" / "synthetic-000001.tar", out / "shards" / "synthetic-000001.tar.done"]:
        path.unlink()
    (out / "manifest" / "part-000001.parquet").unlink()
    assert augment(world, family, out, "--prompt", "red", n=12).exit_code == 0
    assert shard_bytes(out) == before and (out / "manifest.parquet").read_bytes() == manifest


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_a_model_the_job_cannot_drive_is_one_line_and_exit_2(world, tmp_path):
    from diffusers import DanceDiffusionPipeline, IPNDMScheduler, UNet1DModel

    torch.manual_seed(0)
    unet = UNet1DModel(
        block_out_channels=(8, 8, 16),
        extra_in_channels=16,
        sample_size=512,
        in_channels=2,
        out_channels=2,
        use_timestep_embedding=False,
        time_embedding_type="fourier",
        mid_block_type="UNetMidBlock1D",
        down_block_types=("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D"),
        up_block_types=("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip"),
    )
    folder = tmp_path / "audio"
    DanceDiffusionPipeline(unet=unet, scheduler=IPNDMScheduler()).save_pretrained(folder)
    out = tmp_path / "out"
    args = ["--ref", world["refs"], "--n", "4", "--out", str(out), "--model", str(folder), "--progress", "quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    (line,) = _error_lines(result.output)
    assert "DanceDiffusionPipeline" in line and "UNet1DModel" in line and "SDXL" in line and "Flux" in line
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    ("family", "extra", "says"),
    [
        ("flux", ["--sampler", "ddim"], "--sampler ddim"),
        ("sd1", ["--class-prompt", "a {}"], "--class-prompt"),
    ],
)
def test_settings_that_do_not_fit_the_model_are_one_line(world, family, extra, says, tmp_path):
    result = augment(world, family, tmp_path / "out", *extra)
    assert result.exit_code == 2, result.output
    (line,) = _error_lines(result.output)
    assert says in line
    assert not (tmp_path / "out" / "shards").exists()


def test_a_prompt_for_a_model_without_text_is_refused(world, tmp_path):
    out = tmp_path / "out"
    args = ["--ref", world["refs"], "--n", "4", "--out", str(out), "--prompt", "red", "--progress", "quiet"]
    result = CliRunner().invoke(app, [*args, "--cache-dir", world["cache"], "--no-reach-check"])
    assert result.exit_code == 2, result.output
    (line,) = _error_lines(result.output)
    assert "--prompt" in line and "not a text-to-image model" in line
    assert not (out / "shards").exists()
