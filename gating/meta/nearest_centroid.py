"""The sanity floor: a raw-pixel nearest-class-mean classifier on the same support/query split."""

from __future__ import annotations

import torch


def nearest_centroid_accuracy(
    support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, query_y: torch.Tensor
) -> float:
    classes = torch.unique(support_y)
    flat = support_x.flatten(1)
    centroids = torch.stack([flat[support_y == c].mean(dim=0) for c in classes])
    nearest = torch.cdist(query_x.flatten(1), centroids).argmin(dim=1)
    return int((classes[nearest] == query_y).sum()) / len(query_y)
