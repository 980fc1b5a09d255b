"""Semi-online preference optimisation: rounds of sampling from the policy, scoring, pairing and training.

    from prefalign.online import run_online
    summary = run_online("recipe.yaml", ["--rounds", "4"])      # as `prefalign online recipe.yaml --rounds 4`

docs/online.md describes the keys, the records and the rewards.
"""

from __future__ import annotations

from .config import OnlineConfig, load_online
from .run import run_online

__all__ = ["OnlineConfig", "load_online", "run_online"]
