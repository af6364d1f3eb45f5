"""The tiny per-family diffusers pipelines of `tiny_families`: saved, loaded back offline by the stock
`DiffusionPipeline.from_pretrained`, and generating with the stock pipeline call (text reaching the model)."""

from __future__ import annotations

import hashlib
import socket

import pytest
import torch
from diffusers import DiffusionPipeline
from tiny_families import FAMILIES, build_tiny_pipeline, save_tiny_pipeline

PIPELINES = {
    "sd1": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "pixart": "PixArtAlphaPipeline",
    "sana": "SanaPipeline",
}

TOKENIZERS = {
    "sd1": {"tokenizer": "CLIPTokenizer"},
    "sd2": {"tokenizer": "CLIPTokenizer"},
    "sdxl": {"tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer"},
    "sd3": {"tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer", "tokenizer_3": "T5Tokenizer"},
    "flux": {"tokenizer": "CLIPTokenizer", "tokenizer_2": "T5Tokenizer"},
    "pixart": {"tokenizer": "T5Tokenizer"},
    "sana": {"tokenizer": "GemmaTokenizer"},
}

# `encode_prompt` arguments (beyond the prompt) and the shape of its first output (the prompt embeddings)
ENCODE = {
    "sd1": ({"device": "cpu", "num_images_per_prompt": 1, "do_classifier_free_guidance": True}, (1, 32, 16)),
    "sd2": ({"device": "cpu", "num_images_per_prompt": 1, "do_classifier_free_guidance": True}, (1, 32, 16)),
    "sdxl": ({"device": "cpu"}, (1, 32, 32)),
    "sd3": ({"prompt_2": None, "prompt_3": None, "device": "cpu"}, (1, 32 + 256, 32)),
    "flux": ({"prompt_2": None, "device": "cpu"}, (1, 512, 32)),
    "pixart": ({"clean_caption": False, "device": "cpu"}, (1, 120, 32)),
    "sana": ({"device": "cpu"}, (1, 300, 16)),
}

# family-appropriate call arguments (the pipelines' usual guidance; what the tiny models need besides)
CALL = {
    "sd1": {"guidance_scale": 7.5},
    "sd2": {"guidance_scale": 7.5},
    "sdxl": {"guidance_scale": 5.0},
    "sd3": {"guidance_scale": 7.0},
    "flux": {"guidance_scale": 3.5},
    "pixart": {"guidance_scale": 4.5, "use_resolution_binning": False, "clean_caption": False},
    "sana": {"guidance_scale": 4.5, "use_resolution_binning": False},
}
SIZE = {"sana": 32}  # Sana's pipeline wants multiples of 32; the others make 16x16 images


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE on (env and the hub's constant, read at import) and no network connection at all."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def generate(pipe, family: str, prompt: str) -> torch.Tensor:
    size = SIZE.get(family, 16)
    return pipe(
        prompt=prompt,
        num_inference_steps=2,
        height=size,
        width=size,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        **CALL[family],
    ).images


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_loads_offline_and_generates(family, tmp_path, offline):
    folder = save_tiny_pipeline(family, tmp_path / family)
    assert (folder / "model_index.json").is_file()
    assert not (folder / "_scratch").exists()

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == PIPELINES[family]
    for name, cls in TOKENIZERS[family].items():
        assert type(getattr(pipe, name)).__name__ == cls, name

    kwargs, shape = ENCODE[family]
    with torch.no_grad():
        red, blue = (pipe.encode_prompt(prompt, **kwargs)[0] for prompt in ("red", "blue"))
    assert tuple(red.shape) == shape
    assert torch.isfinite(red).all()
    assert not torch.allclose(red, blue)

    size = SIZE.get(family, 16)
    image = generate(pipe, family, "red")
    assert tuple(image.shape) == (1, 3, size, size)
    assert torch.isfinite(image).all()
    assert torch.equal(image, generate(pipe, family, "red")), "seeded calls should repeat"
    assert (image - generate(pipe, family, "blue")).abs().max() > 1e-4, "the prompt should reach the model"


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_folder_is_deterministic(family, tmp_path):
    def digest(folder):
        return {
            str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }

    first = digest(save_tiny_pipeline(family, tmp_path / "a"))
    assert first == digest(save_tiny_pipeline(family, tmp_path / "b"))


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_pipeline("sd4", tmp_path)
