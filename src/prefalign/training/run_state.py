"""What a checkpoint carries besides transformers' own files, so that a resumed run continues exactly:
the running statistics of stateful losses (α-DPO, β-DPO) and, with TR-DPO (`sync_ref_model`), the
reference model, whose weights training itself changes — and `SyncReference`, the callback that does so.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from transformers import TrainerCallback

from ..errors import PrefalignError
from ..modeling import unwrap
from ..run_files import LOSS_STATE_FILE, SYNCED_REFERENCE_FILE


def save_loss_state(states: dict[str, dict[str, torch.Tensor] | None], folder: str) -> None:
    flat = {f"{loss}/{key}": t.detach().cpu().contiguous() for loss, state in states.items() if state
            for key, t in state.items()}
    if flat:
        save_file(flat, os.path.join(folder, LOSS_STATE_FILE))


def load_loss_state(folder: str, losses: list[str], device) -> dict[str, dict[str, torch.Tensor]]:
    """{loss: state} from a checkpoint; a stateful loss whose state is missing there is an error (a resumed
    run would silently restart its statistics)."""
    path = os.path.join(folder, LOSS_STATE_FILE)
    flat = load_file(path) if os.path.exists(path) else {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in flat.items():
        loss, key = name.split("/", 1)
        states.setdefault(loss, {})[key] = t.to(device)
    missing = [n for n in losses if n not in states]
    if missing:
        raise PrefalignError(f"resume: {path} holds no running statistics for {', '.join(missing)}; the checkpoint "
                             "was written without them, so the run cannot continue exactly")
    return states


def save_synced_reference(ref_model, folder: str) -> None:
    save_model(unwrap(ref_model), os.path.join(folder, SYNCED_REFERENCE_FILE))


def load_synced_reference(ref_model, folder: str) -> None:
    path = os.path.join(folder, SYNCED_REFERENCE_FILE)
    if not os.path.exists(path):
        raise PrefalignError(f"resume: {path} is missing: the TR-DPO reference model had moved from the initial one, "
                             "so the run cannot continue exactly")
    load_model(unwrap(ref_model), path, device=str(next(unwrap(ref_model).parameters()).device))


def check_same_architecture(policy, ref_model) -> None:
    ours = [(n, tuple(p.shape)) for n, p in unwrap(policy).named_parameters()]
    theirs = [(n, tuple(p.shape)) for n, p in unwrap(ref_model).named_parameters()]
    if ours != theirs:
        raise PrefalignError("sync_ref_model: the reference model's parameters differ from the policy's (names or "
                             "shapes); TR-DPO mixes the policy into a reference of the same architecture")


class SyncReference(TrainerCallback):
    """TR-DPO (Gorbatovski et al., 2024), as TRL: every `ref_model_sync_steps` optimizer steps,
    ref ← (1 − α)·ref + α·policy with α = `ref_model_mixup_alpha` (the soft update; α = 1 is the hard one)."""

    def __init__(self, trainer):
        self.trainer = trainer

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.ref_model_sync_steps:
            return
        alpha = args.ref_model_mixup_alpha
        policy = unwrap(self.trainer.accelerator.unwrap_model(self.trainer.model)).parameters()
        for ref_p, p in zip(unwrap(self.trainer.ref_model).parameters(), policy, strict=True):
            ref_p.mul_(1.0 - alpha).add_(p.detach().to(ref_p.dtype), alpha=alpha)
