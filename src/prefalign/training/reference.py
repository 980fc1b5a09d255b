"""The reference pass: reference log-probs of every pair, computed once when training starts, kept by row.

It runs inside the trainer when training begins (`PreferenceTrainer`'s callback), after `accelerator.prepare`:
on the accelerator's device, with the model as prepared (DDP, FSDP), in the batch layout (packed or not)
and under the autocast the policy trains in — so before any update a DPO loss is exactly log 2. Each
process scores the batches of the sharded dataloader it will train on (so in bf16 too the values match the
first epoch's batches exactly) and the results are gathered, so every process holds the whole table.

The values are stored twice: in the run folder (`reference_logps/`, which is what a resumed run reads —
its policy has trained weights by then, so they could not be recomputed) and in a cache shared by runs
(`~/.cache/prefalign/ref_logps`), keyed by everything they depend on: model, weights and its whole config
(a RoPE, soft-cap or sliding-window override changes the numbers, not the weights), revision, dtype, attention
implementation, the device the pass runs on, fp32 matmul precision, batch layout, data, settings and the
prefalign/transformers/torch versions.
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

from ..modeling import pair_logps, unwrap
from ..modeling.sequence_weights import length_desensitized

log = logging.getLogger(__name__)

KINDS = ("chosen_sum", "rejected_sum", "chosen_mean", "rejected_mean")
RUN_FOLDER = "reference_logps"  # inside output_dir: {split}.safetensors


def default_cache_dir() -> Path:
    from ..models import cache_dir

    return cache_dir() / "ref_logps"


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """Cheap but weight-sensitive: name, shape, dtype, sum and first values of every parameter."""
    h = hashlib.sha256()
    for name, p in unwrap(model).state_dict().items():
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


# Config entries left out of the config's hash: each is already in the key under its own name (the
# folder "model", the "transformers" version), and neither changes a log-prob by itself.
CONFIG_KEYS_KEPT_ELSEWHERE = ("_name_or_path", "transformers_version")


def config_fingerprint(config) -> str | None:
    """The model's whole config (every field a forward pass may read), hashed."""
    if config is None:
        return None
    values = {k: v for k, v in config.to_dict().items() if k not in CONFIG_KEYS_KEPT_ELSEWHERE}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def device_label(device: torch.device | str) -> str:
    """The device type, and for a GPU its model: kernels (and so the last bits of a log-prob) differ by both."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda {torch.cuda.get_device_name(device)}"
    return device.type


def data_identity(dataset) -> str:
    """A `datasets.Dataset`'s fingerprint (it follows the source and every map, the tokenizer and chat
    template included); for a dataset without one, a hash of its rows' token ids."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint:
        return fingerprint
    h = hashlib.sha256()
    for i in range(len(dataset)):
        row = dataset[i]
        h.update(json.dumps([row.get(c) for c in ("row_index", "prompt_input_ids", "chosen_input_ids",
                                                  "rejected_input_ids")], default=str).encode())
    return "rows:" + h.hexdigest()[:16]


def _layout(collator) -> dict | None:
    """The collator's class and its plain settings (pad id, whether unshared rows are kept)."""
    if collator is None:
        return None
    plain = {k: v for k, v in vars(collator).items() if isinstance(v, (bool, int, float, str, type(None)))}
    return {"class": type(collator).__name__, **plain}


def cache_key(model: torch.nn.Module, dataset, settings: dict, collator=None, device=None) -> str:
    """Everything the cached numbers depend on: the model, its weights and whole config, attention
    implementation and dtype, the device (`device`, else where the model's parameters are) and fp32 matmul
    precision, the data, the batch layout, the settings and the library versions."""
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    parameters = next(inner.parameters())
    parts = {
        "model": getattr(inner, "name_or_path", type(inner).__name__),
        "revision": getattr(config, "_commit_hash", None),
        "weights": weights_fingerprint(inner),
        "config": config_fingerprint(config),
        "dtype": str(parameters.dtype),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "device": device_label(device if device is not None else parameters.device),
        # TF32 (precision "high") rounds fp32 matmuls on a GPU; set globally, e.g. by TrainingArguments.tf32
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
        "layout": _layout(collator),
        "data": data_identity(dataset),
        "n": len(dataset),
        **_versions(),
        **settings,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


@torch.no_grad()
def score_reference(model, loader, n_rows: int, *, accelerator=None, autocast=None, packed: bool = True,
                    ld_alpha: float | None = None) -> dict[str, torch.Tensor]:
    """{kind: [N]} reference log-probs of every pair, indexed by `row_index`, on every process.

    `loader` is the (sharded) dataloader the policy trains on: each process scores the batches it will train
    on, in the same composition — which is what makes bf16 values agree with the first epoch's — and the
    results are gathered. `packed=False` scores a packed batch's unshared rows (a reference model of another
    family may refuse the packed layout). With `ld_alpha` (LD-DPO) the sums and means are length-desensitized."""
    device = accelerator.device if accelerator is not None else next(unwrap(model).parameters()).device
    was_training = model.training
    model.eval()
    values, rows = [], []
    try:
        for batch in loader:
            b = batch["row_index"].shape[0]
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            if not packed:
                batch = {k: v for k, v in batch.items() if not k.startswith("packed_")}
            with autocast() if autocast else torch.autocast(device.type, enabled=False):
                lp = pair_logps(model, batch)
            sums, means = (lp.sum, lp.mean) if ld_alpha is None else length_desensitized(lp, ld_alpha)
            values.append(torch.stack([sums[:b], sums[b:], means[:b], means[b:]], dim=1).float())
            rows.append(batch["row_index"])
    finally:
        model.train(was_training)
    local = torch.cat(values) if values else torch.zeros(0, 4, device=device)
    local_rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long, device=device)
    if accelerator is not None and accelerator.num_processes > 1:
        local = accelerator.pad_across_processes(local, dim=0, pad_index=float("nan"))
        local_rows = accelerator.pad_across_processes(local_rows, dim=0, pad_index=-1)
        local, local_rows = accelerator.gather(local), accelerator.gather(local_rows)
    keep = local_rows >= 0
    local, local_rows = local[keep].cpu(), local_rows[keep].cpu()
    table = torch.full((int(local_rows.max()) + 1 if len(local_rows) else 0, 4), float("nan"))
    table[local_rows] = local  # a pair a sampler repeated (to even out the processes) gets the same values
    if len(torch.unique(local_rows)) != n_rows:
        raise RuntimeError(f"reference pass scored {len(torch.unique(local_rows))} of {n_rows} pairs")
    return {kind: table[:, i].contiguous() for i, kind in enumerate(KINDS)}


