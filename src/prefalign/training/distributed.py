"""Collectives whose shape never depends on per-rank state."""

from __future__ import annotations

import torch


def gather_variable(accelerator, t: torch.Tensor) -> torch.Tensor:
    """all-gather a 1-D tensor whose length may differ between processes (rank order)."""
    if accelerator.num_processes == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = accelerator.gather(n).tolist()
    padded = accelerator.pad_across_processes(t, dim=0)
    full = accelerator.gather(padded).view(len(sizes), -1)
    return torch.cat([full[i, :s] for i, s in enumerate(sizes)])


def local_offset(accelerator, n: int) -> int:
    """Where this process's n rows start in a `gather_variable` of every process's rows."""
    if accelerator.num_processes == 1:
        return 0
    sizes = accelerator.gather(torch.tensor([n], device=accelerator.device)).tolist()
    return int(sum(sizes[: accelerator.process_index]))
