"""Feature spaces for evaluation: images in [-1, 1] [n, C, H, W] -> features [n, F] (float64, CPU).

- ``classifier``: penultimate features of the shipped prior's `DigitClassifier` (the shipped domain);
- ``vae``: flattened VAE latents of a model (the run's own model by default: user data);
- ``pixels``: flattened pixels (no model; fast, for tests and sanity checks);
- ``pkg.mod:fn``: a user extractor, ``fn(images) -> [n, F]`` with images in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.models.shipped import SHIPPED_MODEL_DIR, DigitClassifier

__all__ = [
    "FeatureExtractor",
    "classifier_extractor",
    "extract",
    "fit_images",
    "import_path_extractor",
    "load_shipped_classifier",
    "pixel_extractor",
    "resolve_extractor",
    "shipped_classifier_available",
    "vae_extractor",
]


@dataclass
class FeatureExtractor:
    """A named feature map; ``fn`` takes a batch of images in [-1, 1] and returns [batch, F]."""

    name: str
    description: str
    fn: Callable[[Tensor], Tensor]
    batch_size: int = 256


@torch.no_grad()
def extract(extractor: FeatureExtractor, images: Tensor) -> Tensor:
    """Features of ``images`` [n, C, H, W] in batches, float64 [n, F] on the CPU."""
    if images.shape[0] == 0:
        raise ValueError("no images to extract features from")
    out = []
    for chunk in images.split(extractor.batch_size):
        f = torch.as_tensor(extractor.fn(chunk))
        if f.dim() < 2 or f.shape[0] != chunk.shape[0]:
            raise ValueError(
                f"feature extractor {extractor.name!r} returned shape {tuple(f.shape)} for {chunk.shape[0]} images; "
                "it must return [n, F]"
            )
        out.append(f.detach().reshape(f.shape[0], -1).to("cpu", torch.float64))
    feats = torch.cat(out)
    if not bool(torch.isfinite(feats).all()):
        raise ValueError(f"feature extractor {extractor.name!r} returned NaN or inf values")
    return feats


def fit_images(images: Tensor, channels: int, size: int | tuple[int, int]) -> Tensor:
    """Images [n, C, H, W] in [-1, 1] converted to ``channels`` (ITU-R 601 luma / repeat) and resized
    (bilinear, antialiased) to ``size``; unchanged when they already match."""
    x = images.float()
    if x.shape[1] != channels:
        if channels == 1 and x.shape[1] == 3:
            w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * w).sum(1, keepdim=True)
        elif channels == 3 and x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        else:
            raise ValueError(f"cannot convert {x.shape[1]}-channel images to {channels} channels")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) != hw:
        x = F.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)
    return x


def pixel_extractor() -> FeatureExtractor:
    return FeatureExtractor("pixels", "flattened pixels in [-1, 1]", lambda x: x.flatten(1))


def shipped_classifier_available(model_dir: str | Path | None = None) -> bool:
    return (Path(model_dir or SHIPPED_MODEL_DIR) / "classifier").is_dir()


def load_shipped_classifier(model_dir: str | Path | None = None, device: str | torch.device = "cpu") -> DigitClassifier:
    """The shipped prior's `DigitClassifier` (eval mode, no grad), without loading the diffusion model."""
    folder = Path(model_dir or SHIPPED_MODEL_DIR) / "classifier"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: the shipped prior's classifier is missing (is the shipped model installed?); "
            "use --features vae, pixels or an extractor 'pkg.mod:fn'"
        )
    return DigitClassifier.from_pretrained(folder).to(device).eval().requires_grad_(False)


def _classifier_input_size(classifier: DigitClassifier, model_dir: str | Path | None) -> int:
    info = Path(model_dir or SHIPPED_MODEL_DIR) / "shipped.json"
    if info.is_file():
        import json

        return int(json.loads(info.read_text()).get("image_size", 32))
    return int(getattr(classifier, "image_size", 32))


def classifier_extractor(
    classifier: DigitClassifier | None = None,
    *,
    model_dir: str | Path | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
) -> FeatureExtractor:
    """Penultimate features (``classifier.features``) of the shipped digit classifier."""
    clf = classifier if classifier is not None else load_shipped_classifier(model_dir, device)
    size = image_size or _classifier_input_size(clf, model_dir)
    channels = int(clf.config["in_channels"])
    dev = next(clf.parameters()).device

    def fn(x: Tensor) -> Tensor:
        return clf.features(fit_images(x, channels, size).to(dev))

    return FeatureExtractor(
        "classifier",
        f"penultimate features ({clf.feature_dim}-d) of the shipped digit classifier, inputs {channels}×{size}×{size}",
        fn,
    )


def vae_extractor(model: Any, *, batch_size: int = 64) -> FeatureExtractor:
    """Flattened VAE latents ``model.encode(images)`` of a `LoadedModel` (posterior mode × scaling factor).

    A model without a VAE (pixel-space) gives its own pixels, as its ``encode`` does.
    """
    channels, size = int(model.image_channels), int(model.image_size)
    has_vae = getattr(model, "vae", None) is not None

    def fn(x: Tensor) -> Tensor:
        return model.encode(fit_images(x, channels, size), batch_size=batch_size).flatten(1)

    what = "flattened VAE latents" if has_vae else "flattened pixels (the model has no VAE)"
    return FeatureExtractor("vae", f"{what} of model {model.model_id}", fn, batch_size=batch_size)


def import_path_extractor(spec: str) -> FeatureExtractor:
    """A user extractor ``pkg.mod:fn`` with ``fn(images in [-1, 1] [n, C, H, W]) -> [n, F]``."""
    from pipeline.models.adapters import load_object

    fn = load_object(spec)
    if not callable(fn):
        raise ValueError(f"{spec!r} is not callable; a feature extractor is fn(images) -> [n, F]")
    return FeatureExtractor(spec, f"user extractor {spec}", fn)


def resolve_extractor(
    features: str,
    *,
    run_model: str | None,
    device: str = "auto",
    model_loader: Callable[[], Any] | None = None,
) -> FeatureExtractor:
    """The extractor named by ``features``: "auto" | "classifier" | "vae" | "pixels" | "pkg.mod:fn".

    "auto" is the shipped classifier's features when the run used the shipped prior (model None or
    "shipped") and the classifier is installed, else the run model's VAE latents. ``model_loader``
    returns the run's `LoadedModel` (loaded only when the VAE is needed).
    """
    from pipeline.models.loading import load_model, resolve_device

    shipped = run_model in (None, "shipped")
    if features == "auto":
        features = "classifier" if shipped and shipped_classifier_available() else "vae"
    if features == "classifier":
        return classifier_extractor(device=resolve_device(device))
    if features == "pixels":
        return pixel_extractor()
    if features == "vae":
        model = model_loader() if model_loader is not None else load_model(run_model, device=device, dtype="float32")
        return vae_extractor(model)
    if ":" in features:
        return import_path_extractor(features)
    raise ValueError(f"unknown feature space {features!r}: use auto, classifier, vae, pixels or 'pkg.mod:fn'")
