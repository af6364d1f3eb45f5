"""Adapters: every model family becomes the same Denoiser contract; models load offline from folders."""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_tiny_ddpm, save_tiny_dit, tiny_scheduler, tiny_unet, tiny_unet_condition

from pipeline.models.adapters import CallableAdapter, UNet2DConditionAdapter, adapter_for, load_object
from pipeline.models.denoiser import Denoiser
from pipeline.models.loading import LoadedModel, load_model
from pipeline.models.sampling import model_output, sample_latents
from pipeline.models.testbed import square_mixture


def test_pixel_unet_folder_loads_offline_and_samples(tmp_path):
    model = load_model(str(save_tiny_ddpm(tmp_path / "ddpm")), device="cpu")
    assert isinstance(model.denoiser, Denoiser)
    assert model.vae is None and model.denoiser.latent_shape == (1, 16, 16) and not model.denoiser.supports_cfg
    x = sample_latents(model.denoiser, model.scheduler, [1, 2], num_steps=3).latents
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()
    assert model.model_id.startswith("ddpm@")


def test_dit_folder_splits_learned_sigma_and_supports_cfg(tmp_path):
    model = load_model(str(save_tiny_dit(tmp_path / "dit", num_classes=4)), device="cpu")
    den = model.denoiser
    assert den.latent_shape == (4, 8, 8) and den.supports_cfg and model.num_classes == 4
    assert int(den.null_condition(2)[0]) == 4  # DiT's extra label row is the null class
    x = torch.randn(2, 4, 8, 8)
    out = den(x, torch.tensor(10), torch.tensor([0, 3]))
    assert out.sample.shape == (2, 4, 8, 8)  # the learned-variance half is dropped
    guided, calls = model_output(den, x, 10, torch.tensor([0, 3]), cfg_scale=3.0)
    assert calls == 2 and guided.shape == x.shape
    images = model.decode(torch.randn(3, 4, 8, 8))
    assert images.shape == (3, 1, 16, 16) and images.abs().max() <= 1
    latents = model.encode(images)
    assert latents.shape == (3, 4, 8, 8)


def test_class_conditional_unet_uses_the_given_null_class():
    den = adapter_for(tiny_unet(num_class_embeds=5), null_class=4)
    assert den.supports_cfg and int(den.null_condition(1)[0]) == 4
    x = torch.randn(3, 1, 16, 16)
    a = den(x, torch.tensor(5), torch.tensor([0, 1, 2])).sample
    b = den(x, torch.tensor(5), torch.tensor([3, 1, 2])).sample
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1:], b[1:])
    with pytest.raises(ValueError, match="labels for a batch"):
        den(x, torch.tensor(5), torch.tensor([0, 1]))


class _Tokenizer:
    model_max_length = 6

    def __call__(self, prompts, padding, max_length, truncation, return_tensors):
        ids = torch.zeros(len(prompts), max_length, dtype=torch.long)
        for i, p in enumerate(prompts):
            codes = [(ord(c) % 31) + 1 for c in p][:max_length]
            ids[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
        return {"input_ids": ids}


class _TextEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(32, 12)

    def forward(self, ids):
        return (self.embed(ids),)


def test_text_conditional_unet_encodes_prompts_and_empty_prompt_is_null():
    den = UNet2DConditionAdapter(tiny_unet_condition(), _TextEncoder(), _Tokenizer())
    emb = den.encode_prompts(["a chest x-ray", "a knee"])
    assert emb.shape == (2, 6, 12)
    null = den.null_condition(2)
    torch.testing.assert_close(null[0], den.encode_prompts([""])[0])
    x = torch.randn(2, 4, 8, 8)
    by_text = den(x, torch.tensor(3), ["a chest x-ray", "a knee"]).sample
    by_emb = den(x, torch.tensor(3), emb).sample
    torch.testing.assert_close(by_text, by_emb)
    out, calls = model_output(den, x, 3, emb, cfg_scale=5.0)
    assert calls == 2 and out.shape == x.shape


def test_sampling_with_prompt_strings_and_cfg_equals_sampling_with_their_embeddings():
    """Prompts given as strings are encoded once by the adapter, so CFG can pair them with the null prompt."""
    from diffusers import DDIMScheduler

    den = UNet2DConditionAdapter(tiny_unet_condition(), _TextEncoder(), _Tokenizer())
    sched = DDIMScheduler(num_train_timesteps=100)
    prompts = ["a chest x-ray", "a knee"]
    by_text = sample_latents(den, sched, [1, 2], num_steps=3, condition=prompts, cfg_scale=4.0).latents
    by_emb = sample_latents(den, sched, [1, 2], num_steps=3, condition=den.encode_prompts(prompts), cfg_scale=4.0)
    torch.testing.assert_close(by_text, by_emb.latents)


def custom_factory(device, dtype) -> LoadedModel:
    """A user's custom model, passed as --model tests.test_adapters:custom_factory."""
    denoiser, scheduler = square_mixture()
    return LoadedModel(denoiser=denoiser, scheduler=scheduler, model_id="custom-gmm", image_channels=2, image_size=1)


def test_custom_denoiser_by_import_path():
    model = load_model("test_adapters:custom_factory", device="cpu")
    assert model.model_id == "custom-gmm"
    x = sample_latents(model.denoiser, model.scheduler, [0, 1, 2], num_steps=5).latents
    assert x.shape == (3, 2, 1, 1)
    with pytest.raises(ValueError, match="cannot import module"):
        load_object("no_such_module_xyz:factory")
    with pytest.raises(ValueError, match="has no attribute"):
        load_object("test_adapters:nope")
    with pytest.raises(ValueError, match="package.module:name"):
        load_object("just_a_name")


def test_callable_adapter_wraps_plain_functions():
    den = CallableAdapter(lambda x, t, c: torch.zeros_like(x), (1, 2, 2))
    assert not den.supports_cfg
    with pytest.raises(ValueError, match="no null condition"):
        den.null_condition(2)
    x = sample_latents(den, tiny_scheduler(), [5], num_steps=2).latents
    assert x.shape == (1, 1, 2, 2)


def test_unknown_model_type_is_a_clear_error():
    with pytest.raises(ValueError, match="no adapter for a Linear"):
        adapter_for(torch.nn.Linear(2, 2))
