"""What a model's own `*ForCausalLM.forward` does between its decoder and the logits, read from its source.

The fast path never asks the model for logits: it takes the decoder's final hidden state and applies the
output head itself, only where a completion token is predicted. So it must repeat exactly what the model's
forward applies around the head. transformers' forwards do one of a few things there (5.x, read across every
`*ForCausalLM`):

    logits = self.lm_head(hidden_states)                                    # most families
    logits = logits / cap; logits = torch.tanh(logits); logits = logits * cap   # Gemma 2/3/3n/4: soft-capping
    logits = logits * self.logit_scale                                      # Cohere, Cohere 2
    logits = logits / self.config.logits_scaling                            # Granite (and its MoE variants)
    logits = self.lm_head(hidden_states) * self.model.lm_head_multiplier   # Falcon-H1
    hidden_states = hidden_states / self.config.logits_scaling              # MiniCPM3 (before the head)

`head_spec` reads the forward's source, recognises these statements (the numbers come from the live
model, so a config without soft-capping gets none), and refuses a forward with any other statement about
the hidden states or the logits in one line naming it. The start-up self-check (`selfcheck.py`) is the
second net, for forwards whose source cannot be read.
"""

from __future__ import annotations

import inspect
import re
import textwrap
from dataclasses import dataclass

import torch

from ..errors import PrefalignError


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The `PreTrainedModel` inside DDP / DataParallel / torch.compile / peft wrappers (FSDP2 shards in place)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, DataParallel, FSDP1
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
    return model


def model_class(model: torch.nn.Module) -> type:
    """The transformers class of a model (FSDP2 swaps in a subclass named FSDP<Name>)."""
    for cls in type(model).__mro__:
        if not cls.__name__.startswith("FSDP"):
            return cls
    return type(model)


