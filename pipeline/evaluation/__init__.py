"""`augment eval`: the run evaluation and its HTML report, over the measurement room `pipeline.measures`.

- `pipeline.measures.metrics` (its names re-exported here): pure functions on features [n, F] (MMD² +
  permutation test, KID, Fréchet distance, precision/recall/density/coverage, memorisation, class
  accuracy, filter-score summaries);
- `pipeline.measures.features`: image -> feature maps (shipped classifier, VAE latents, pixels, user
  `pkg.mod:fn`);
- `report`: matplotlib figures and the self-contained report.html;
- `run_eval.evaluate_run`: a run folder -> eval.json + report.html; `run_eval.compare_sets` for studies.

Names are imported lazily, so registering the `eval` command (`pipeline.evaluation.cli`) does not pull
in torch, pyarrow or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "MemorisationResult": "pipeline.measures.metrics",
    "class_accuracy": "pipeline.measures.metrics",
    "class_histogram": "pipeline.measures.metrics",
    "garbage": "pipeline.measures.metrics",
    "filter_score_summary": "pipeline.measures.metrics",
    "frechet_distance": "pipeline.measures.metrics",
    "frechet_distance_from_stats": "pipeline.measures.metrics",
    "kid": "pipeline.measures.metrics",
    "knn_predict": "pipeline.measures.metrics",
    "memorisation": "pipeline.measures.metrics",
    "mmd2_permutation_test": "pipeline.measures.metrics",
    "nearest_neighbour_distances": "pipeline.measures.metrics",
    "pairwise_distances": "pipeline.measures.metrics",
    "prdc": "pipeline.measures.metrics",
    "score_summary": "pipeline.measures.metrics",
    "compare_sets": "pipeline.evaluation.run_eval",
    "evaluate_run": "pipeline.evaluation.run_eval",
}

__all__ = [
    "MemorisationResult",
    "class_accuracy",
    "class_histogram",
    "compare_sets",
    "evaluate_run",
    "filter_score_summary",
    "frechet_distance",
    "frechet_distance_from_stats",
    "garbage",
    "kid",
    "knn_predict",
    "memorisation",
    "mmd2_permutation_test",
    "nearest_neighbour_distances",
    "pairwise_distances",
    "prdc",
    "score_summary",
]
assert set(__all__) == set(_EXPORTS)

if TYPE_CHECKING:
    from ..measures.metrics import (
        MemorisationResult,
        class_accuracy,
        class_histogram,
        filter_score_summary,
        frechet_distance,
        frechet_distance_from_stats,
        garbage,
        kid,
        knn_predict,
        memorisation,
        mmd2_permutation_test,
        nearest_neighbour_distances,
        pairwise_distances,
        prdc,
        score_summary,
    )
    from .run_eval import compare_sets, evaluate_run


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline.evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
