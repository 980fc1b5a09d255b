"""Preference losses. One entry point for the trainer, the tests and outside users:

    from prefalign.losses import compute_loss, LOSSES
    out = compute_loss("amapo", policy_chosen_logps, policy_rejected_logps, beta=2.0)
    out.losses.mean().backward()
"""

from . import amapo as _amapo  # noqa: F401  (registers the loss)
from . import ema_margins as _ema_margins  # noqa: F401
from . import offsets as _offsets  # noqa: F401
from . import per_response as _per_response  # noqa: F401
from . import reference_based as _reference_based  # noqa: F401
from . import reference_free as _reference_free  # noqa: F401
from . import sorted_pairs as _sorted_pairs  # noqa: F401
from .amapo import adaptive_margin
from .base import LOSSES, SIDE_INPUTS, LossOutput, LossSpec, compute_loss, get_loss, gradient_allocation

__all__ = ["LOSSES", "SIDE_INPUTS", "LossOutput", "LossSpec", "adaptive_margin", "compute_loss", "get_loss", "gradient_allocation"]
