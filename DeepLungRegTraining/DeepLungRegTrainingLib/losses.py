"""Supervised displacement losses (masked), as in Eppenhof & Pluim 2018 (L1) and 2019 (L2)."""

from __future__ import annotations

import torch


def masked_displacement_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                             kind: str = "l1") -> torch.Tensor:
    """Mean over masked voxels of the per-voxel error of ``(B, 3, D, H, W)`` displacements.

    ``l1``: sum of absolute component errors; ``l2``: squared Euclidean error. ``mask`` is
    ``(B, 1, D, H, W)``; an empty mask falls back to the whole volume.
    """
    diff = pred - target
    per_voxel = diff.abs().sum(dim=1, keepdim=True) if kind == "l1" else (diff**2).sum(dim=1, keepdim=True)
    if kind not in ("l1", "l2"):
        raise ValueError(f"unknown loss {kind!r}")
    weight = mask.float()
    total = weight.sum()
    if total < 1:
        return per_voxel.mean()
    return (per_voxel * weight).sum() / total


def endpoint_error_mm(pred: torch.Tensor, target: torch.Tensor, spacing_xyz: torch.Tensor) -> torch.Tensor:
    """Per-voxel end-point error ``(B, D, H, W)`` in mm for voxel fields on a grid of the given spacing."""
    return ((pred - target) * spacing_xyz.view(1, 3, 1, 1, 1)).norm(dim=1)
