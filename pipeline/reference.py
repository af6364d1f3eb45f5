"""Reference preparation: read and validate the references, encode them once, cache the bundle."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from guidance import (
    DeltaKernel,
    InverseMultiquadricKernel,
    Kernel,
    MMDTarget,
    MultiBandwidthRBF,
    ProductKernel,
    RandomFourierFeatures,
    RBFKernel,
)
from guidance.kernels import CubicPolynomialKernel, median_pairwise_distance
from storage.bundle import bundle_dir, load_bundle, save_bundle
from storage.references import read_references

from .config import AugmentConfig
from .models.loading import LoadedModel

log = logging.getLogger(__name__)

#: The fewest references the kernel two-sample statistics make sense with.
MIN_REFERENCES = 8


@dataclass
class ReferenceBundle:
    """Encoded references: clean latents, optional labels, and kernel parameters."""

    latents: torch.Tensor  # [M, C, H, W] float32
    labels: torch.Tensor | None
    class_names: list[str] | None
    bandwidth: float  # median pairwise distance of the flattened latents
    content_hash: str
    model_id: str
    files: list[str]
    reused: bool = False

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "mmd-augment" / "references"


def prepare_reference(cfg: AugmentConfig, model: LoadedModel) -> ReferenceBundle:
    """Read, validate and encode the references, reusing the cached bundle when inputs and model match."""
    refs = read_references(
        cfg.ref,
        channels=model.image_channels,
        size=(model.image_size, model.image_size),
        min_count=MIN_REFERENCES,
    )
    for line in refs.report:
        log.info("references: %s", line)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    folder = bundle_dir(cache, refs.content_hash, model.model_id)
    key = {"latent_shape": list(model.denoiser.latent_shape), "files": refs.files}
    found = load_bundle(folder, content_hash=refs.content_hash, model_id=model.model_id, extra_key=key)
    if found is not None:
        tensors, meta = found
        log.info("reference bundle reused from %s", folder)
        return ReferenceBundle(
            latents=tensors["latents"],
            labels=tensors.get("labels"),
            class_names=meta.get("class_names"),
            bandwidth=float(meta["bandwidth"]),
            content_hash=refs.content_hash,
            model_id=model.model_id,
            files=refs.files,
            reused=True,
        )
    latents = model.encode(refs.images, batch_size=cfg.batch_size).cpu()
    bandwidth = float(median_pairwise_distance(latents.flatten(1)))
    tensors = {"latents": latents}
    if refs.labels is not None:
        tensors["labels"] = refs.labels
    meta = dict(
        key,
        content_hash=refs.content_hash,
        model_id=model.model_id,
        bandwidth=bandwidth,
        class_names=refs.class_names,
        num_references=len(latents),
    )
    save_bundle(folder, tensors, meta)
    log.info("reference bundle written to %s (%d latents, median bandwidth %.3f)", folder, len(latents), bandwidth)
    return ReferenceBundle(
        latents=latents,
        labels=refs.labels,
        class_names=refs.class_names,
        bandwidth=bandwidth,
        content_hash=refs.content_hash,
        model_id=model.model_id,
        files=refs.files,
    )


def build_kernel(cfg: AugmentConfig, bundle: ReferenceBundle) -> Kernel | ProductKernel:
    """The sample kernel from the config (bandwidth from the bundle), a product kernel for labels."""
    bw = bundle.bandwidth
    dim = bundle.latents[0].numel()
    kernel: Kernel
    if cfg.kernel == "rbf":
        kernel = RBFKernel(bw)
    elif cfg.kernel == "rbf-multi":
        kernel = MultiBandwidthRBF([bw * f for f in cfg.bandwidth_factors])
    elif cfg.kernel == "imq":
        kernel = InverseMultiquadricKernel(bw)
    elif cfg.kernel == "cubic":
        kernel = CubicPolynomialKernel()
    else:
        kernel = RandomFourierFeatures(bw, dim, num_features=cfg.rff_features, seed=cfg.seed)
    if cfg.class_aware and bundle.labels is not None:
        return ProductKernel(kernel, DeltaKernel())
    return kernel


def build_target(cfg: AugmentConfig, bundle: ReferenceBundle, device: torch.device) -> MMDTarget:
    kernel = build_kernel(cfg, bundle)
    labels = bundle.labels.to(device) if isinstance(kernel, ProductKernel) else None
    return MMDTarget(bundle.latents.to(device), kernel, y_cond=labels, unbiased=False)
