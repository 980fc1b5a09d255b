"""The reference pass: reference log-probs of the pairs a run trains on and of its eval pairs, computed when
training begins, kept by row.

It runs inside the trainer when training begins (`ReferencePass`), after `accelerator.prepare`: on the
accelerator's device, with the model as prepared (DDP, FSDP), in the batch layout (packed or not) and under
the autocast the policy trains in — so before any update a DPO loss is exactly log 2. Each process scores the
batches of the sharded train dataloader it will train on, in their order and composition, and the results are
gathered, so every process holds the table. Only the batches the run reaches are scored: the first
`max_steps × gradient_accumulation_steps` of the first epoch (the sampler is seeded, so training draws the
same ones again), or the whole epoch when the run goes past it or the sampler is not a seeded one. Eval splits
are scored in full when training begins: an evaluation scores every eval pair, and after the first update the
reference (when it is the policy) no longer exists to score them later.

A table is stored in the run folder (`reference_logps/{split}.safetensors`, which is what a resumed run reads —
its policy has trained weights by then) and in a cache shared by runs (`~/.cache/prefalign/ref_logps`), keyed
by everything the numbers depend on: model, weights and its whole config (a RoPE, soft-cap or sliding-window
override changes the numbers, not the weights), revision, dtype, attention implementation, the device the pass
runs on, fp32 matmul precision, batch layout, data, settings and the prefalign/transformers/torch versions.
Which rows a table holds is not part of the key: a `scored` mask says which, and a run that needs rows the
table lacks (a longer run, a run killed during the pass) scores only those and adds them; the rows already
there are kept bit for bit. During the pass the tables are rewritten every `FLUSH_SECONDS`, each time whole and
atomically (a temporary file renamed over the old one) with a digest of its contents in the header; a file
that cannot be read or whose digest does not match is ignored and rewritten, never used.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import PrefalignError
from ..modeling import Layout, pair_logps, unwrap
from ..modeling.sequence_weights import length_desensitized

log = logging.getLogger(__name__)

KINDS = ("chosen_sum", "rejected_sum", "chosen_mean", "rejected_mean")
SCORED = "scored"  # bool [N] in a table file: which rows hold values
RUN_FOLDER = "reference_logps"  # inside output_dir: {split}.safetensors
FLUSH_SECONDS = 60.0  # the tables are written this often during the pass: a killed run loses at most this much
PROGRESS_STEP = 0.1  # without a terminal, a progress line at each 10 % of the pairs to score,
PROGRESS_SECONDS = 60.0  # and at least one a minute


def default_cache_dir() -> Path:
    from ..models import cache_dir

    return cache_dir() / "ref_logps"


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """Cheap but weight-sensitive: name, shape, dtype, sum and first values of every parameter. Under FSDP2 a
    parameter is a DTensor: every process gathers each one whole in turn (all call this together), so the key
    is the unsharded model's and a cached table serves a sharded run and an unsharded one alike."""
    h = hashlib.sha256()
    for name, p in unwrap(model).state_dict().items():
        if hasattr(p, "full_tensor"):
            p = p.full_tensor()
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


