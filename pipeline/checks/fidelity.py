"""Label fidelity: an independent judge says which class each labelled sample shows.

Every labelled run reports how many kept samples the judge assigns to their target class (manifest column
`judged_label`, `run.json` `label_fidelity`), and `--label-filter` rejects the ones it assigns elsewhere.
The judge:
- the shipped digit classifier, when the run uses the shipped prior and the class folders are digits
  (trained on the prior's training split, never on the references; it sees decoded images);
- otherwise a k-nearest-neighbour vote among the labelled references in the model's latent space (the
  evaluation feature space of `augment eval` for user models).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..measures.metrics import knn_predict

#: Neighbours of the k-NN vote.
KNN_K = 5

#: The shipped classifier "reads" images when its accuracy on them (labelled) or its mean top-class probability
#: (unlabelled) is at least this: its features then score the pilot, its readings give pseudo-classes.
READABLE = 0.8


@dataclass
class LabelJudge:
    """``judge(latents, images)`` -> run class ids [n] (−1: a class the run does not have)."""

    name: str
    description: str
    needs_images: bool
    predict: Callable[[Tensor, Tensor | None], Tensor]

    def __call__(self, latents: Tensor, images: Tensor | None = None) -> Tensor:
        if self.needs_images and images is None:
            raise ValueError(f"the {self.name} label judge needs decoded images")
        if len(latents) == 0:
            return torch.zeros(0, dtype=torch.long)
        return self.predict(latents, images).long().cpu()


def knn_judge(ref_latents: Tensor, ref_labels: Tensor, k: int = KNN_K) -> LabelJudge:
    """Majority class among the k nearest labelled references (flattened latents, Euclidean)."""
    refs = ref_latents.detach().flatten(1).double().cpu()
    labels = ref_labels.detach().long().cpu()

    def predict(latents: Tensor, images: Tensor | None) -> Tensor:
        return knn_predict(latents.detach().flatten(1).double().cpu(), refs, labels, k=k)

    return LabelJudge(
        "knn",
        f"{min(k, len(labels))}-NN vote among the {len(labels)} labelled references in the model's latent space",
        False,
        predict,
    )


def classifier_judge(classifier: torch.nn.Module, class_names: list[str]) -> LabelJudge | None:
    """The shipped `DigitClassifier` on decoded images; None unless every class folder is a digit it knows."""
    from ..measures.features import classifier_extractor
    from ..models.generation import model_label_map

    label_map = model_label_map(class_names, int(classifier.config["num_classes"]))
    if label_map is None:
        return None
    to_run = {digit: cid for cid, digit in label_map.items()}
    features = classifier_extractor(classifier)

    @torch.no_grad()
    def predict(latents: Tensor, images: Tensor | None) -> Tensor:
        assert images is not None
        digits = torch.cat([classifier.fc(features.fn(c)).argmax(1).cpu() for c in images.split(256)])
        return torch.tensor([to_run.get(int(d), -1) for d in digits], dtype=torch.long)

    return LabelJudge(
        "classifier", "the shipped digit classifier (independent of guidance) on decoded images", True, predict
    )


def make_judge(model_spec: str | None, ref_latents: Tensor, ref_labels: Tensor | None, class_names: list[str] | None):
    """The run's judge (None for an unlabelled run): the shipped classifier where it applies, else k-NN."""
    if ref_labels is None or class_names is None:
        return None
    if model_spec in (None, "shipped"):
        from ..measures.features import load_shipped_classifier, shipped_classifier_available

        if shipped_classifier_available():
            judge = classifier_judge(load_shipped_classifier(), class_names)
            if judge is not None:
                return judge
    return knn_judge(ref_latents, ref_labels)


def label_filter_on(setting: bool | str, judge: LabelJudge | None) -> bool:
    """Whether the job rejects samples its label judge assigns to another class: `--label-filter` on or off, or
    under `auto` where the judge is the shipped digit classifier (an independent judge; a k-NN vote among the
    references is too coarse for other models: it rejected half of tiny test models' samples)."""
    if judge is None:
        return False
    return judge.name == "classifier" if setting == "auto" else bool(setting)


def agreement(judged: Tensor, target: Tensor, class_names: list[str]) -> dict:
    """{"agreed", "judged", "rate", "per_class": {name: {"agreed", "judged", "rate"}}} of judged vs target."""
    judged, target = judged.long().cpu(), target.long().cpu()
    per_class = {}
    for c, name in enumerate(class_names):
        members = target == c
        n = int(members.sum())
        if n:
            a = int((judged[members] == c).sum())
            per_class[name] = {"agreed": a, "judged": n, "rate": a / n}
    total = int(len(target))
    agreed = int((judged == target).sum())
    return {"agreed": agreed, "judged": total, "rate": agreed / total if total else None, "per_class": per_class}
