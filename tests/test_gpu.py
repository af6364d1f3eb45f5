"""GPU paths: the same code on CUDA, fp16/bf16 denoiser with float32 guidance math (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_tiny_dit

from guidance import MMDGuidance, MMDTarget, RBFKernel, StrengthSchedule
from pipeline.models.loading import load_model, resolve_device, resolve_dtype
from pipeline.models.sampling import sample_latents
from storage.errors import InputError


def test_device_and_dtype_decisions_on_this_machine():
    dev = resolve_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(InputError, match="--dtype float16 on cpu"):  # overflows to NaN in guided CPU runs
        resolve_dtype("float16", torch.device("cpu"))


@pytest.mark.gpu
def test_cuda_sampling_matches_cpu_for_the_same_seeds(tmp_path):
    folder = str(save_tiny_dit(tmp_path / "dit"))
    cpu = load_model(folder, device="cpu", dtype="float32")
    gpu = load_model(folder, device="cuda", dtype="float32")
    a = sample_latents(cpu.denoiser, cpu.scheduler, [1, 2, 3], num_steps=5, device="cpu").latents
    b = sample_latents(gpu.denoiser, gpu.scheduler, [1, 2, 3], num_steps=5, device="cuda").latents.cpu()
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_model_with_float32_guidance(tmp_path, dtype):
    model = load_model(str(save_tiny_dit(tmp_path / "dit")), device="cuda", dtype=dtype)
    refs = torch.randn(16, 4, 8, 8, device="cuda")
    target = MMDTarget(refs, RBFKernel.from_median(refs.flatten(1)), unbiased=False)
    guidance = MMDGuidance(target, StrengthSchedule(0.1))
    res = sample_latents(model.denoiser, model.scheduler, list(range(8)), num_steps=5, guidance=guidance, device="cuda")
    assert res.latents.dtype == torch.float32 and torch.isfinite(res.latents).all()


@pytest.mark.gpu
@pytest.mark.slow
def test_prior_training_smoke_on_cuda(tmp_path):
    """`python -m pipeline.training --device cuda`: every stage, the learning curve and the card on a GPU."""
    import json

    from pipeline.models.shipped import load_shipped
    from pipeline.training.cli import main

    out = tmp_path / "out"
    assert main(["--smoke", "--device", "cuda", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["data"]["device"].startswith("cuda")
    assert report["stages"]["unet"]["learning_curve"]
    assert load_shipped(out).info["latent_shape"] == [4, 8, 8]
