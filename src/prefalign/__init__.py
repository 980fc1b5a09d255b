"""prefalign: offline preference optimisation of causal language models.

    from prefalign import PreferenceConfig, PreferenceTrainer

(imported on first use, so `prefalign --help` does not load torch.)
"""

__version__ = "0.1.0"
__all__ = ["PreferenceConfig", "PreferenceTrainer"]


def __getattr__(name: str):
    if name == "PreferenceConfig":
        from .config import PreferenceConfig

        return PreferenceConfig
    if name == "PreferenceTrainer":
        from .training.trainer import PreferenceTrainer

        return PreferenceTrainer
    raise AttributeError(f"module 'prefalign' has no attribute {name!r}")
