"""Hand-written scalar maths for the loss tests: plain floats and `math`, never torch or library code."""

import math


def log_sigmoid(x: float) -> float:
    """log σ(x) = −log(1 + e^(−x)), written in the form that does not overflow for either sign of x."""
    if x >= 0:
        return -math.log1p(math.exp(-x))
    return x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return math.exp(log_sigmoid(x))
