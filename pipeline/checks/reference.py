"""Reference preparation: read and validate the references, encode them once, cache the bundle; the test of
whether a sample lies inside their support (`outside_support`, the filter's and the reach check's)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from guidance import (
    DeltaKernel,
    EmbeddingKernel,
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
from storage.errors import InputError
from storage.references import References, read_references, refuse_output_inside

from ..config import AugmentConfig
from ..models.loading import LoadedModel, peek_input
from ..models.prompts import SamplePrompts
from ..seeding import derive_seed

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
    heldout_files: list[str] = field(default_factory=list)  # not used for guidance (evaluation only)
    source: str = ""  # what the files are before conversion ("128×128 grayscale"), for messages
    # unlabelled references given the classes a judge reads in them (`pipeline.checks.pseudo`; never cached)
    pseudo_labels: bool = False
    pseudo_classes: dict | None = None  # that step's record for run.json (None: it did not apply)
    captions: list[str] | None = None  # one per file (None: the references carry no captions)
    # text-to-image runs on captions: each reference's pooled caption embedding [M, D], the prompt-aware kernel's
    # conditions (`attach_caption_embeddings`; never cached)
    caption_embeddings: torch.Tensor | None = None
    # unlabelled references on a class-conditional model: the images as read [M, C, H, W] in [-1, 1], at the
    # model's size, for the pseudo-class judge (`prepare_reference`; never cached, dropped once it has read them)
    images: torch.Tensor | None = None

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)

    @property
    def kernel_conditions(self) -> torch.Tensor | None:
        """What the product kernel sees of the references: their classes, else their caption embeddings."""
        return self.labels if self.labels is not None else self.caption_embeddings


def outside_support(nearest: torch.Tensor, bandwidth: float, radius: float) -> torch.Tensor:
    """Samples whose nearest reference is farther than `radius` × the median reference distance [n] bool."""
    return nearest > radius * bandwidth


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "mmd-augment" / "references"


def prepare_reference(cfg: AugmentConfig, model: LoadedModel) -> ReferenceBundle:
    """Read, validate and encode the references (cached bundle reused when inputs and model match),
    then hold out `cfg.holdout` of them from guidance for evaluation.

    Unlabelled references on a class-conditional model keep their images as read (`bundle.images`, at the
    model's size) for the pseudo-class judge (`pipeline.checks.pseudo.assign_pseudo_classes`, which drops
    them), so the folder is read once."""
    bundle, refs = encoded_bundle(
        cfg.ref,
        channels=model.image_channels,
        size=(model.image_size, model.image_size),
        model_id=model.model_id,
        encode=lambda images: model.encode(images, batch_size=cfg.batch_size).cpu(),
        extra_key={"latent_shape": list(model.denoiser.latent_shape)},
        cache_dir=cfg.cache_dir,
    )
    if refs.labels is None and model.num_classes is not None:
        bundle = replace(bundle, images=refs.images)
    return split_holdout(bundle, cfg.holdout, cfg.seed)


def check_references(cfg: AugmentConfig) -> References:
    """Validate the references before the model is loaded, so input errors come first (and alone).

    Reads and decodes every file as `prepare_reference` will: at the model's input size and channels where its
    config files tell them without loading it (`peek_input`: the shipped prior, a local diffusers folder), so a
    reference too small for the model is refused here too; else at a tiny size (the model's size is found once
    it loads). The references must not lie inside `--out`. Returns them (files, labels, captions, `source`, the
    report and its warnings).

    Raises:
        InputError: one line naming the folder or the first bad file.
    """
    refuse_output_inside(cfg.ref, cfg.out)
    peeked = peek_input(cfg.model, cfg.resolution)
    channels, size = peeked if peeked is not None else (3, 2)
    return read_references(cfg.ref, channels=channels, size=(size, size), min_count=MIN_REFERENCES)


def listed_bundle(refs: References) -> ReferenceBundle:
    """The references' files, labels and classes as a bundle without latents (for planning before the model
    is loaded: `--dry-run`); `split_holdout` applies to it as to an encoded one."""
    return ReferenceBundle(
        latents=torch.zeros(len(refs.files), 0),
        labels=refs.labels,
        class_names=refs.class_names,
        bandwidth=0.0,
        content_hash=refs.content_hash,
        model_id="",
        files=refs.files,
        source=refs.source,
    )


def split_holdout(bundle: ReferenceBundle, fraction: float, seed: int) -> ReferenceBundle:
    """Deterministic (seeded) split, stratified by class: the guidance part keeps ⌈(1−f)·n_c⌉ of each class."""
    if fraction <= 0:
        return bundle
    labels = bundle.labels if bundle.labels is not None else torch.zeros(len(bundle.latents), dtype=torch.long)
    gen = torch.Generator().manual_seed(derive_seed("holdout", seed))
    order = torch.randperm(len(labels), generator=gen)
    held = []
    for c in labels.unique().tolist():
        members = order[labels[order] == c]
        n_held = int(len(members) * fraction)
        held.extend(members[:n_held].tolist())
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held] = False
    if int(keep.sum()) < MIN_REFERENCES:
        raise InputError(f"holding out {fraction:.0%} of {len(labels)} references leaves fewer than {MIN_REFERENCES}")
    return replace(
        bundle,
        latents=bundle.latents[keep],
        labels=bundle.labels[keep] if bundle.labels is not None else None,
        captions=[c for c, k in zip(bundle.captions, keep.tolist(), strict=True) if k] if bundle.captions else None,
        caption_embeddings=bundle.caption_embeddings[keep] if bundle.caption_embeddings is not None else None,
        images=bundle.images[keep] if bundle.images is not None else None,
        files=[f for f, k in zip(bundle.files, keep.tolist(), strict=True) if k],
        heldout_files=[f for f, k in zip(bundle.files, keep.tolist(), strict=True) if not k],
    )


def encoded_bundle(
    ref: str,
    *,
    channels: int,
    size: tuple[int, int],
    model_id: str,
    encode: Callable[[torch.Tensor], torch.Tensor],
    extra_key: dict[str, Any],
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[ReferenceBundle, References]:
    """Read and validate the references (`channels`, `size` (H, W)), then their bundle: the cached one when
    content hash, `model_id`, files and `extra_key` (what else shapes the latents) match, else
    `encode(images)` -> latents [M, ...] float32 on the CPU, their median pairwise distance as the bandwidth,
    saved under `cache_dir` (default `default_cache_dir()`). The job's (`prepare_reference`) and
    `MMDGuidanceCallback`'s.

    Returns:
        The bundle (all references, with their captions) and the references as read (images at `size`).

    Raises:
        InputError: one line naming the folder or the first bad file.
    """
    refs = read_references(ref, channels=channels, size=size, min_count=MIN_REFERENCES)
    for line in refs.report:
        (log.warning if line in refs.warnings else log.info)("references: %s", line)
    folder = bundle_dir(Path(cache_dir) if cache_dir else default_cache_dir(), refs.content_hash, model_id)
    key = {**extra_key, "files": refs.files}
    found = load_bundle(folder, content_hash=refs.content_hash, model_id=model_id, extra_key=key)
    if found is not None:
        tensors, meta = found
        log.info("reference bundle reused from %s", folder)
        latents, bandwidth, reused = tensors["latents"], float(meta["bandwidth"]), True
    else:
        start = time.perf_counter()
        latents = encode(refs.images)
        bandwidth = float(median_pairwise_distance(latents.flatten(1)))
        tensors = {"latents": latents} if refs.labels is None else {"latents": latents, "labels": refs.labels}
        meta = dict(
            key,
            content_hash=refs.content_hash,
            model_id=model_id,
            bandwidth=bandwidth,
            class_names=refs.class_names,
            num_references=len(latents),
        )
        save_bundle(folder, tensors, meta)
        reused = False
        log.info(
            "reference bundle written to %s (%d latents %s, median bandwidth %.3f, %.1f s)",
            folder,
            len(latents),
            "x".join(map(str, latents.shape[1:])),
            bandwidth,
            time.perf_counter() - start,
        )
    bundle = ReferenceBundle(
        latents=latents,
        labels=refs.labels,
        class_names=refs.class_names,
        bandwidth=bandwidth,
        content_hash=refs.content_hash,
        model_id=model_id,
        files=refs.files,
        reused=reused,
        source=refs.source,
        captions=refs.captions,
    )
    return bundle, refs


def prompt_kernel(embeddings: torch.Tensor) -> EmbeddingKernel:
    """k_C on pooled prompt embeddings: RBF with the median distance between the distinct embeddings
    (DESIGN.md §5c); the job's and `MMDGuidanceCallback`'s."""
    distinct = torch.unique(embeddings, dim=0)
    if len(distinct) < 2:
        raise ValueError("every reference has the same prompt; the prompt-aware kernel needs two")
    return EmbeddingKernel("rbf", median_pairwise_distance(distinct))


def sample_prompts(cfg: AugmentConfig, bundle: ReferenceBundle, model: LoadedModel) -> SamplePrompts | None:
    """Each sample's prompt on a text-to-image model (`pipeline.models.prompts`): `--class-prompt` with class
    folders, else the references' captions unless `--prompt` is given, else `--prompt`; None: unprompted.

    Raises:
        InputError: a prompt flag on a model without text conditioning, or `--class-prompt` without classes.
    """
    given = [name for name in ("prompt", "negative_prompt", "class_prompt") if getattr(cfg, name) is not None]
    if not model.text_conditioned:
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise InputError(
                f"{flag}: {model.model_id} ({model.family}) is not a text-to-image model; prompts need one "
                "(SD 1/2, SDXL, SD3, Flux, PixArt, Sana; docs/models.md)"
            )
        if bundle.captions is not None:
            log.info("the references' captions are not used: %s takes no prompts", model.model_id)
        return None
    if cfg.class_prompt is not None:
        if bundle.class_names is None or bundle.pseudo_labels:
            raise InputError(f"--class-prompt {cfg.class_prompt!r}: {cfg.ref} has no class sub-folders")
        return SamplePrompts.for_classes(cfg.class_prompt, bundle.class_names)
    if bundle.captions is not None and cfg.prompt is None:
        return SamplePrompts.from_captions(bundle.captions, bundle.labels, bundle.num_classes, cfg.seed)
    if bundle.captions is not None:
        log.info("--prompt given: every sample gets it, the references' captions are not used")
    return SamplePrompts.single(cfg.prompt) if cfg.prompt is not None else None


def attach_caption_embeddings(
    bundle: ReferenceBundle, model: LoadedModel, prompts: SamplePrompts | None
) -> ReferenceBundle:
    """Captioned references with two or more distinct captions get their pooled caption embeddings, so the
    kernel becomes the prompt-aware product k_C(e, e')·k(x, y) (labelled runs keep their class δ-kernel)."""
    if prompts is None or prompts.source != "captions" or bundle.labels is not None:
        return bundle
    if len(set(bundle.captions)) < 2:
        log.info("every reference has the same caption: guiding without the prompt kernel")
        return bundle
    return replace(bundle, caption_embeddings=model.denoiser.prompt_embeddings(bundle.captions))


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
    if bundle.labels is None and bundle.caption_embeddings is not None:
        return ProductKernel(kernel, prompt_kernel(bundle.caption_embeddings))
    return kernel


def build_target(cfg: AugmentConfig, bundle: ReferenceBundle, device: torch.device) -> MMDTarget:
    kernel = build_kernel(cfg, bundle)
    y_cond = bundle.kernel_conditions.to(device) if isinstance(kernel, ProductKernel) else None
    return MMDTarget(bundle.latents.to(device), kernel, y_cond=y_cond, unbiased=False)
