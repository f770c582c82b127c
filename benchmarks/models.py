"""Small models for benchmarks that measure featcache itself rather than a network."""

from torch import nn


def tiny_cnn() -> nn.Module:
    """A few-kFLOP CNN: at 16 px the extraction loop, not the model, dominates."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
