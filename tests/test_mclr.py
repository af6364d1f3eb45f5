"""MCLR objective on the shipped prior: closed-form value at the anchor, gradients flow, the CLI smoke run."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pipeline.models.shipped import load_shipped
from pipeline.training.mclr import main as train_mclr_main
from pipeline.training.mclr import mclr_loss


def test_at_the_frozen_anchor_the_ratio_term_is_log_2_and_gradients_flow():
    prior = load_shipped()
    model = prior.unet.train().requires_grad_(True)
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(4, *prior.info["latent_shape"], generator=gen)
    labels = torch.tensor([0, 3, 7, 9])
    kwargs = dict(num_classes=10, null_class=10, beta=2000.0, weight=1.0)
    loss, stats = mclr_loss(model, frozen, z0, labels, prior.scheduler.alphas_cumprod.float(), gen, **kwargs)
    assert stats["delta"] == pytest.approx(0.0, abs=1e-6)  # θ = θ₀: no gain over the anchor
    assert stats["ratio_loss"] == pytest.approx(math.log(2.0), rel=1e-4)  # −log σ(0)
    assert loss.item() == pytest.approx(stats["denoise"] + math.log(2.0), rel=1e-4)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_smoke_run_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "mclr"
    train_mclr_main(["--out", str(out), "--smoke", "--batch-size", "4"])
    tuned = load_shipped(out)
    assert tuned.info["model_id"].endswith("-mclr") and (out / "README.md").is_file()
