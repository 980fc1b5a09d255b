"""A command run under a launcher closes its process group when it succeeds (left to the interpreter's exit,
gloo's worker threads can abort a process after its run was saved: seen once in a full suite run as "terminate called
without an active exception" under accelerate's FSDP2), and leaves it alone when it fails, so that a failed
process waits on no other."""

from __future__ import annotations

import json

import torch.distributed as dist

from prefalign.cli import main as cli_main


def _one_process_group(tmp_path) -> None:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)


def test_a_command_that_succeeds_closes_the_process_group(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Hi.", "chosen": " Hello.", "rejected": " Go."}) + "\n")
    _one_process_group(tmp_path)
    try:
        assert cli_main(["data", "inspect", str(data)]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_command_that_fails_leaves_the_process_group_open(tmp_path, capsys):
    _one_process_group(tmp_path)
    try:
        assert cli_main(["data", "inspect", str(tmp_path / "missing.jsonl")]) == 2
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