class ReferenceTable:
    """Reference log-probs looked up by the batch's `row_index`: {kind: [N]} and `scored` [N], which rows hold
    values (the others are NaN)."""

    def __init__(self, values: dict[str, torch.Tensor] | None = None, scored: torch.Tensor | None = None, *,
                 split: str = "train"):
        self.values = values if values is not None else {k: torch.zeros(0) for k in KINDS}
        n = len(self.values[KINDS[0]])
        self.scored = scored if scored is not None else torch.zeros(n, dtype=torch.bool)
        self.split = split
        self.batches: int | None = None  # first-epoch batches (per process) it was made to cover; None: all

    @property
    def n_scored(self) -> int:
        return int(self.scored.sum())

    def has(self, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows)] bool: whether each row holds values."""
        rows = rows.cpu()
        inside = rows < len(self.scored)
        held = torch.zeros(len(rows), dtype=torch.bool)
        held[inside] = self.scored[rows[inside]]
        return held

    def fill(self, rows: torch.Tensor, values: torch.Tensor) -> int:
        """Add the values ([n, 4], in KINDS order) of the rows not held yet; a row already held keeps its own,
        bit for bit. Returns how many rows were added."""
        rows, values = rows.cpu(), values.cpu().float()
        new = ~self.has(rows)
        rows, values = rows[new], values[new]
        if not len(rows):
            return 0
        grow = int(rows.max()) + 1 - len(self.scored)
        if grow > 0:
            self.values = {k: torch.cat([t, torch.full((grow,), float("nan"))]) for k, t in self.values.items()}
            self.scored = torch.cat([self.scored, torch.zeros(grow, dtype=torch.bool)])
        for i, kind in enumerate(KINDS):
            self.values[kind][rows] = values[:, i]  # a row twice here (a sampler evening out processes): same values
        self.scored[rows] = True
        return int(torch.unique(rows).numel())

    def merge(self, other: ReferenceTable) -> int:
        """Add `other`'s rows that this table lacks; returns how many."""
        rows = other.scored.nonzero().flatten()
        return self.fill(rows, torch.stack([other.values[k][rows] for k in KINDS], dim=1))

    def lookup(self, row_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums, means), each [2B]: chosen then rejected, on `row_index`'s device."""
        rows = row_index.cpu()
        held = self.has(rows)
        if not held.all():
            raise PrefalignError(
                f"reference log-probs ({self.split}): none for dataset rows {rows[~held].tolist()[:10]}; the reference "
                "pass scored only the pairs this run was to go through when training began (were the data, max_steps "
                "or the sampler changed since?)")
        v = {k: t[rows].to(row_index.device) for k, t in self.values.items()}
        return (torch.cat([v["chosen_sum"], v["rejected_sum"]]), torch.cat([v["chosen_mean"], v["rejected_mean"]]))


def run_folder_file(output_dir, split: str) -> Path:
    return Path(output_dir) / RUN_FOLDER / f"{split}.safetensors"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def read_table(path, key: str | None, *, split: str, legacy_ok: bool = False,
               warn: bool = True) -> tuple[ReferenceTable, str | None] | None:
    """(table, the key it was written under) from `path`; None when it is absent, cannot be read, fails its
    digest, or was written under another key than `key` (when given). A file written before tables carried a
    digest (NaN marked the absent rows) has no key of its own and is accepted only with `legacy_ok`."""
    path = Path(path)
    if not path.is_file():
        return None

    def ignored(why: str):
        if warn:
            log.warning("reference log-probs (%s): %s %s; ignored (the rows are scored again)", split, path, why)

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # a truncated or overwritten file: never trusted, scored again
        return ignored(f"cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    n = {t.shape for t in tensors.values()}
    if any(k not in tensors for k in KINDS) or len(n) != 1 or len(next(iter(n))) != 1:
        return ignored("is not a table of reference log-probs")
    if "digest" in meta:
        if SCORED not in tensors or tensors[SCORED].dtype != torch.bool or meta["digest"] != _digest(tensors):
            return ignored("does not match its digest (altered or damaged)")
        recorded = meta.get("key") or None
    elif legacy_ok:
        tensors[SCORED] = ~torch.isnan(tensors["chosen_sum"])
        recorded = None
    else:
        return ignored("has no digest (written by an older prefalign) and cannot be checked")
    if key is not None and recorded is not None and recorded != key:
        return None  # another setup's table (a run folder reused with other settings): not ours
    values = {k: tensors[k].float() for k in KINDS}
    return ReferenceTable(values, tensors[SCORED], split=split), recorded


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)  # atomic: a killed run never leaves half a file under the table's name
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_table(table: ReferenceTable, path: Path, key: str | None) -> None:
    """Write `table` whole and atomically, after taking into it the rows another run wrote there meanwhile
    under the same key (so that two runs extending one cache file lose neither's rows)."""
    on_disk = read_table(path, key, split=table.split, warn=False)
    if on_disk is not None and on_disk[1] == key:
        table.merge(on_disk[0])
    tensors = {**{k: t.contiguous() for k, t in table.values.items()}, SCORED: table.scored.contiguous()}
    _atomic_save(tensors, path, metadata={"key": key or "", "digest": _digest(tensors)})


