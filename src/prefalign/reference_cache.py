"""Reference log-probs computed in one pass before training and cached on disk.

The cache key covers the reference model (its name and a fingerprint of its weights), the tokenized data
(the `datasets` fingerprint, which follows the source files and the tokenization function and settings)
and the tokenization limits, so a second run with the same inputs loads instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from .modeling import pair_logps

log = logging.getLogger(__name__)

KINDS = ("chosen_sum", "rejected_sum", "chosen_mean", "rejected_mean")


def default_cache_dir() -> Path:
    from .models import cache_dir

    return cache_dir() / "ref_logps"


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """Cheap but weight-sensitive: name, shape, dtype, sum and first values of every parameter."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().flatten()
        h.update(f"{name}{tuple(p.shape)}{p.dtype}{float(flat.double().sum()):.10e}".encode())
        h.update(flat[:8].double().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("prefalign", "transformers", "torch"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def cache_key(model: torch.nn.Module, dataset, settings: dict, collator=None) -> str:
    """Everything the cached numbers depend on: the model and its weights, attention implementation and
    dtype, the data, the batch layout (packed or not), the settings and the library versions."""
    config = getattr(model, "config", None)
    parts = {
        "model": getattr(model, "name_or_path", type(model).__name__),
        "revision": getattr(config, "_commit_hash", None),
        "weights": weights_fingerprint(model),
        "dtype": str(next(model.parameters()).dtype),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "layout": type(collator).__name__ if collator is not None else None,
        "data": getattr(dataset, "_fingerprint", None),
        "n": len(dataset),
        **_versions(),
        **settings,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


@torch.no_grad()
def compute_reference_logps(model, dataset, collator, *, batch_size: int, autocast=None) -> dict[str, torch.Tensor]:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {k: [] for k in KINDS}
    try:
        for batch in loader:
            b = batch["row_index"].shape[0]
            ctx = autocast() if autocast else torch.autocast(device.type, enabled=False)
            with ctx:
                lp = pair_logps(model, {k: v.to(device) for k, v in batch.items()})  # the collator's layout
            for kind, values in (("sum", lp.sum), ("mean", lp.mean)):
                out[f"chosen_{kind}"].append(values[:b].float().cpu())
                out[f"rejected_{kind}"].append(values[b:].float().cpu())
    finally:
        model.train(was_training)
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in out.items()}


def with_reference_logps(model, dataset, collator, *, batch_size: int, settings: dict, cache_dir=None, autocast=None):
    """The dataset with columns ref_{chosen,rejected}_logps_{sum,mean}, from the cache when it has them."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = cache_key(model, dataset, settings, collator)
    path = cache_dir / f"{key}.safetensors"
    if path.exists():
        values = load_file(str(path))
        log.info("reference log-probs: loaded %d pairs from %s", len(dataset), path)
        reused = True
    else:
        values = compute_reference_logps(model, dataset, collator, batch_size=batch_size, autocast=autocast)
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
        os.close(fd)
        save_file(values, tmp)
        os.replace(tmp, path)  # atomic: a killed run never leaves half a cache file
        log.info("reference log-probs: computed %d pairs, cached at %s", len(dataset), path)
        reused = False
    if values["chosen_sum"].shape[0] != len(dataset):
        raise RuntimeError(f"reference cache {path} has {values['chosen_sum'].shape[0]} pairs, expected {len(dataset)}")
    for kind in KINDS:
        side, agg = kind.split("_")
        dataset = dataset.add_column(f"ref_{side}_logps_{agg}", values[kind].tolist())
    return dataset, {"path": str(path), "reused": reused}
