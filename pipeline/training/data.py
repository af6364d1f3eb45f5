"""The training data split of the shipped prior."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.models import prior_data

from .config import TrainConfig


@dataclass
class Split:
    data: prior_data.PriorData
    train: torch.Tensor  # indices into data
    heldout: torch.Tensor


def load_data(cfg: TrainConfig) -> Split:
    if cfg.data == "mnist":
        data = prior_data.load_mnist()
    else:
        data = prior_data.load_image_folder(cfg.data, cfg.image_size, cfg.channels)
    if cfg.smoke_images:
        keep = prior_data.heldout_split(data.labels, cfg.smoke_images / len(data.labels), cfg.seed + 1)
        data = dataclasses.replace(
            data,
            images=data.images[keep],
            labels=data.labels[keep],
            item_names=[data.item_names[i] for i in keep],
        )
    if cfg.data == "mnist" and not cfg.smoke_images:
        held = prior_data.mnist_split()[1]  # fixed and recorded: 100 per class, whatever the training seed
    else:
        held = prior_data.heldout_split(data.labels, cfg.heldout_fraction, cfg.seed)
    mask = np.ones(len(data.labels), dtype=bool)
    mask[held] = False
    return Split(data, torch.as_tensor(np.flatnonzero(mask)), torch.as_tensor(held))
