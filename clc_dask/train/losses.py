"""The training loss: cross-entropy (optionally class-weighted) plus Dice."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clc_dask.classes import IGNORE_INDEX
from clc_dask.patches import PatchIndex

#: ``TrainConfig.class_weights`` → power of the inverse pixel frequency.
CLASS_WEIGHT_POWERS = {"inverse-frequency": 1.0, "inverse-sqrt-frequency": 0.5}


def class_weights(index: PatchIndex, power: float = 1.0) -> torch.Tensor:
    """Inverse pixel frequency (to ``power``) of each class in the training split, mean 1 over
    present classes; absent classes get 0."""
    stats = index.class_statistics()
    counts = stats["train_pixels"].to_numpy(dtype=np.float64)
    weights = np.where(counts > 0, (counts.sum() / np.maximum(counts, 1)) ** power, 0.0)
    present = weights > 0
    weights[present] /= weights[present].mean()
    return torch.tensor(weights, dtype=torch.float32)


class SegmentationLoss(nn.Module):
    """Cross-entropy over labelled pixels (255 ignored), plus multiclass Dice for ``"ce+dice"``.

    Args:
        loss: ``"ce"`` or ``"ce+dice"``.
        weights: cross-entropy weight per class (None = equal).
    """

    def __init__(self, loss: str, weights: torch.Tensor | None) -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss(weight=weights, ignore_index=IGNORE_INDEX)
        self.dice: nn.Module | None = None
        if loss == "ce+dice":
            # imported where used, as in clc_dask.model: the command line starts without it
            import segmentation_models_pytorch as smp

            self.dice = smp.losses.DiceLoss("multiclass", ignore_index=IGNORE_INDEX)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of (N, K, H, W) logits against (N, H, W) class indices."""
        loss = self.ce(logits, target)
        if self.dice is not None:
            loss = loss + self.dice(logits, target)
        return loss
