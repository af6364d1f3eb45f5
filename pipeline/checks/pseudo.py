"""Pseudo-classes: unlabelled references on a class-conditional model get the class a judge reads in them.

Without class sub-folders a class-conditional model would be sampled from its null class, which is weak
(the shipped prior's null-class samples are legible 62% of the time, docs/models.md). So when the references
are unlabelled, the model is class-conditional and `pseudo_classes` is on, a judge reads the references:
for the shipped prior, the shipped digit classifier on the references as given (at the model's size; not on
their decoded latents: the VAE turns what it never saw, such as pixel noise, into digit-like blobs that the
classifier reads confidently). It *reads* them when its mean top-class probability is at least `READABLE`;
then each reference gets the digit it reads (class names: the digits that occur, "0".."9" in numeric order)
and the run proceeds exactly as a labelled run does: class proportions from these pseudo labels, the model
told the class, the class-aware product kernel, the label judge and `label_filter`, the pilot's stratified
split. Otherwise (off, no judge for this model, or the classifier cannot read the references) the run
samples the null class, and says why.

The pseudo labels are computed each run (the references classified again, as `prepare_reference` read
them; their latents decoded for the record's `decoded_agreement`), never stored in the cached reference
bundle. The output stays unlabelled unless `pseudo_labels` asks (see `pipeline.jobs.worker`); the manifest's
`pseudo_class` column keeps each sample's pseudo-class for audit either way.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ..config import AugmentConfig
from ..models.generation import model_label_map
from ..models.loading import LoadedModel
from .fidelity import READABLE
from .reference import ReferenceBundle

log = logging.getLogger(__name__)

#: Who reads the references (the only judge today).
JUDGE = "the shipped digit classifier"


def assign_pseudo_classes(
    bundle: ReferenceBundle, model: LoadedModel, cfg: AugmentConfig
) -> tuple[ReferenceBundle, dict | None]:
    """(bundle, record): the bundle with pseudo labels where a judge reads the unlabelled references, and the
    record of what was done (for run.json; None when it does not apply: labelled references or a model
    without classes). The judge reads the images `prepare_reference` read (`bundle.images`, at the model's
    size); the returned bundle carries the record (`bundle.pseudo_classes`) and no longer the images."""
    if bundle.labels is not None or model.num_classes is None:
        return bundle, None
    if not cfg.pseudo_classes:
        return _null_class(bundle, "pseudo-classes are off (--no-pseudo-classes)")
    from ..measures.features import load_shipped_classifier, shipped_classifier_available

    if cfg.model not in (None, "shipped"):
        return _null_class(
            bundle, f"no judge reads the references of {model.model_id} ({JUDGE} reads the shipped prior's digits only)"
        )
    if not shipped_classifier_available():
        return _null_class(bundle, f"{JUDGE} is not installed")
    if bundle.images is None:
        raise ValueError("unlabelled references without their images: build the bundle with prepare_reference")
    classifier = load_shipped_classifier()
    probs = class_probabilities(classifier, bundle.images)
    top, digits = probs.max(1)
    confidence = float(top.double().mean())
    if confidence < READABLE:
        return _null_class(
            bundle,
            f"{JUDGE} cannot read the references (mean confidence {confidence:.2f} < {READABLE:g})",
            mean_confidence=confidence,
        )
    present = sorted(set(digits.tolist()))
    class_names = [str(d) for d in present]
    if model_label_map(class_names, model.num_classes) is None:
        return _null_class(bundle, f"the digits {JUDGE} reads are not classes of {model.model_id}")
    labels = torch.searchsorted(torch.tensor(present), digits.long())
    counts = {name: int((labels == c).sum()) for c, name in enumerate(class_names)}
    decoded = torch.cat(
        [
            class_probabilities(classifier, model.decode(chunk, batch_size=cfg.batch_size))
            for chunk in bundle.latents.split(max(1, cfg.batch_size))
        ]
    ).argmax(1)
    record = {
        "used": True,
        "judge": JUDGE,
        "mean_confidence": confidence,
        "threshold": READABLE,
        "class_names": class_names,
        "counts": counts,
        # share of the references whose decoded latents (what guidance steers towards) read as the same digit
        "decoded_agreement": float((decoded == digits).double().mean()),
    }
    log.info(
        "references unlabelled: %d pseudo-classes from %s (mean confidence %.2f): %s; sampling class-conditionally%s",
        len(class_names),
        JUDGE,
        confidence,
        ", ".join(f"{name}: {n}" for name, n in counts.items()),
        "" if cfg.pseudo_labels else " (the output stays unlabelled: --pseudo-labels writes them)",
    )
    labelled = replace(bundle, labels=labels, class_names=class_names, pseudo_labels=True, images=None)
    return replace(labelled, pseudo_classes=record), record


@torch.no_grad()
def class_probabilities(classifier: torch.nn.Module, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The shipped classifier's class probabilities [n, classes] (float32, CPU) of images in [-1, 1]."""
    from ..measures.features import classifier_extractor

    features = classifier_extractor(classifier)
    return torch.cat([classifier.fc(features.fn(c)).softmax(1).float().cpu() for c in images.split(chunk)])


def describe_pseudo(cfg: AugmentConfig, labelled: bool) -> str | None:
    """The dry run's line on pseudo-classes (no model load), None for labelled references."""
    if labelled:
        return None
    if not cfg.pseudo_classes:
        return "classes: references unlabelled, pseudo-classes off (--no-pseudo-classes): the null class"
    if cfg.model not in (None, "shipped"):
        return (
            f"classes: references unlabelled; {cfg.model} has no judge for pseudo-classes ({JUDGE} reads the "
            "shipped prior's digits only): a class-conditional model is sampled from its null class"
        )
    return (
        f"classes: references unlabelled: pseudo-classes will be tried: {JUDGE} reads the references and, "
        f"if its mean confidence is >= {READABLE:g}, each reference gets the digit it reads and sampling is "
        "class-conditional in those proportions (else the null class; --no-pseudo-classes: always the null class)"
    )


def _null_class(bundle: ReferenceBundle, reason: str, **extra: float) -> tuple[ReferenceBundle, dict]:
    log.info("references unlabelled: sampling the model's null class: %s", reason)
    record = {"used": False, "reason": reason, **extra}
    return replace(bundle, pseudo_classes=record, images=None), record


__all__ = ["JUDGE", "assign_pseudo_classes", "class_probabilities", "describe_pseudo"]
