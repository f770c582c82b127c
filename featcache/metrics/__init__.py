"""Scores of predicted probabilities (``scores``), their confidence intervals (``intervals``) and
calibration (``calibration``)."""
