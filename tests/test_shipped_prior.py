"""The shipped latent diffusion prior: loads offline and fast, has the documented shapes and sizes,
and the training command (smoke version) produces a loadable folder and resumes from checkpoints."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.models.shipped import (
    SHIPPED_MODEL_DIR,
    DigitClassifier,
    InternalGuidanceUNet,
    ShippedPrior,
    load_shipped,
)

MB = 1_000_000


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted during an offline test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def prior() -> ShippedPrior:
    return load_shipped()


def test_shipped_folder_layout() -> None:
    for sub in ("vae", "unet", "ig_head", "scheduler", "classifier"):
        assert (SHIPPED_MODEL_DIR / sub).is_dir(), sub
    for name in ("split.json", "shipped.json", "README.md"):
        assert (SHIPPED_MODEL_DIR / name).is_file(), name
    assert not list(SHIPPED_MODEL_DIR.rglob("*.bin")), "weights must be safetensors only"
    split = json.loads((SHIPPED_MODEL_DIR / "split.json").read_text())
    assert split["n_heldout"] == len(split["heldout_indices"]) == 1000
    # the fixed split: the held-out rows the benchmark domains use were never trained on
    from pipeline.models.prior_data import mnist_split

    assert sorted(split["heldout_indices"]) == mnist_split()[1].tolist()


def test_load_is_offline_and_fast(no_network: None) -> None:
    import diffusers  # noqa: F401  (import cost is not load cost)

    load_shipped()  # warm the file cache
    t0 = time.perf_counter()
    p = load_shipped()
    seconds = time.perf_counter() - t0
    assert seconds < 2.0, f"load_shipped took {seconds:.2f} s"
    assert p.model_id == "mmd-augment/mnist-ldm-v3"
    assert not p.unet.training and not p.vae.training


def test_sizes() -> None:
    total = sum(f.stat().st_size for f in SHIPPED_MODEL_DIR.rglob("*") if f.is_file())
    classifier = sum(f.stat().st_size for f in (SHIPPED_MODEL_DIR / "classifier").rglob("*") if f.is_file())
    assert total < 25 * MB, total
    assert classifier < 1 * MB, classifier


def test_info_matches_models(prior: ShippedPrior) -> None:
    info = prior.info
    assert info["latent_shape"] == [4, 8, 8]
    assert info["null_class_id"] == 10 and info["num_classes"] == 10
    assert info["image_size"] == 32 and info["channels"] == 1
    assert prior.unet.unet.config.num_class_embeds == 11
    assert prior.scheduler.config.prediction_type == "epsilon"
    assert prior.unet.head.config["block"] == "up_blocks.0"
    assert prior.scaling_factor != pytest.approx(0.18215)  # set from the data


def test_shapes(prior: ShippedPrior) -> None:
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        z = prior.encode(x)
        assert z.shape == (3, 4, 8, 8)
        assert prior.decode(z).shape == (3, 1, 32, 32)
        main, head = prior.unet(z, torch.tensor([999, 500, 10]), torch.tensor([0, 7, 10]))
        assert main.shape == head.shape == z.shape
        assert not torch.allclose(main, head)
        logits = prior.classifier(x)
        feats = prior.classifier.features(x)
    assert logits.shape == (3, 10)
    assert feats.shape == (3, prior.classifier.feature_dim)


def test_vae_reconstructs_a_digit(prior: ShippedPrior) -> None:
    """A held-out-like digit drawn by hand survives the VAE round trip (PSNR well above noise)."""
    from pipeline.models.prior_eval import psnr

    x = -torch.ones(1, 1, 32, 32)
    x[..., 6:26, 14:18] = 1.0  # a thick "1"
    with torch.no_grad():
        rec = prior.decode(prior.encode(x))
    assert psnr(rec, x) > 15


def test_internal_guidance_unet_roundtrip_and_head_gradients(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = InternalGuidanceUNet.build(num_classes=3, block_out_channels=(32, 64))
    z = torch.randn(2, 4, 8, 8)
    t = torch.tensor([3, 900])
    y = torch.tensor([0, 3])
    main, head = model(z, t, y)
    head.pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    # the head's loss reaches the blocks before it, not the blocks after it
    assert grads["unet.down_blocks.0.resnets.0.conv1.weight"] is not None
    assert grads["unet.mid_block.resnets.0.conv1.weight"] is not None
    assert grads["unet.up_blocks.1.resnets.0.conv1.weight"] is None
    assert grads["unet.conv_out.weight"] is None
    model.eval()
    model.save_pretrained(tmp_path)
    again = InternalGuidanceUNet.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a, b = model(z, t, y), again(z, t, y)
    torch.testing.assert_close(a, b)


def test_classifier_roundtrip(tmp_path: Path) -> None:
    clf = DigitClassifier().eval()
    clf.save_pretrained(tmp_path)
    again = DigitClassifier.from_pretrained(tmp_path).eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(clf(x), again(x))


def test_prior_eval_sampling_is_deterministic_and_batch_independent(prior: ShippedPrior) -> None:
    """The model card's samples come from the pipeline's loop with per-sample seeds."""
    from pipeline.models.prior_eval import sample_prior

    labels = torch.tensor([3, 10, 7])
    for eta in (0.0, 1.0):
        a = sample_prior(prior, labels, seed=1, num_steps=3, cfg_scale=2.0, ig_scale=1.5, batch_size=3, eta=eta)
        b = sample_prior(prior, labels, seed=1, num_steps=3, cfg_scale=2.0, ig_scale=1.5, batch_size=1, eta=eta)
        torch.testing.assert_close(a.images, b.images, atol=1e-4, rtol=0)
    assert a.images.shape == (3, 1, 32, 32)
    assert a.images.min() >= -1 and a.images.max() <= 1


@pytest.mark.slow
def test_smoke_training_resumes_and_loads(tmp_path: Path, no_network: None) -> None:
    """Interrupted mid-UNet, resumed: loadable folder, identical weights to an uninterrupted run."""
    from pipeline.train_prior import EXIT_INTERRUPTED, main

    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--smoke", "--threads", "1", "--work", str(work), "--out", str(out)]
    assert main([*args, "--interrupt", "unet:2"]) == EXIT_INTERRUPTED
    assert (work / "ckpt_unet.pt").is_file() and (work / "vae.done.json").is_file()
    assert not (out / "shipped.json").exists()

    # a twin work dir without the UNet checkpoint: the UNet stage restarts from step 0 there
    twin_work, twin_out = tmp_path / "twin_work", tmp_path / "twin_out"
    shutil.copytree(work, twin_work)
    (twin_work / "ckpt_unet.pt").unlink()

    assert main([*args, "--resume"]) == 0
    assert main(["--smoke", "--threads", "1", "--work", str(twin_work), "--out", str(twin_out), "--resume"]) == 0

    prior = load_shipped(out)
    assert prior.info["latent_shape"] == [4, 8, 8]
    assert (out / "README.md").is_file() and (out / "metrics.json").is_file()
    resumed = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    fresh = load_file(twin_out / "unet" / "diffusion_pytorch_model.safetensors")
    assert resumed.keys() == fresh.keys()
    for k in resumed:
        torch.testing.assert_close(resumed[k], fresh[k], rtol=0, atol=0)
    # the learning curve was probed every 2 steps with the classifier of the earlier stage
    curve = json.loads((out / "metrics.json").read_text())["stages"]["unet"]["learning_curve"]
    assert [p["step"] for p in curve] == [2, 4]
    assert all(0.0 <= p["class_accuracy"] <= 1.0 for p in curve)
