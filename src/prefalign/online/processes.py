"""An online run under `accelerate launch` / torchrun: which process this is, and the few collectives the rounds use.

The processes' group is the one the training config starts when it is built (transformers' device set-up makes
accelerate's `PartialState`, with the config's ddp_backend and ddp_timeout: gloo on a CPU); the trainer of each
round makes its `Accelerator` on that same state. Without a launcher there is one process and every helper here
is a no-op.

Every process runs the same steps on the same inputs, so a check that fails on one fails on all (no process
waits at a barrier for one that stopped); only generation (and the scoring of what was generated) is split, and
only the main process writes the run's records.
"""

from __future__ import annotations


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank_and_world() -> tuple[int, int]:
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def is_main() -> bool:
    return rank_and_world()[0] == 0


def barrier() -> None:
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def gather(local: list) -> list:
    """Every process's list, concatenated in rank order, on every process."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return list(local)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]


def share(jobs: list) -> list:
    """This process's share of `jobs`: every world-th one from its rank (shares are disjoint, their union all)."""
    rank, world = rank_and_world()
    return jobs[rank::world]


def device_for(cfg):
    """The device this process generates and scores on: its own GPU under a launcher, else cuda (or the CPU)."""
    import torch

    if cfg.use_cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return cfg.device if rank_and_world()[1] > 1 else torch.device("cuda")
