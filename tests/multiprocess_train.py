"""`prefalign train` as launched by test_multiprocess.py, optionally with one rank's batch poisoned.

    accelerate launch --multi_gpu --num_processes 2 ... tests/multiprocess_train.py [--poison RANK:STEP] TRAIN_FLAGS…

`--poison R:S` makes process R's loss NaN at optimizer step S (every micro-batch of it), as a bad row would:
with `on_nonfinite: skip` every process must agree to skip that step, or the others would hang in the
gradient all-reduce. Run without a launcher, it is the one-process run the test compares with.
"""

from __future__ import annotations

import sys


def poison(rank: int, step: int) -> None:
    from prefalign.training.trainer import PreferenceTrainer

    original = PreferenceTrainer.pair_loss

    def poisoned(self, model, batch):
        loss, out, extra = original(self, model, batch)
        if model.training and self.args.process_index == rank and self.state.global_step + 1 == step:
            loss = loss * float("nan")
        return loss, out, extra

    PreferenceTrainer.pair_loss = poisoned


def main(argv: list[str]) -> int:
    if argv[:1] == ["--poison"]:
        rank, step = (int(x) for x in argv[1].split(":"))
        poison(rank, step)
        argv = argv[2:]
    from prefalign.cli import main as cli_main

    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
