"""Which prompt each sample of a text-to-image run is made with: a pure function of the run seed, the sample's
global index and its target class, so a sample's prompt never depends on its batch, shard or process.

Three sources, from the one config:
- `--prompt TEXT`: every sample's;
- `--class-prompt TEMPLATE` with class sub-folders: each class's prompt, the folder name in `{}`;
- the references' captions (sidecar `<image>.txt`, `metadata.jsonl`, `captions.jsonl/.csv`): each sample draws
  the caption of one reference (of its class, in labelled runs), uniformly over the references, so captions
  come in the references' proportions; the draw is seeded by (run seed, index).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..seeding import derive_seed

PromptSource = Literal["prompt", "class", "captions"]


@dataclass(frozen=True)
class SamplePrompts:
    """The prompt table of a run and the rule that gives each sample its prompt."""

    table: tuple[str, ...]  # the distinct prompts (each encoded once per job)
    source: PromptSource
    seed: int = 0
    fixed: int | None = None  # "prompt": every sample's prompt id
    by_class: tuple[int, ...] | None = None  # "class": class id -> prompt id
    pools: tuple[tuple[int, ...], ...] | None = None  # "captions": per class (one pool if unlabelled), the
    # prompt id of each reference in it (duplicates keep the references' proportions)

    @classmethod
    def single(cls, prompt: str) -> SamplePrompts:
        return cls((prompt,), "prompt", fixed=0)

    @classmethod
    def for_classes(cls, template: str, class_names: Sequence[str]) -> SamplePrompts:
        texts = [template.format(name) for name in class_names]
        table = tuple(dict.fromkeys(texts))
        return cls(table, "class", by_class=tuple(table.index(t) for t in texts))

    @classmethod
    def from_captions(
        cls, captions: Sequence[str], labels: torch.Tensor | None, num_classes: int | None, seed: int
    ) -> SamplePrompts:
        """Captions of the (guidance) references; `labels` their classes (None: unlabelled)."""
        table = tuple(dict.fromkeys(captions))
        ids = [table.index(c) for c in captions]
        if labels is None:
            pools = (tuple(ids),)
        else:
            pools = tuple(
                tuple(i for i, c in zip(ids, labels.tolist(), strict=True) if c == k) for k in range(num_classes or 0)
            )
        return cls(table, "captions", seed=seed, pools=pools)

    def ids(self, indices: Sequence[int], labels: torch.Tensor | None = None) -> list[int]:
        """The prompt id of each sample (global `indices`, target classes `labels` or None)."""
        if self.source == "prompt":
            return [int(self.fixed or 0)] * len(indices)
        classes = labels.tolist() if labels is not None else [0] * len(indices)
        if self.source == "class":
            if labels is None:
                raise ValueError("class prompts need each sample's class")
            return [self.by_class[c] for c in classes]
        out = []
        for index, c in zip(indices, classes, strict=True):
            pool = self.pools[c] if c < len(self.pools) else ()
            if not pool:  # a class without references has no caption to draw: any reference's
                pool = tuple(i for p in self.pools for i in p)
            out.append(pool[derive_seed("prompt", self.seed, int(index)) % len(pool)])
        return out

    def texts(self, indices: Sequence[int], labels: torch.Tensor | None = None) -> list[str]:
        return [self.table[i] for i in self.ids(indices, labels)]

    def record(self) -> dict[str, Any]:
        """For run.json: where the prompts come from and the first few of them."""
        return {"source": self.source, "distinct": len(self.table), "examples": list(self.table[:5])}
