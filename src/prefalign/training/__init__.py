"""Training: the trainer and what it is built from.

- `trainer`: `PreferenceTrainer` — compute_loss, log, evaluate.
- `collate`: the training batch (pairs, SPO's degraded responses).
- `reference`: the reference pass when training begins, and its caching.
- `callbacks`: metrics file, non-finite guard, SPO head gradient and epoch, the reference pass hook.
- `checkpointing`: checkpoints that appear whole or not at all; SIGTERM.
- `distributed`: collectives whose shape never depends on per-rank state.
- `pipeline`: config → data → model → start-up checks → trainer → run folder (what `prefalign train` runs).
"""

from .pipeline import build_trainer, load_policy, prepare_data, train
from .trainer import PreferenceTrainer

__all__ = ["PreferenceTrainer", "build_trainer", "load_policy", "prepare_data", "train"]
