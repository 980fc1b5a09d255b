"""The SPO degree classifier: a linear head on the mean final hidden state over the completion tokens.

Trained jointly with the policy, saved beside it as spo_head.safetensors (never merged into the model's
weights) and not used at generation time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HEAD_WEIGHTS = "spo_head.safetensors"
HEAD_CONFIG = "spo_head.json"


class SPOHead(torch.nn.Module):
    def __init__(self, hidden_size: int, degrees: int):
        super().__init__()
        self.hidden_size, self.degrees = hidden_size, degrees
        self.linear = torch.nn.Linear(hidden_size, degrees)

    def forward(self, hidden_mean: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden_mean.to(self.linear.weight.dtype))

    def save(self, folder) -> None:
        folder = Path(folder)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(folder / HEAD_WEIGHTS))
        (folder / HEAD_CONFIG).write_text(json.dumps({"hidden_size": self.hidden_size, "degrees": self.degrees}))

    def load_weights(self, folder) -> None:
        self.load_state_dict(load_file(str(Path(folder) / HEAD_WEIGHTS)))


def spo_loss(head: SPOHead, hidden_mean: torch.Tensor, degrees: torch.Tensor) -> tuple[torch.Tensor, dict]:
    logits = head(hidden_mean.float())
    loss = torch.nn.functional.cross_entropy(logits, degrees)
    accuracy = (logits.argmax(-1) == degrees).float().mean()
    return loss, {"spo/loss": loss.detach(), "spo/accuracy": accuracy.detach()}
