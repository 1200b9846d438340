"""The sanity floor: a raw-pixel nearest-class-mean classifier on the same support/query split."""

from __future__ import annotations

import warnings

import torch
from sklearn.neighbors import NearestCentroid


def nearest_centroid_accuracy(
    support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, query_y: torch.Tensor
) -> float:
    """Query accuracy of scikit-learn's ``NearestCentroid`` (Euclidean) fitted on the support
    images' pixels."""
    with warnings.catch_warnings():
        # it warns about constant pixels (image borders), which matter only to its shrinkage
        warnings.filterwarnings("ignore", "self.within_class_std_dev_", UserWarning)
        model = NearestCentroid().fit(support_x.flatten(1).cpu().numpy(), support_y.cpu().numpy())
    predicted = model.predict(query_x.flatten(1).cpu().numpy())
    return float((predicted == query_y.cpu().numpy()).mean())
