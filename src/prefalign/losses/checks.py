"""Hyperparameter checks shared by the losses: one clear line for an impossible value."""

import math


def check_beta(beta: float) -> None:
    if not (isinstance(beta, int | float) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive number, got {beta!r}")


def check_label_smoothing(eps: float) -> None:
    if not (isinstance(eps, int | float) and 0 <= eps < 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {eps!r}")