class LazyLoader:
    """An iterable that builds its dataloader only when iterated (values found on disk need none)."""

    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return iter(self.make())


def _atomic_save(values: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file(values, tmp)
    os.replace(tmp, path)  # atomic: a killed run never leaves half a file


def run_folder_file(output_dir, split: str) -> Path:
    return Path(output_dir) / RUN_FOLDER / f"{split}.safetensors"


class ReferenceTable:
    """Reference log-probs looked up by the batch's `row_index` ({kind: [max row + 1]}, NaN where absent)."""

    def __init__(self, values: dict[str, torch.Tensor]):
        self.values = values

    def lookup(self, row_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums, means), each [2B]: chosen then rejected, on `row_index`'s device."""
        rows = row_index.cpu()
        n = self.values["chosen_sum"].shape[0]
        if (rows >= n).any() or torch.isnan(self.values["chosen_sum"][rows.clamp(max=n - 1)]).any():
            raise KeyError(f"no reference log-probs for some of rows {rows.tolist()[:10]}")
        v = {k: t[rows].to(row_index.device) for k, t in self.values.items()}
        return (torch.cat([v["chosen_sum"], v["rejected_sum"]]), torch.cat([v["chosen_mean"], v["rejected_mean"]]))


def reference_table(model, loader, dataset, collator, *, split: str, output_dir, settings: dict,
                    accelerator=None, autocast=None, cache_dir=None, resuming: bool = False,
                    is_main: bool = True, packed: bool = True) -> tuple[ReferenceTable, dict]:
    """The run folder's values for `split` when it has them; else the shared cache's; else computed now over
    `loader`. Written to both (by the main process). A resumed run must find them in its run folder."""
    own = run_folder_file(output_dir, split)
    # the device the pass runs on: the accelerator's (the model may still be on the CPU before `prepare`)
    key = cache_key(model, dataset, settings, collator, device=accelerator.device if accelerator else None)
    shared = (Path(cache_dir) if cache_dir else default_cache_dir()) / f"{key}.safetensors"
    have_own, have_shared = own.exists(), shared.exists()
    if accelerator is not None and accelerator.num_processes > 1:
        # Agreed on every process: one that loads while another computes would leave the other in a collective.
        seen = torch.tensor([have_own, have_shared], dtype=torch.float32, device=accelerator.device)
        seen = accelerator.reduce(seen, reduction="sum") == accelerator.num_processes
        have_own, have_shared = bool(seen[0]), bool(seen[1])
    if have_own:
        values, source = load_file(str(own)), "run folder"
    elif resuming:
        from ..errors import PrefalignError

        raise PrefalignError(f"resume: {own} is missing, and the reference log-probs cannot be recomputed from "
                             "the trained weights; start the run again or use reference: model")
    elif have_shared:
        values, source = load_file(str(shared)), "cache"
    else:
        values = score_reference(model, loader, len(dataset), accelerator=accelerator, autocast=autocast, packed=packed,
                                 ld_alpha=settings.get("ld_alpha"))
        source = "computed"
        if is_main:
            _atomic_save(values, shared)
    if is_main and not have_own:
        _atomic_save(values, own)
    log.info("reference log-probs (%s): %s, %d pairs (%s)", split, source, len(dataset), shared)
    return ReferenceTable(values), {"split": split, "source": source, "path": str(shared), "key": key}