def reload_policy(model, accelerator=None):
    """The policy as it was loaded, before training: its weights read again from where they came from, with
    its current config; None when it has no such place. (Whether it is what the reference pass used is for the
    cache key to prove.)"""
    inner = unwrap(model)
    path = getattr(inner, "name_or_path", None)
    if not path or not hasattr(type(inner), "from_pretrained"):
        return None
    parameters = next(inner.parameters())
    try:
        fresh = type(inner).from_pretrained(path, config=copy.deepcopy(inner.config), dtype=parameters.dtype)
    except Exception as e:  # no longer there, or not a model folder: the caller says what it means
        log.warning("the policy could not be loaded again from %s: %s", path, str(e).splitlines()[0] if str(e) else e)
        return None
    fresh.eval().requires_grad_(False)
    if accelerator is None:
        return fresh.to(parameters.device)
    if accelerator.distributed_type != "FSDP":  # a plain forward on the device is what the prepared model runs
        return fresh.to(accelerator.device)
    prepared = accelerator.prepare_model(fresh, evaluation_mode=True)  # sharded as the policy is
    models = getattr(accelerator, "_models", None)
    if models and models[-1] is prepared:
        models.pop()  # used for the pass only: the accelerator must not keep it alive through training
    return prepared


def _row_indices(dataset) -> torch.Tensor:
    column = getattr(dataset, "column_names", None)
    rows = dataset["row_index"] if column is not None else [row["row_index"] for row in dataset]
    return torch.as_tensor(list(rows), dtype=torch.long)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min" if seconds >= 3600 else \
        f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class Progress:
    """Pairs scored out of those left to score, pairs/s and the time left: a tqdm bar on a terminal (main
    process), else a log line at every PROGRESS_STEP of the pairs and at least every PROGRESS_SECONDS."""

    def __init__(self, label: str, total: int, *, show: bool, bar: bool):
        self.label, self.total, self.done, self.show = label, total, 0, show
        self.t0 = self.last_line = time.monotonic()
        self.next_share = PROGRESS_STEP
        self.bar = None
        if show and bar and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=label, unit="pair", dynamic_ncols=True)

    def found(self, n: int) -> None:
        """`n` pairs of the plan were already scored: no work left there (the rate and ETA count scored pairs)."""
        self.total = max(self.total - n, self.done)
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def update(self, n: int) -> None:
        n = min(n, self.total - self.done)  # a distributed sampler repeats rows to even out the last batches
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        share = self.done / max(self.total, 1)
        if self.show and (share >= self.next_share or now - self.last_line >= PROGRESS_SECONDS):
            rate = self.done / max(now - self.t0, 1e-9)
            log.info("%s: %d/%d pairs (%d%%), %.2f pairs/s, %s left", self.label, self.done, self.total,
                     int(100 * share), rate, _duration((self.total - self.done) / rate))
            self.last_line = now
            self.next_share = (int(share / PROGRESS_STEP) + 1) * PROGRESS_STEP

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def reference_table(model, make_loader, dataset, collator, *, split: str, output_dir, settings: dict,
                    accelerator=None, autocast=None, cache_dir=None, resuming: bool = False, is_main: bool = True,
                    packed: bool = True, batches: int | None = None, batch_size: int = 1, training: bool = False,
                    original=None, progress_bar: bool = True) -> tuple[ReferenceTable, dict]:
    """The table of `split`: at least the rows of the first `batches` batches of `make_loader()` on this process
    (all of them when None), and every row of `dataset` for the train split (`training`) of a run that goes past
    its first epoch. Rows come from the run folder, then the shared cache; the rest are scored now by `model`.

    On resume the policy has trained, so the key is the one the run folder's table was written under, and rows
    missing from it are scored by `original()` (the reference as loaded) only if its key proves it is the same
    reference. The main process writes both files as the pass goes; returns (table, info)."""
    multi = accelerator is not None and accelerator.num_processes > 1
    device = accelerator.device if accelerator is not None else next(unwrap(model).parameters()).device
    own_path = run_folder_file(output_dir, split)
    if resuming:
        found = read_table(own_path, None, split=split, legacy_ok=True)
        if found is None:
            raise PrefalignError(f"resume: {own_path} is missing or unreadable, and the reference log-probs cannot be "
                                 "recomputed from the trained weights; start the run again or use reference: model")
        own, key = found
    else:
        key = cache_key(model, dataset, settings, collator, device=device)
        found = read_table(own_path, key, split=split)
        own = found[0] if found is not None else None
    shared_path = (Path(cache_dir) if cache_dir else default_cache_dir()) / f"{key}.safetensors"
    found = read_table(shared_path, key, split=split, legacy_ok=True) if key is not None else None
    shared = found[0] if found is not None else None

    table = ReferenceTable(split=split)
    from_own = table.merge(own) if own is not None else 0
    from_shared = table.merge(shared) if shared is not None else 0
    written = {own_path: own.n_scored if own is not None else -1}  # rows each file holds (-1: none yet)
    if key is not None:
        written[shared_path] = shared.n_scored if shared is not None else -1

    def agreed(flag: bool) -> bool:  # the same decision on every process, or one would wait in a collective
        if not multi:
            return flag
        return bool(accelerator.reduce(torch.tensor(float(flag), device=device), reduction="sum") == accelerator.num_processes)

    def save() -> None:
        if is_main:
            for path in written:
                if written[path] != table.n_scored:
                    write_table(table, path, key)
                    written[path] = table.n_scored

    all_rows = _row_indices(dataset)
    scored = 0
    if not agreed(bool(table.has(all_rows).all())):
        loader = make_loader()
        n_batches = len(loader) if batches is None else min(batches, len(loader))
        every_row = training and (batches is None or batches > len(loader))
        planned = min(n_batches * batch_size * (accelerator.num_processes if multi else 1), len(all_rows))
        scorer = (lambda: model) if not resuming else lambda: _same_reference(original, key, dataset, settings,
                                                                              collator, device, own_path)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            # the pass leaves the RNG as it found it: a run whose table was cached trains as one that scored it
            scored, seen = score_missing(table, loader, n_batches, scorer, planned=planned, device=device,
                                          accelerator=accelerator, autocast=autocast, packed=packed,
                                          ld_alpha=settings.get("ld_alpha"), split=split, save=save,
                                          is_main=is_main, progress_bar=progress_bar)
        if seen and not bool(table.has(torch.cat(seen)).all()):
            raise RuntimeError(f"reference pass ({split}): scored rows are missing from the table")
        short = int((~table.has(all_rows)).sum()) if every_row else 0
        if short:
            raise PrefalignError(f"reference pass ({split}): {short} pairs are in no batch of the first epoch "
                                 "(dataloader_drop_last) but later epochs train on them; set dataloader_drop_last: "
                                 "false or max_steps within one epoch")
    save()
    table.batches = batches
    pairs = int(table.has(all_rows).sum())
    found_here = "run folder" if from_own else "cache" if from_shared else None
    source = found_here or "computed"
    detail = f"{pairs - scored} from the {found_here}, {scored} computed" if found_here and scored else \
        f"from the {found_here}" if found_here else "computed"
    if is_main:
        log.info("reference log-probs (%s): %d of %d pairs, %s (%s)", split, pairs, len(all_rows), detail, shared_path)
    return table, {"split": split, "source": source, "pairs": pairs, "scored": scored, "path": str(shared_path),
                   "key": key}


