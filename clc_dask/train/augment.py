"""Data augmentation: random 90° rotations and flips, from a generator seeded per epoch."""

from __future__ import annotations

import numpy as np
import torch


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the augmentation generator of ``epoch``: a pure function of ``(seed, epoch)``."""
    return int(np.random.SeedSequence([int(seed), int(epoch), 0xA06]).generate_state(1, np.uint64)[0] >> 1)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The augmentation generator of ``epoch`` (resuming at an epoch gives the same draws)."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch))


def augment(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 90° rotation and horizontal flip per sample, identical for image (N,C,H,W) and labels (N,H,W)."""
    ops = torch.randint(0, 8, (x.shape[0],), generator=generator)
    xs, ys = [], []
    for xi, yi, op in zip(x, y, ops.tolist(), strict=True):
        k, flip = op % 4, op >= 4
        xi, yi = torch.rot90(xi, k, dims=(1, 2)), torch.rot90(yi, k, dims=(0, 1))
        if flip:
            xi, yi = torch.flip(xi, dims=(2,)), torch.flip(yi, dims=(1,))
        xs.append(xi)
        ys.append(yi)
    return torch.stack(xs), torch.stack(ys)
