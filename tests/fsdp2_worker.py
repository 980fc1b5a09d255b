"""One rank of the FSDP2 check in test_multiprocess.py: torch's `fully_shard` over gloo on the CPU.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp2_worker.py MODEL_DIR OUT_DIR

accelerate shards with FSDP only on GPUs and other accelerators (on a CPU its FSDP config trains as DDP), so
this applies torch's FSDP2 itself — `fully_shard` on every decoder layer, then on the root, as accelerate's
FSDP2 plugin does — and drives prefalign's forward path through it: the decoder hook, the output head applied
outside the model's forward, prefix sharing's masks. Each rank takes its half of PAIRS; AMaPO's Δ is
gathered over the ranks; step 1 scores the pairs padding-free packed, several to a row (rows up to twice the
longest pair; fewer rows than pairs is asserted), step 2 prefix-shared one pair per row, step 3 unshared; SGD.
Rank 0 writes the full (unsharded) weights after the three steps, which the test compares with one process on
the whole batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

LR = 0.05


def pair_tokens(row: dict) -> int:
    return len(row["prompt_input_ids"]) + len(row["chosen_input_ids"]) + len(row["rejected_input_ids"])


def three_steps(model, rows: list[dict], pad_token_id: int, gather_fn=None) -> list[float]:
    """Three SGD steps of AMaPO on `rows`: padding-free packed (several pairs per row), prefix-shared one pair
    per row, unshared. Returns the three mean losses (this rank's)."""
    from prefalign.losses import compute_loss
    from prefalign.modeling import PrefixSharedCollator, packed_inputs, prefix_shared_logps, sequence_logps

    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    b = len(rows)
    packed = PrefixSharedCollator(pad_token_id, padding_free=True,
                                  row_length=2 * max(pair_tokens(r) for r in rows))(rows)
    n_rows = packed["packed_input_ids"].shape[0]
    assert n_rows < b, f"padding-free packing laid {b} pairs in {n_rows} rows: none holds two"
    one_per_row = PrefixSharedCollator(pad_token_id)(rows)
    assert one_per_row["packed_input_ids"].shape[0] == b
    losses = []
    for batch in (packed, one_per_row, None):
        if batch is not None:
            lp = prefix_shared_logps(model, *packed_inputs(batch))
        else:
            lp = sequence_logps(model, packed["input_ids"], packed["attention_mask"], packed["labels"])
        out = compute_loss("amapo", lp.mean[:b], lp.mean[b:], beta=2.0, gather_fn=gather_fn)
        loss = out.losses.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main(model_dir: str, out_dir: str) -> None:
    import torch.distributed as dist
    from multiprocess_worker import PAIRS, tokenized_rows
    from safetensors.torch import save_file
    from torch.distributed.fsdp import fully_shard

    from prefalign.models import load_model, load_tokenizer

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    half = len(PAIRS) // world
    rows = tokenized_rows(tokenizer, PAIRS[rank * half : (rank + 1) * half], first_index=rank * half)

    def gather(t: torch.Tensor) -> torch.Tensor:  # equal halves: a plain all_gather
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    model.train()
    three_steps(model, rows, tokenizer.pad_token_id, gather_fn=gather)
    full = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
    if rank == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_file(full, str(Path(out_dir) / "weights.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(sys.argv[1], sys.argv[2])