@dataclass(frozen=True)
class HeadSpec:
    """hidden / hidden_divisor → output head → × logit_multiplier → soft-cap at `softcap` → first `vocab_limit`."""

    hidden_divisor: float | None = None
    logit_multiplier: float | None = None
    softcap: float | None = None
    vocab_limit: int | None = None

    def apply_to_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.hidden_divisor is None else hidden / self.hidden_divisor

    def apply_to_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` are fp32 here: soft-capping in fp32 is at least as exact as the model's own dtype."""
        if self.logit_multiplier is not None:
            logits = logits * self.logit_multiplier
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.vocab_limit is not None:
            logits = logits[..., : self.vocab_limit]
        return logits

    def describe(self) -> str:
        parts = [f"{k}={v:g}" for k, v in vars(self).items() if v is not None]
        return ", ".join(parts) or "plain output head"


_ATTR = r"(self(?:\.\w+)+)"  # an attribute path on the model: self.config.x, self.logit_scale, self.model.y
# Statements that change nothing we compute (we slice, cast and use fp32 ourselves).
_NEUTRAL = [
    r"hidden_states = (outputs|transformer_outputs|model_outputs?|\w+_outputs)(\.last_hidden_state|\[0\])",
    r"hidden_states = model_output\.last_hidden_state if return_dict else model_output\[0\]",
    r"hidden_states = slice_logits_to_keep\((hidden_states|outputs\.last_hidden_state), logits_to_keep\)",
    r"if hidden_states\.shape\[1\] == \(input_ids if input_ids is not None else inputs_embeds\)\.shape\[1\]:",
    r"(lm_)?logits = self\.lm_head\(hidden_states(\.to\((dtype=)?self\.lm_head\.weight\.dtype\))?\)(\.float\(\)|\.contiguous\(\))?",
    r"logits = logits\.(float\(\)|to\(torch\.float32\))",
    r"logits = (torch|nn\.functional)\.tanh\(logits\)",
    r"unpadded_vocab_size = self\.config\.unpadded_vocab_size",
    r"if unpadded_vocab_size is not None and unpadded_vocab_size < logits\.shape\[-1\]:",
    r"logits = logits\[\.\.\., :unpadded_vocab_size\]",
    r"cap = self\.config\.logits_soft_cap",
]
# Statements that transform: (pattern, field of HeadSpec, how the value is used).
_TRANSFORMS = [
    (rf"logits = logits(?:\.float\(\))? / {_ATTR}", "softcap_or_divide"),
    (rf"logits = logits \* {_ATTR}", "softcap_or_multiply"),
    (rf"logits = self\.lm_head\(hidden_states\) \* {_ATTR}", "multiply"),
    (rf"hidden_states = (?:outputs\.last_hidden_state|hidden_states) / {_ATTR}", "hidden_divide"),
    (r"logits = nn\.functional\.tanh\(logits / cap\) \* cap", "capped_by_cap"),
]


def _resolve(model: torch.nn.Module, path: str):
    value = model
    for name in path.split(".")[1:]:
        value = getattr(value, name, None)
        if value is None:
            return None
    return float(value) if isinstance(value, int | float | torch.Tensor) else value


def _head_statements(cls: type) -> list[str] | None:
    """The forward's statements from its decoder output to the loss, comments and blank lines dropped."""
    try:
        source = textwrap.dedent(inspect.getsource(cls.forward))
    except (OSError, TypeError):
        return None
    lines = [ln.split("#")[0].strip() for ln in source.splitlines()]
    lines = [ln for ln in lines if ln]
    head = [i for i, ln in enumerate(lines) if "lm_head(" in ln]
    if not head:
        return None
    start = head[0]
    while start > 0 and "hidden_states" in lines[start - 1] and "=" in lines[start - 1] and not lines[start - 1].startswith(")"):
        start -= 1
    out = []
    for ln in lines[start:]:
        if ln.startswith(("loss", "if labels", "return", "if not return_dict", "output")):
            break
        out.append(ln)
    return out


def head_spec(model: torch.nn.Module) -> HeadSpec:
    """The `HeadSpec` of `model` (wrappers looked through); PrefalignError for a forward it cannot follow."""
    inner = unwrap(model)
    cls = model_class(inner)
    statements = _head_statements(cls)
    if statements is None:
        return HeadSpec()  # source unavailable: the start-up self-check compares against the model's logits
    fields: dict[str, float] = {}
    softcap_path = None
    for stmt in statements:
        if any(re.fullmatch(p, stmt) for p in _NEUTRAL):
            continue
        guard = re.fullmatch(rf"if {_ATTR} is not None:", stmt)
        if guard:
            softcap_path = guard.group(1)  # the only guarded transform in transformers is soft-capping
            continue
        for pattern, kind in _TRANSFORMS:
            match = re.fullmatch(pattern, stmt)
            if not match:
                continue
            if kind == "capped_by_cap":
                fields["softcap"] = _resolve(inner, "self.config.logits_soft_cap")
                break
            path = match.group(1)
            value = _resolve(inner, path)
            is_cap = path == softcap_path or "softcap" in path or "soft_cap" in path
            if is_cap:
                fields["softcap"] = value
            elif kind in ("softcap_or_divide",):
                fields["logit_multiplier"] = None if value is None else 1.0 / value
            elif kind in ("softcap_or_multiply", "multiply"):
                fields["logit_multiplier"] = value
            elif kind == "hidden_divide":
                fields["hidden_divisor"] = value
            break
        else:
            raise PrefalignError(
                f"{cls.__name__}: prefalign's log-prob path does not know this step between the model's decoder "
                f"and its logits: `{stmt}` (the model is refused rather than scored wrongly)"
            )
    if any("unpadded_vocab_size" in s for s in statements):
        fields["vocab_limit"] = getattr(inner.config, "unpadded_vocab_size", None)
    for key, value in fields.items():
        if value is not None and not isinstance(value, float | int):
            raise PrefalignError(f"{cls.__name__}: cannot read {key} ({value!r}) for the log-prob path")
    return HeadSpec(**{k: (int(v) if k == "vocab_limit" else float(v)) for k, v in fields.items() if v is not None})
