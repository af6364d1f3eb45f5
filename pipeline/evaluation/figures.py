"""The figures of an evaluation report: sample grids, filter scores, nearest-reference distances, closest
pairs, the strength pilot."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..measures import metrics as M

__all__ = ["run_figures"]


def run_figures(
    kept_images: Tensor,
    rej_images: Tensor | None,
    held_images: Tensor,
    guid_images: Tensor | None,
    mem_images: Tensor,
    mem: M.MemorisationResult | None,
    scores: np.ndarray,
    kept: np.ndarray,
    feature_name: str,
    pilot: dict[str, Any] | None = None,
) -> list[tuple[str, bytes, str]]:
    from .report import grids_figure, histogram_figure, pairs_figure, pilot_figure

    figures = []
    panels = [("kept samples", kept_images)]
    if rej_images is not None and len(rej_images):
        panels.append(("rejected samples", rej_images))
    panels.append(("held-out references", held_images))
    if guid_images is not None:
        panels.append(("guidance references", guid_images))
    figures.append(("Sample grids", grids_figure(panels), "Random samples of each set, side by side."))
    figures.append(
        (
            "Filter scores",
            histogram_figure(
                {"kept": scores[kept], "rejected": scores[~kept]},
                title="per-sample MMD² contribution (every generated sample)",
                xlabel="leave-one-out MMD² contribution (lower = helps alignment)",
            ),
            "The filter keeps the lowest scores of each shard; overlap means the filter separates little.",
        )
    )
    if mem is not None:
        figures.append(
            (
                "Nearest-reference distances",
                histogram_figure(
                    {
                        "sample → nearest guidance reference": mem.sample_nn_distance,
                        "reference → nearest other reference": mem.reference_nn_distance,
                    },
                    title=f"nearest-neighbour distances ({feature_name} features)",
                    xlabel="Euclidean distance",
                    vlines={"copy threshold": mem.threshold},
                ),
                "Samples far left of the references' own distances are suspiciously close to one reference.",
            )
        )
        order = torch.argsort(mem.sample_nn_distance)[:8]
        figures.append(
            (
                "Closest pairs",
                pairs_figure(
                    kept_images[order],
                    mem_images[mem.nearest_reference[order]],
                    mem.sample_nn_distance[order].tolist(),
                    mem.is_copy[order].tolist(),
                ),
                f"The kept samples nearest to a guidance reference ({feature_name} features), above that reference; "
                "near-copies in red.",
            )
        )
    if pilot and pilot.get("candidates"):
        figures.append(
            (
                "Strength pilot",
                pilot_figure(pilot),
                "MMD² of each candidate strength's pilot batch to the held-out references; crosses violate a "
                "fidelity constraint (precision, coverage, class histogram, garbage); the circle is the choice.",
            )
        )
    return figures
