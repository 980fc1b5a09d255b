"""Held-out evaluation: ranking accuracy (AMaPO's definition) and, with a reference, DPO reward accuracy.

Ranking accuracy is the fraction of pairs whose chosen completion has the higher mean per-token
log-prob under the policy; a tie counts as wrong. With reference log-probs the implicit-reward accuracy
is the fraction with h = (pc − pr) − (rc − rr) > 0 on summed log-probs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch

from .errors import ConfigError, DataError
from .modeling import SequenceLogps, pair_logps
from .modeling.sequence_weights import length_desensitized
from .run_files import CONFIG_FILE, read_json_object, write_jsonl

# Buckets of |Δ| (nats per token): where confident mistakes show up.
MARGIN_BUCKETS = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, math.inf)


@torch.no_grad()
def score_pairs(
    model: torch.nn.Module,
    batches: Iterable[dict],
    *,
    reference: Callable[[dict], torch.Tensor] | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ld_alpha: float | None = None,
    with_norm: bool = False,
    extra: Callable[[dict, SequenceLogps], dict[str, torch.Tensor]] | None = None,
    with_sum_sq: bool = False,
) -> list[dict]:
    """One record per pair. `reference(batch)` returns summed reference log-probs [2B] (chosen then rejected);
    `gather` collects per-pair tensors from all processes (accelerator.gather_for_metrics). With `ld_alpha`
    (LD-DPO, whose reference sums are length-desensitized) the reward margin uses the policy's LD sums too.
    `with_norm` adds each completion's −‖per-token log-probs‖₂ (RewardBench's `ref_free_norm: norm`).
    `extra(batch, log-probs)` adds per-pair fields [B] computed from the same forward pass, after `reference`
    (the trainer's loss and rewards); `with_sum_sq` scores what WPO's weights need."""
    was_training = model.training
    model.eval()
    cols: dict[str, list[torch.Tensor]] = {}
    try:
        for batch in batches:
            b = batch["row_index"].shape[0]
            with autocast():
                lp = pair_logps(model, batch, with_sum_sq=with_sum_sq)  # in the batch's layout
            fields = {
                "index": batch["row_index"],
                "chosen_logp_mean": lp.mean[:b],
                "rejected_logp_mean": lp.mean[b:],
                "chosen_logp_sum": lp.sum[:b],
                "rejected_logp_sum": lp.sum[b:],
                "chosen_len": lp.n_tokens[:b],
                "rejected_len": lp.n_tokens[b:],
            }
            if with_norm:
                squares = torch.zeros_like(lp.sum).index_add(0, lp.token_rows, lp.token_logps.float() ** 2)
                fields["chosen_logp_norm"], fields["rejected_logp_norm"] = -squares[:b].sqrt(), -squares[b:].sqrt()
            if reference is not None:
                ref = reference(batch).float()
                fields["ref_chosen_logp_sum"] = ref[:b]
                fields["ref_rejected_logp_sum"] = ref[b:]
                if ld_alpha is not None:
                    ld_sums = length_desensitized(lp, ld_alpha)[0]
                    fields["chosen_ld_sum"], fields["rejected_ld_sum"] = ld_sums[:b], ld_sums[b:]
            if extra is not None:
                fields.update(extra(batch, lp))
            for k, v in fields.items():
                v = v.detach()
                cols.setdefault(k, []).append((gather(v) if gather else v).cpu())
    finally:
        model.train(was_training)
    if not cols:
        return []
    table = {k: torch.cat(v).tolist() for k, v in cols.items()}
    records = []  # in dataset order, whatever order the sampler (length grouping) or the gather gave them
    for i in range(len(table["index"])):
        r = {k: table[k][i] for k in table}
        r["delta"] = r["chosen_logp_mean"] - r["rejected_logp_mean"]
        r["correct"] = r["delta"] > 0
        if reference is not None:
            side = "ld_sum" if ld_alpha is not None else "logp_sum"
            h = (r[f"chosen_{side}"] - r[f"rejected_{side}"]) - (r["ref_chosen_logp_sum"] - r["ref_rejected_logp_sum"])
            r["reward_margin"] = h
            r["reward_correct"] = h > 0
        records.append(r)
    return sorted(records, key=lambda r: r["index"])


def summarize(records: list[dict]) -> dict:
    n = len(records)
    if n == 0:
        return {"n_pairs": 0, "ranking_accuracy": None}
    mean = lambda key: sum(r[key] for r in records) / n  # noqa: E731
    deltas = sorted(r["delta"] for r in records)
    out = {
        "n_pairs": n,
        "ranking_accuracy": mean("correct"),
        "mean_delta": mean("delta"),
        "median_delta": deltas[n // 2] if n % 2 else 0.5 * (deltas[n // 2 - 1] + deltas[n // 2]),
        "mean_logp_chosen": mean("chosen_logp_mean"),
        "mean_logp_rejected": mean("rejected_logp_mean"),
        "chosen_len_mean": mean("chosen_len"),
        "rejected_len_mean": mean("rejected_len"),
        "accuracy_by_margin_bucket": accuracy_by_margin_bucket(records),
    }
    if "reward_correct" in records[0]:
        out["reward_accuracy"] = mean("reward_correct")
        out["mean_reward_margin"] = mean("reward_margin")
    return out


def accuracy_by_margin_bucket(records: list[dict]) -> list[dict]:
    """Accuracy within buckets of |Δ|: low accuracy in a high bucket means confident mistakes."""
    rows = []
    for lo, hi in zip(MARGIN_BUCKETS[:-1], MARGIN_BUCKETS[1:]):
        inside = [r for r in records if lo <= abs(r["delta"]) < hi]
        if inside:
            rows.append({
                "abs_delta_min": lo,
                "abs_delta_max": None if math.isinf(hi) else hi,
                "n_pairs": len(inside),
                "accuracy": sum(r["correct"] for r in inside) / len(inside),
            })
    return rows


def write_per_pair(records: list[dict], path) -> None:
    write_jsonl(records, path)


def format_summary(summary: dict) -> str:
    lines = [f"pairs: {summary['n_pairs']}"]
    if summary["n_pairs"]:
        lines.append(f"ranking accuracy: {summary['ranking_accuracy']:.4f}")
        if "reward_accuracy" in summary:
            lines.append(f"reward accuracy (vs reference): {summary['reward_accuracy']:.4f}")
        lines.append(f"mean Δ (chosen − rejected mean log-prob): {summary['mean_delta']:+.4f}")
        lines.append(
            f"mean completion length: chosen {summary['chosen_len_mean']:.1f}, rejected {summary['rejected_len_mean']:.1f}"
        )
        lines.append("accuracy by |Δ| bucket:")
        for b in summary["accuracy_by_margin_bucket"]:
            hi = "inf" if b["abs_delta_max"] is None else f"{b['abs_delta_max']:g}"
            lines.append(f"  [{b['abs_delta_min']:g}, {hi}): {b['accuracy']:.3f} of {b['n_pairs']}")
    return "\n".join(lines)


# What `prefalign eval` takes from a run folder's prefalign_config.json when not given: the run is scored as
# it was scored during training (same lengths, data format and precision).
RUN_SETTINGS = {"max_length": 512, "max_prompt_length": None, "max_completion_length": None,
                "truncation_mode": "keep_end", "data_format": "auto",
                "chat_template": None, "columns": None, "winner_values": None, "bf16": False, "dtype": "float32", "attn_implementation": None}


def run_settings(model: str, given: dict) -> dict:
    """`given` (None = not given) completed from `model`'s prefalign_config.json when it is a run folder,
    else from the defaults in RUN_SETTINGS."""
    import os
    from pathlib import Path

    saved = {}
    config = Path(os.path.expanduser(model)) / CONFIG_FILE
    if config.is_file():
        saved = read_json_object(config)  # a damaged record is one line naming it
    return {k: given[k] if given.get(k) is not None else saved.get(k, default) for k, default in RUN_SETTINGS.items()}


# Pairs that truncation to max_length drops (data/skips.py): when these are all that is left out, the lengths
# are the cause, not the data.
TRUNCATION_SKIPS = ("truncated_to_nothing", "identical_after_truncation")


def settle_lengths(st: dict, given: dict, model: str) -> None:
    """Check the lengths in `st` (run_settings) and, where a new --max-length leaves a run's own
    max_prompt_length no room for the completions, derive the prompt's share per pair as train does when only
    max_length is set (data.tokenize.truncate_pair), saying so: the run's share would cut every longer prompt
    to max_length or more and drop its pair as truncated to nothing."""
    import logging

    if st["max_length"] is not None and st["max_length"] < 2:  # 1 would cut every prompt to nothing
        raise ConfigError(f"--max-length {st['max_length']}: must be at least 2 (a completion token is scored "
                          "from the tokens before it)")
    for key in ("max_prompt_length", "max_completion_length"):
        if st[key] is not None and st[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} {st[key]}: must be at least 1")
    length, prompt = st["max_length"], st["max_prompt_length"]
    if length is None or prompt is None or prompt < length:
        return
    if given.get("max_prompt_length") is not None:  # train refuses the same (config.py)
        raise ConfigError(f"--max-prompt-length {prompt} must be smaller than --max-length {length} (or leave it "
                          "out: the prompt's share is then derived per pair, as train derives it)")
    logging.getLogger(__name__).warning(
        "%s: its max_prompt_length %d leaves no room for completions within max_length %d, so the prompt's share "
        "is derived per pair as train derives it from max_length alone (--max-prompt-length sets it)", model, prompt,
        length)
    st["max_prompt_length"] = None


def no_pairs_left(dataset: str, n_pairs: int, skipped: dict, st: dict) -> DataError:
    """The one-line error for an evaluation left with no pair, naming why they went."""
    counts = ", ".join(f"{k} {v}" for k, v in skipped.items())
    if skipped and all(k in TRUNCATION_SKIPS for k in skipped):
        share = ("derived per pair" if st["max_prompt_length"] is None
                 else f"max_prompt_length {st['max_prompt_length']}")
        return DataError(f"{dataset}: every one of its {n_pairs} pairs was dropped by truncation to max_length "
                         f"{st['max_length']} ({share}): {counts}; raise --max-length")
    return DataError(f"{dataset}: no pair left to evaluate: every one was skipped ({counts or 'no rows'})")


def evaluate_path(
    model: str,
    dataset: str,
    *,
    split=None,
    dataset_config=None,
    columns=None,
    winner_values=None,
    data_format=None,
    chat_template=None,
    reference=None,
    gguf_file=None,
    trust_remote_code=False,
    max_length=None,
    max_prompt_length=None,
    max_completion_length=None,
    truncation_mode=None,
    batch_size=8,
    limit=None,
    bf16=None,
    dtype=None,
    attn_implementation=None,
    prefix_sharing: bool | None = None,
    rows=None,
) -> tuple[dict, list[dict]]:
    """Summary and per-pair records of `model` on `dataset` (one process, on the GPU when there is one).
    Settings left as None come from `model`'s own prefalign_config.json when it is a run folder. `rows`: only
    the pairs with these `row_index` values (e.g. the ones a run trained on), before `limit`."""
    import contextlib

    import torch

    from .data import load_preference_data, tokenize_pairs
    from .models import load_model, load_tokenizer

    given = dict(max_length=max_length, max_prompt_length=max_prompt_length,
                 max_completion_length=max_completion_length, truncation_mode=truncation_mode,
                 data_format=data_format, chat_template=chat_template, columns=columns, winner_values=winner_values,
                 bf16=bf16, dtype=dtype, attn_implementation=attn_implementation)
    st = run_settings(model, given)
    # checked before anything loads: a zero here would only fail deep inside the data loader or the sampler
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: must be at least 1 (leave it out to evaluate every pair)")
    settle_lengths(st, given, model)
    kw = dict(gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    weights = dict(dtype=st["dtype"], attn_implementation=st["attn_implementation"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(model, **kw)
    policy = load_model(model, **kw, **weights).to(device)
    pdata = load_preference_data(
        dataset, tokenizer=tokenizer, split=split, config_name=dataset_config, columns=st["columns"],
        data_format=st["data_format"], chat_template=st["chat_template"], winner_values=st["winner_values"],
    )
    ds = pdata.dataset
    if len(ds) == 0:
        raise no_pairs_left(dataset, pdata.n_rows, pdata.skipped, st)
    if rows is not None:
        wanted = set(rows)
        ds = ds.select([i for i, r in enumerate(ds["row_index"]) if r in wanted])
        if len(ds) == 0:
            raise DataError(f"{dataset}: none of the {len(wanted)} rows asked for is among its pairs")
    ds = ds if limit is None else ds.select(range(min(limit, len(ds))))
    tok, tok_skipped = tokenize_pairs(ds, tokenizer, max_length=st["max_length"], max_prompt_length=st["max_prompt_length"],
                                      max_completion_length=st["max_completion_length"],
                                      truncation_mode=st["truncation_mode"])
    if len(tok) == 0:
        raise no_pairs_left(dataset, len(ds), tok_skipped, st)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if st["bf16"] else contextlib.nullcontext
    ref_model = None
    if reference:
        ref_model = load_model(reference, trust_remote_code=trust_remote_code, **weights).to(device).eval()
    loader, ref_fn = scoring_loader(policy, ref_model, tokenizer, tok, batch_size=batch_size, device=device,
                                    prefix_sharing=prefix_sharing, autocast=autocast)
    records = score_pairs(policy, loader, reference=ref_fn, autocast=autocast)
    summary = summarize(records)
    skipped = {**pdata.skipped}
    for k, v in tok_skipped.items():
        skipped[k] = skipped.get(k, 0) + v
    summary.update({"model": model, "dataset": dataset, "format": pdata.format, "n_rows": pdata.n_rows, "skipped": skipped,
                    "settings": st})
    return summary, records


def scoring_loader(policy, ref_model, tokenizer, tok, *, batch_size: int, device, prefix_sharing=None,
                   autocast=contextlib.nullcontext, sort_by_length: bool = True):
    """(batches, reference function or None) for scoring the tokenized pairs `tok` with `policy` (and
    `ref_model`): prefix-shared and padding-free wherever it is exact for both models, after the start-up
    self-check, on `device`, in batches of pairs of similar length (longest first; records come back in
    dataset order)."""
    from torch.utils.data import DataLoader

    from .modeling import Layout, check_fast_path, resolve_layout, resolve_prefix_sharing, usable_pad_id

    packed, free = resolve_layout(prefix_sharing, None, policy)
    varlen = free and not packed  # whole sequences in one row: a varlen kernel (flash attention)
    if ref_model is not None:  # both score the same batches
        packed = packed and resolve_prefix_sharing(None, ref_model)
        varlen = varlen and Layout.VARLEN.accepts(ref_model)
    pad = usable_pad_id(policy, tokenizer)
    rows = [{k: tok[i][k] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "row_index")}
            for i in range(min(2, len(tok)))]
    # the head check and the three-way check, for the reference model too (prefalign eval and bench both come here)
    for scored, role in ((policy, None), (ref_model, "reference model")):
        if scored is not None and rows:
            check_fast_path(scored, rows, pad, prefix_sharing=packed, padding_free=varlen, autocast=autocast, role=role)
    # padding-free wherever prefix-shared: pairs of a batch laid end to end, no row wider than its longest pair;
    # under a varlen kernel the batch's whole sequences in one row
    layout = Layout.of(packed, padding_free=packed or varlen)
    collator = layout.collator(pad, keep_unshared=False)
    order = longest_first(tok, layout=layout) if sort_by_length else range(len(tok))
    loader = DataLoader(tok, batch_size=batch_size, sampler=list(order),
                        collate_fn=lambda rows: {k: v.to(device) for k, v in collator(rows).items()})
    ref_fn = None
    if ref_model is not None:

        def ref_fn(batch):
            with autocast():
                return pair_logps(ref_model, batch).sum

    return loader, ref_fn


def longest_first(tok, *, layout) -> list[int]:
    """Pair indices by the tokens they put in a batch of `layout`, longest first: similar lengths share a batch
    (little padding), and a batch too long for memory fails at once rather than at the end."""
    p, c, r = (tok[f"{k}_input_ids"] for k in ("prompt", "chosen", "rejected"))
    size = [layout.pair_tokens(len(a), len(b), len(d)) for a, b, d in zip(p, c, r)]
    return sorted(range(len(size)), key=lambda i: -size[i])