def _same_reference(original, key, dataset, settings, collator, device, own_path):
    """On resume: the model that scores the rows the run folder's table lacks, proven by its key to be the one
    that scored the others (the policy as loaded, or an explicit reference model)."""
    model = original() if original is not None else None
    if model is None or key is None or cache_key(model, dataset, settings, collator, device=device) != key:
        raise PrefalignError(f"resume: {own_path} lacks pairs this run trains on (max_steps raised?), and the "
                             f"reference it was computed with cannot be loaded again as it was; resume with the "
                             f"max_steps it started with, or start the run again")
    return model


@torch.no_grad()
def score_missing(table: ReferenceTable, loader, n_batches: int, scorer, *, planned: int, device, accelerator,
                   autocast, packed: bool, ld_alpha, split: str, save, is_main: bool, progress_bar: bool):
    """Score the rows of the first `n_batches` batches of `loader` that `table` lacks, in those batches (the
    composition training will have; a batch whose rows are all held is skipped on every process), gathering the
    values of every process into `table` each FLUSH_SECONDS and at the end. Returns (rows added, [the rows of
    each batch])."""
    multi = accelerator is not None and accelerator.num_processes > 1
    progress = Progress(f"reference log-probs ({split})", planned, show=is_main, bar=progress_bar)
    if is_main:
        log.info("reference log-probs (%s): scoring up to %d pairs (%d batches per process)", split, planned, n_batches)
    model, was_training = None, None
    pending_rows, pending_values, seen = [], [], []
    added, last_flush = 0, time.monotonic()

    def flush() -> int:
        nonlocal pending_rows, pending_values
        values = torch.cat(pending_values) if pending_values else torch.zeros(0, 4, device=device)
        rows = torch.cat(pending_rows) if pending_rows else torch.zeros(0, dtype=torch.long, device=device)
        pending_rows, pending_values = [], []
        if multi:
            values = accelerator.pad_across_processes(values, dim=0, pad_index=float("nan"))
            rows = accelerator.pad_across_processes(rows, dim=0, pad_index=-1)
            values, rows = accelerator.gather(values), accelerator.gather(rows)
        keep = rows >= 0
        n = table.fill(rows[keep], values[keep])
        save()
        return n

    iterator = iter(loader)
    try:
        for batch in itertools.islice(iterator, n_batches):
            rows = batch["row_index"].to(device)
            seen.append(rows.cpu())
            missing, b = int((~table.has(rows)).sum()), rows.shape[0]
            due = time.monotonic() - last_flush >= FLUSH_SECONDS
            if multi:  # one decision for all: a skipped batch must be skipped everywhere (FSDP's forward gathers)
                votes = torch.tensor([missing, b, float(due and is_main)], dtype=torch.float32, device=device)
                missing, b, due = (int(v) for v in accelerator.reduce(votes, reduction="sum").tolist())
            if not missing:
                progress.found(b)
                continue
            if model is None:
                model = scorer()
                was_training = model.training
                model.eval()
            inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            with autocast() if autocast else torch.autocast(device.type, enabled=False):
                # the batch's own layout, or its unshared rows for a reference model that refuses prefix sharing
                lp = pair_logps(model, inputs, layout=None if packed else Layout.UNSHARED)
            n = rows.shape[0]
            sums, means = (lp.sum, lp.mean) if ld_alpha is None else length_desensitized(lp, ld_alpha)
            pending_values.append(torch.stack([sums[:n], sums[n:], means[:n], means[n:]], dim=1).float())
            pending_rows.append(rows)
            progress.update(b)
            if due:
                added += flush()
                last_flush = time.monotonic()
        added += flush()  # the last rows (a collective: every process gets here)
    except BaseException:
        if not multi:  # interrupted (Ctrl-C, an error): keep what was scored; with several processes a gather could hang
            try:
                flush()
            except Exception as e:
                log.warning("reference log-probs (%s): the rows scored so far could not be written: %s", split, e)
        raise
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
        end = getattr(loader, "end", None)
        if end is not None:
            end()  # stopped before its end, accelerate's loader would stay registered as the one training runs in
        progress.close()
        if model is not None:
            model.train(was_training)
    return added, seen
