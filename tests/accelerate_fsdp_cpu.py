"""`prefalign` under accelerate's real FSDP2 path on a CPU, for tests/test_fsdp_accelerate.py.

    accelerate launch --config_file FSDP2.yaml tests/accelerate_fsdp_cpu.py train ...

accelerate shards with FSDP only on GPUs and other accelerators: on a CPU its FSDP config trains as DDP
(prefalign says so). torch's FSDP2 itself runs on a CPU over gloo, so this shim lets accelerate take its GPU
branch — the processes' state says MULTI_GPU, the device stays the CPU — and then runs `prefalign` as the CLI
does. Everything else is accelerate's and transformers' own FSDP2 code: `fully_shard` of every decoder layer,
the final norm, embeddings and head sharded as one group (accelerate >= 1.15), sharded checkpoints through
torch.distributed.checkpoint, the full state dict gathered for the final save. Test use only.
"""

from __future__ import annotations

import sys

import accelerate.state
from accelerate.utils import DistributedType

_init = accelerate.state.PartialState.__init__


def _as_if_on_gpus(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.MULTI_GPU  # AcceleratorState enables FSDP only for these


accelerate.state.PartialState.__init__ = _as_if_on_gpus

if __name__ == "__main__":
    from prefalign.cli import main

    sys.exit(main(sys.argv[1:]))
