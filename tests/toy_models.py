"""A toy model for the ``package.module:factory`` backbone spec in tests."""

from torch import nn


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )


def thumbnail() -> nn.Module:
    """Features = the normalised image averaged down to 4 x 4 (48 values): distinct images are far
    apart, re-encoded copies nearly identical (the retrieval and leak tests)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 2))
