"""Class accuracy of a labelled run's kept samples: an independent classifier (the user's, or the shipped
digit classifier for shipped-prior runs with digit class folders), and a k-NN vote among the held-out
references in the feature space, each with its real-data ceiling or baseline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..measures import metrics as M
from ..measures.features import load_shipped_classifier, shipped_classifier_available
from .warnings_log import Warnings

__all__ = ["class_accuracy_metrics"]


def class_accuracy_metrics(
    cfg,
    class_names,
    kept_images,
    sample_labels,
    held_images,
    held_labels,
    f_kept,
    f_held,
    f_guid,
    guid_labels,
    classifier,
    device,
    k,
    warns: Warnings,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    predict: Callable[[Tensor], Tensor] | None = None
    description = ""
    if classifier is not None:
        from pipeline.models.adapters import load_object

        fn = load_object(classifier)

        def predict(images: Tensor) -> Tensor:
            return torch.cat([torch.as_tensor(fn(c)).detach().cpu().argmax(1) for c in images.split(256)])

        description = f"user classifier {classifier}"
    elif cfg.get("model") in (None, "shipped") and shipped_classifier_available():
        from pipeline.models.generation import model_label_map
        from pipeline.models.loading import resolve_device

        from ..measures.features import classifier_extractor

        clf = load_shipped_classifier(device=resolve_device(device))
        label_map = model_label_map(class_names, int(clf.config["num_classes"]))
        if label_map is None:
            warns.add("class folders are not digits: the shipped digit classifier cannot score these classes")
        else:
            to_run = {digit: cid for cid, digit in label_map.items()}
            feats = classifier_extractor(clf)

            def predict(images: Tensor) -> Tensor:
                digits = torch.cat([clf.fc(feats.fn(c)).argmax(1).cpu() for c in images.split(256)])
                return torch.tensor([to_run.get(int(d), -2) for d in digits], dtype=torch.long)

            description = "shipped digit classifier (independent of guidance)"
    if predict is not None:
        with torch.no_grad():
            res = M.class_accuracy(predict(kept_images), sample_labels, class_names)
            out["classifier"] = dict(res, description=description + " on the kept samples")
            warns.extend(res["warnings"], "class accuracy")
            if held_labels is not None and bool((held_labels >= 0).any()):
                ceiling = M.class_accuracy(predict(held_images), held_labels, class_names)
                out["classifier_on_references"] = dict(
                    ceiling, description=description + " on the held-out references (its ceiling)"
                )
    if held_labels is not None and bool((held_labels >= 0).any()):
        use = held_labels >= 0
        pred = M.knn_predict(f_kept, f_held[use], held_labels[use], k=k)
        res = M.class_accuracy(pred, sample_labels, class_names)
        out["knn"] = dict(res, description=f"{k}-NN vote among held-out references in the feature space")
        if f_guid is not None and guid_labels is not None and bool((guid_labels >= 0).any()):
            g = guid_labels >= 0
            base = M.class_accuracy(
                M.knn_predict(f_held[use], f_guid[g], guid_labels[g], k=k), held_labels[use], class_names
            )
            out["knn_real_baseline"] = dict(
                base, description=f"{k}-NN of held-out references among guidance references (real data)"
            )
    return out
