"""Supervised displacement losses (masked), as in Eppenhof & Pluim 2018 (L1) and 2019 (L2)."""

from __future__ import annotations

import torch


def masked_displacement_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                             kind: str = "l1") -> torch.Tensor:
    """Mean over the batch of each pair's mean masked per-voxel error of ``(B, 3, D, H, W)`` displacements.

    ``l1``: sum of absolute component errors; ``l2``: squared Euclidean error. ``mask`` is
    ``(B, 1, D, H, W)``; a pair with an empty mask falls back to its whole volume. Averaging
    per pair makes the loss of a batch split over data-parallel workers average to the same
    gradient as the whole batch in one process.
    """
    if kind not in ("l1", "l2"):
        raise ValueError(f"unknown loss {kind!r}")
    diff = pred - target
    per_voxel = diff.abs().sum(dim=1, keepdim=True) if kind == "l1" else (diff**2).sum(dim=1, keepdim=True)
    weight = mask.to(per_voxel.dtype)
    dims = tuple(range(1, per_voxel.ndim))
    total = weight.sum(dims)
    masked = (per_voxel * weight).sum(dims) / total.clamp(min=1.0)
    per_pair = torch.where(total >= 1, masked, per_voxel.mean(dims))
    return per_pair.mean()


def endpoint_error_mm(pred: torch.Tensor, target: torch.Tensor, spacing_xyz: torch.Tensor) -> torch.Tensor:
    """Per-voxel end-point error ``(B, D, H, W)`` in mm for voxel fields on a grid of the given spacing."""
    return ((pred - target) * spacing_xyz.view(1, 3, 1, 1, 1)).norm(dim=1)
