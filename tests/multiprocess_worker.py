"""One rank of the AMaPO distributed check in test_multiprocess.py.

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        tests/multiprocess_worker.py MODEL_DIR OUT_DIR

(`--multi_gpu` is accelerate's name for "launch one process per rank"; with no GPU each process runs on the CPU
and torch.distributed uses gloo. `--cpu` would start a single process.)

Each rank takes its half of PAIRS, runs the stories260K model wrapped in DistributedDataParallel, computes
AMaPO exactly as PreferenceTrainer.pair_loss does (mean per-token log-probs, Δ gathered across processes with
`gather_variable` for μ and s), back-propagates the mean loss of its pairs, and writes its per-pair losses,
logits z, Δ and margins M = βΔ − z, plus (rank 0) the gradients after DDP's all-reduce, to
OUT_DIR/rank{R}.safetensors. The test computes the same on one process with the whole batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

BETA = 2.0
MAX_LENGTH, MAX_PROMPT_LENGTH = 64, 32
PAIRS = [  # (prompt, chosen, rejected): lengths differ so that padding and μ, s matter
    ("Once upon a time, there was a little girl named Lily.", " She liked to play in the park.", " Dog."),
    ("Tom had a big red ball.", " He threw it to his friend Sam, and they laughed.", " The ball ball ball."),
    ("The sun was hot.", " The children went to swim in the lake.", " Cold snow fell all day and night long."),
    ("One day, a cat saw a bird.", " The cat wanted to be friends.", " The bird."),
    ("Mom made a cake.", " It was sweet and everyone was happy.", " It was a car."),
    ("Ben lost his toy.", " He looked under the bed and found it.", " He found it found it found it found it."),
    ("The little dog was sad.", " Then a kind girl gave him a hug.", " Sad sad."),
    ("Anna wanted to fly.", " She made a kite and ran in the wind.", " She ate soup."),
]


def tokenized_rows(tokenizer, pairs: list[tuple[str, str, str]], first_index: int = 0) -> list[dict]:
    from datasets import Dataset

    from prefalign.data import tokenize_pairs

    ds = Dataset.from_list(
        [{"prompt": p, "chosen": c, "rejected": r, "row_index": first_index + i} for i, (p, c, r) in enumerate(pairs)]
    )
    tok, skipped = tokenize_pairs(ds, tokenizer, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    assert not skipped, skipped
    return [tok[i] for i in range(len(tok))]


def amapo_outputs(model, batch: dict, gather_fn=None):
    """What PreferenceTrainer.pair_loss computes for loss_type=amapo: (LossOutput, Δ)."""
    from prefalign.losses import compute_loss
    from prefalign.modeling import sequence_logps

    b = batch["row_index"].shape[0]
    lp = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    out = compute_loss("amapo", lp.mean[:b], lp.mean[b:], beta=BETA, gather_fn=gather_fn)
    return out, (lp.mean[:b] - lp.mean[b:]).detach()


def record(out, delta) -> dict[str, torch.Tensor]:
    return {
        "losses": out.losses.detach().contiguous(),
        "logits": out.logits.contiguous(),
        "delta": delta.contiguous(),
        "margins": (BETA * delta - out.logits).contiguous(),
        "mu": out.metrics["amapo/mu"].reshape(1),
        "std": out.metrics["amapo/std"].reshape(1),
    }


def main(model_dir: str, out_dir: str) -> None:
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from prefalign.data import PairCollator
    from prefalign.models import load_model, load_tokenizer
    from prefalign.training.distributed import gather_variable

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2, f"expected 2 processes, got {world}"
    assert torch.distributed.get_backend() == "gloo"
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float32)
    model.train()
    ddp = accelerator.prepare_model(model)
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel), type(ddp)

    half = len(PAIRS) // world
    rows = tokenized_rows(tokenizer, PAIRS[rank * half : (rank + 1) * half], first_index=rank * half)
    batch = PairCollator(pad_token_id=tokenizer.pad_token_id)(rows)
    out, delta = amapo_outputs(ddp, batch, gather_fn=lambda t: gather_variable(accelerator, t))
    accelerator.backward(out.losses.mean())  # DDP averages the gradients over the ranks

    tensors = record(out, delta)
    if rank == 0:
        tensors.update({f"grad.{name}": p.grad.contiguous() for name, p in model.named_parameters()})
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(Path(out_dir) / f"rank{rank}.safetensors"))
    # No closing barrier: torch 2.13's gloo can deadlock when DDP's reducer is freed while its thread still
    # destroys a finished barrier (seen once here, at interpreter exit). Free DDP, then the process group.
    del ddp
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
